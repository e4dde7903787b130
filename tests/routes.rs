//! Routed pipelines against the real services (ETL2, seeds/000; ODI journalization, seeds/003):
//! one feed of mixed messages loads three tables with per-step counts, upserts count their
//! updates, an unknown type goes to the error table; a post-job SQL step flips the job's rows
//! visible only once the job ended, and a failing one is reported as status 3 and retried; two
//! subscribers consume a change journal independently, one failing mid-way without loss.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{Env, Settings};

/// The CRM tables: customers identified by email (ETL2's email variant), their attributes, and
/// events loaded with status 200 ("load in progress") until the job's post step flips them.
async fn crm_tables(env: &Env) {
    let s = &env.schema;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {s}.customer (id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text, tier int);
         CREATE TABLE {s}.attribute (customer_id int NOT NULL REFERENCES {s}.customer (id), name text NOT NULL,
             value text, PRIMARY KEY (customer_id, name));
         CREATE TABLE {s}.event (id bigint PRIMARY KEY, customer_id int NOT NULL,
             kind text NOT NULL CHECK (kind <> 'forbidden'),
             status int NOT NULL DEFAULT 200, load_job text);
         CREATE VIEW {s}.visible_event AS SELECT * FROM {s}.event WHERE status = 1;"
    )))
    .execute(&mut support::pg().await)
    .await
    .expect("create the CRM tables");
}

fn routes(env: &Env, journal: &str, post: &str) -> String {
    let s = &env.schema;
    format!(
        r#"journal = true
[[pipeline.route]]
table = "{s}.customer"
when = "type = customer"
mode = "upsert"
key = ["email"]
{journal}
[[pipeline.route]]
table = "{s}.attribute"
when = "type = customer"
part = "attributes"
mode = "upsert"
identity = {{ column = "customer_id", field = "email", table = "{s}.customer", by = "email", value = "id" }}
[[pipeline.route]]
table = "{s}.event"
when = "type = event"
job_column = "load_job"
identity = {{ column = "customer_id", field = "email", table = "{s}.customer", by = "email", value = "id" }}
{post}
"#
    )
}

fn settings(extra: String) -> Settings {
    Settings {
        target: false,
        pack: 50,
        latency_ms: 50,
        sessions: 1,
        extra,
        top: "[consolidate]\nafter_job = false\n".into(),
        ..Settings::default()
    }
}

fn customer(email: &str, name: &str, attrs: &[(&str, &str)]) -> Vec<u8> {
    let attributes: Vec<Value> = attrs
        .iter()
        .map(|(n, v)| json!({"name": n, "value": v}))
        .collect();
    json!({"type": "customer", "email": email, "name": name, "tier": 1, "attributes": attributes})
        .to_string()
        .into_bytes()
}

fn event(id: i64, email: &str) -> Vec<u8> {
    json!({"type": "event", "id": id, "email": email, "kind": "signup"})
        .to_string()
        .into_bytes()
}

/// (inserted, updated, ignored, errors, status) of each step of `job`, by step.
async fn steps(env: &Env, job: &str) -> Vec<(i32, (i64, i64, i64, i64, i16))> {
    let rows: Vec<(i32, i64, i64, i64, i64, i16)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT step, inserted, updated, ignored, errors, status FROM {}.steps WHERE job_name = $1 ORDER BY step",
        env.schema
    )))
    .bind(job)
    .fetch_all(&mut support::pg().await)
    .await
    .expect("steps");
    rows.into_iter()
        .map(|(s, i, u, g, e, st)| (s, (i, u, g, e, st)))
        .collect()
}

async fn active_job(env: &Env) -> String {
    let sql = format!(
        "SELECT job_name FROM {}.jobs WHERE activated_at IS NOT NULL AND ended_at IS NULL ORDER BY activated_at DESC LIMIT 1",
        env.schema
    );
    let start = std::time::Instant::now();
    loop {
        let r: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_optional(&mut support::pg().await)
            .await
            .expect("jobs");
        if let Some(j) = r {
            return j;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no job became active; logs in {}",
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(env: &Env, sql: &str) -> i64 {
    env.scalar(sql).await
}

async fn end_job(env: &Env, job: &str) {
    let (code, out, err) = support::cli(&env.config_path(), &["eoj", "--priority", "--job", job]);
    assert_eq!(code, Some(0), "eoj: {out}\n{err}");
    env.wait_for("the job to end", Duration::from_secs(30), || async {
        count(
            env,
            &format!("SELECT count(*) FROM {{schema}}.jobs WHERE job_name = '{job}' AND ended_at IS NOT NULL"),
        )
        .await
            == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_messages_load_three_tables_with_counts_per_step_and_upserts_count_updates() {
    let env = Env::new("routes").await;
    crm_tables(&env).await;
    let mut daemon = env.spawn(&settings(routes(&env, "", "")));
    daemon
        .wait_log("every worker registered", Duration::from_secs(30))
        .await;
    env.publish_raw(&[
        customer("a@x", "Ann", &[("color", "blue"), ("size", "M")]),
        customer("b@x", "Bob", &[("color", "red"), ("size", "L")]),
        customer("c@x", "Cy", &[("color", "green"), ("size", "S")]),
        event(1, "a@x"),
        event(2, "a@x"),
        event(3, "b@x"),
        event(4, "c@x"),
        event(5, "nobody@x"),
        br#"{"type":"order","id":9}"#.to_vec(),
        // A duplicate event id (to uv_) and an id that is not a number are refused before any
        // round trip, as with a single target; a CHECK only the database sees makes it refuse
        // the statement, and the batch's messages are bisected until that one stands alone.
        event(1, "b@x"),
        br#"{"type":"event","id":"x7","email":"a@x","kind":"signup"}"#.to_vec(),
        br#"{"type":"event","id":6,"email":"a@x","kind":"forbidden"}"#.to_vec(),
    ])
    .await;
    let job = active_job(&env).await;
    env.wait_for(
        "every message committed",
        Duration::from_secs(30),
        || async {
            count(&env, "SELECT count(*) FROM {schema}.event").await == 4
                && env.error_codes().await.len() == 5
        },
    )
    .await;
    end_job(&env, &job).await;
    assert_eq!(
        steps(&env, &job).await,
        vec![
            (1, (3, 0, 0, 0, 1)),
            (2, (6, 0, 0, 0, 1)),
            (3, (4, 0, 0, 4, 1)),
        ],
        "per step: inserted, updated, ignored, errors, status"
    );
    assert_eq!(
        env.error_codes().await,
        vec![
            ("db_refused".into(), 1),
            ("duplicate_key".into(), 1),
            ("identity_not_found".into(), 1),
            ("invalid_integer".into(), 1),
            ("no_route".into(), 1)
        ]
    );
    // Attributes and events point at the right customers (identity by email).
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.attribute a JOIN {schema}.customer c ON c.id = a.customer_id WHERE c.email = 'a@x'").await,
        2
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.event e JOIN {schema}.customer c ON c.id = e.customer_id WHERE c.email = 'a@x'").await,
        2
    );

    // The next job: two known customers again (renamed, one attribute changed) and a new one.
    env.publish_raw(&[
        customer("a@x", "Anna", &[("color", "black")]),
        customer("b@x", "Bobby", &[]),
        customer("d@x", "Di", &[("color", "white")]),
    ])
    .await;
    let job2 = active_job(&env).await;
    assert_ne!(job2, job);
    env.wait_for("the upserts", Duration::from_secs(30), || async {
        count(&env, "SELECT count(*) FROM {schema}.customer").await == 4
            && count(
                &env,
                "SELECT count(*) FROM {schema}.customer WHERE name = 'Bobby'",
            )
            .await
                == 1
            && count(
                &env,
                "SELECT count(*) FROM {schema}.attribute WHERE value = 'white'",
            )
            .await
                == 1
    })
    .await;
    end_job(&env, &job2).await;
    assert_eq!(
        steps(&env, &job2).await,
        vec![
            (1, (1, 2, 0, 0, 1)),
            (2, (1, 1, 0, 0, 1)),
            (3, (0, 0, 0, 0, 1)),
        ]
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.attribute a JOIN {schema}.customer c ON c.id = a.customer_id WHERE c.email = 'a@x' AND a.name = 'color' AND a.value = 'black'").await,
        1
    );

    // ETL2's step selector: step 1 of the first job again, from its journal (upserts: the
    // three customers are updated, not duplicated).
    let (code, out, err) = support::cli(
        &env.config_path(),
        &["run-steps", "--job", &job, "--step", "1", "--quiet"],
    );
    assert_eq!(code, Some(0), "run-steps: {out}\n{err}");
    assert_eq!(steps(&env, &job).await[0], (1, (0, 3, 0, 0, 1)), "{out}");
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.customer").await,
        4
    );

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_post_job_step_makes_rows_visible_at_job_end_and_a_failing_one_is_retried() {
    let env = Env::new("poststep").await;
    crm_tables(&env).await;
    let s = env.schema.clone();
    let post = format!(
        r#"[[pipeline.post_step]]
name = "publish events"
sql = "UPDATE {s}.event SET status = 1 WHERE status = 200 AND load_job = $1"
[[pipeline.post_step]]
name = "audit"
sql = "INSERT INTO {s}.audit (job, events) SELECT $1, count(*) FROM {s}.event WHERE load_job = $1"
"#
    );
    let mut daemon = env.spawn(&settings(routes(&env, "", &post)));
    daemon
        .wait_log("every worker registered", Duration::from_secs(30))
        .await;
    env.publish_raw(&[
        customer("a@x", "Ann", &[]),
        event(1, "a@x"),
        event(2, "a@x"),
    ])
    .await;
    let job = active_job(&env).await;
    env.wait_for("the events loaded", Duration::from_secs(30), || async {
        count(&env, "SELECT count(*) FROM {schema}.event").await == 2
    })
    .await;
    // Loaded but not visible while the job runs.
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.visible_event").await,
        0
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.visible_event").await,
        0
    );

    end_job(&env, &job).await;
    env.wait_for("the post steps", Duration::from_secs(30), || async {
        steps(&env, &job).await.len() == 5
            && steps(&env, &job)
                .await
                .iter()
                .skip(3)
                .all(|(_, c)| c.4 != 0)
    })
    .await;
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.visible_event").await,
        2
    );
    let st = steps(&env, &job).await;
    assert_eq!(st[3], (4, (2, 0, 0, 0, 1)), "step 4 flipped 2 rows");
    assert_eq!(st[4].1 .4, 3, "step 5 failed: its table is missing");
    let error: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT error FROM {s}.steps WHERE job_name = $1 AND step = 5"
    )))
    .bind(&job)
    .fetch_one(&mut support::pg().await)
    .await
    .expect("error");
    assert!(error.contains("audit"), "{error}");
    // The job's data stays.
    assert_eq!(count(&env, "SELECT count(*) FROM {schema}.event").await, 2);

    let (code, _, _) = support::cli(&env.config_path(), &["consolidate", "--steps"]);
    assert_eq!(code, Some(1), "still failing");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {s}.audit (job text, events bigint)"
    )))
    .execute(&mut support::pg().await)
    .await
    .expect("create audit");
    let (code, out, err) = support::cli(&env.config_path(), &["consolidate", "--steps"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("step 5: status 1"), "{out}");
    assert_eq!(steps(&env, &job).await[4].1 .4, 1);
    assert_eq!(
        count(&env, "SELECT events FROM {schema}.audit").await,
        2,
        "the retried step ran once"
    );
    // `conveyor status` shows the job's steps (ETL2_MONITOR's STAT_* and counters).
    let (code, out, err) = support::cli(&env.config_path(), &["status"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("steps of these jobs") && out.contains("publish events"),
        "{out}"
    );
    let (code, out, err) = support::cli(&env.config_path(), &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("status --json");
    let shown: Vec<(i64, i64)> = v["pipelines"]["person"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|x| x["job_name"] == job.as_str())
        .map(|x| {
            (
                x["step"].as_i64().unwrap_or(0),
                x["status"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(shown, [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)], "{v}");

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

fn lock(env: &Env, subscriber: &str) -> (i64, Vec<Value>) {
    let (code, out, err) = support::cli(
        &env.config_path(),
        &["journal", "lock", "--subscriber", subscriber, "--json"],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("lock --json");
    (
        v["window"].as_i64().expect("window"),
        v["rows"].as_array().expect("rows").clone(),
    )
}

fn purge(env: &Env, subscriber: &str, window: i64) {
    let (code, out, err) = support::cli(
        &env.config_path(),
        &[
            "journal",
            "purge",
            "--subscriber",
            subscriber,
            "--window",
            &window.to_string(),
        ],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
}

fn backlog(env: &Env) -> Vec<(String, i64, i64)> {
    let (code, out, err) = support::cli(&env.config_path(), &["journal", "status", "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Vec<Value> = serde_json::from_str(out.trim()).expect("status --json");
    v.iter()
        .map(|b| {
            (
                b["subscriber"].as_str().unwrap_or_default().to_string(),
                b["unconsumed"].as_i64().unwrap_or(-1),
                b["consumed"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_consume_the_change_journal_independently_without_loss() {
    let env = Env::new("changes").await;
    crm_tables(&env).await;
    let mut daemon = env.spawn(&settings(routes(
        &env,
        r#"journal = ["crm", "marketing"]"#,
        "",
    )));
    daemon
        .wait_log("every worker registered", Duration::from_secs(30))
        .await;
    env.publish_raw(&[
        customer("a@x", "Ann", &[]),
        customer("b@x", "Bob", &[]),
        customer("c@x", "Cy", &[]),
    ])
    .await;
    env.wait_for(
        "three journaled customers",
        Duration::from_secs(30),
        || async { count(&env, "SELECT count(*) FROM {schema}.change_journal").await == 6 },
    )
    .await;
    assert_eq!(
        backlog(&env),
        vec![("crm".into(), 3, 0), ("marketing".into(), 3, 0)]
    );

    // crm consumes and purges.
    let (w, rows) = lock(&env, "crm");
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["flag"] == "I"), "{rows:?}");
    let emails: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["key"]["email"].as_str())
        .collect();
    assert_eq!(emails, ["a@x", "b@x", "c@x"]);
    purge(&env, "crm", w);

    // marketing locks, then its downstream run fails: no purge.
    let (_, rows) = lock(&env, "marketing");
    assert_eq!(rows.len(), 3);
    // Meanwhile one customer changes and one arrives.
    env.publish_raw(&[customer("a@x", "Anna", &[]), customer("d@x", "Di", &[])])
        .await;
    env.wait_for(
        "two more journal rows each",
        Duration::from_secs(30),
        || async { count(&env, "SELECT count(*) FROM {schema}.change_journal").await == 3 + 4 },
    )
    .await;
    assert_eq!(
        backlog(&env),
        vec![("crm".into(), 2, 0), ("marketing".into(), 2, 3)]
    );

    // marketing's rerun: its unpurged window again, plus what came since; nothing lost.
    let (w, rows) = lock(&env, "marketing");
    assert_eq!(rows.len(), 5, "{rows:?}");
    let flags: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["key"]["email"].as_str().unwrap_or(""),
                r["flag"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        flags,
        [
            ("a@x", "I"),
            ("b@x", "I"),
            ("c@x", "I"),
            ("a@x", "U"),
            ("d@x", "I")
        ]
    );
    purge(&env, "marketing", w);
    // crm only sees what is new to it.
    let (w, rows) = lock(&env, "crm");
    assert_eq!(rows.len(), 2);
    purge(&env, "crm", w);
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.change_journal").await,
        0
    );

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

/// A routed pipeline killed (SIGKILL from its own crash point) just after a batch committed,
/// before it was acked, and started again: every message's rows are in their tables exactly
/// once (the spool's recovery and the robust marks cover routed batches as any other), the
/// steps count each row once, and nothing went to the error tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_pipeline_killed_after_a_commit_loads_every_row_once() {
    let env = Env::new("routecrash").await;
    crm_tables(&env).await;
    let s = settings(routes(&env, "", ""));
    let mut bodies: Vec<Vec<u8>> = (0..40)
        .map(|i| customer(&format!("c{i}@x"), "C", &[("color", "blue")]))
        .collect();
    bodies.extend((0..400).map(|i| event(i, &format!("c{}@x", i % 40))));
    env.publish_raw(&bodies).await;
    let mut daemon = env.spawn_env(&s, &[("CONVEYOR_CRASH_AT", "after_commit:3")]);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(60)).await,
        None,
        "killed by its crash point"
    );
    assert!(daemon.log_text().contains("crash point reached"));
    let mut daemon = env.spawn(&s);
    env.wait_for("every row loaded", Duration::from_secs(60), || async {
        count(&env, "SELECT count(*) FROM {schema}.event").await == 400
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        daemon
            .log_text()
            .contains("crashed job recovered and closed"),
        "the crashed job's spool was recovered: {}",
        daemon.log_text()
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.customer").await,
        40
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.attribute").await,
        40
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM {schema}.event").await,
        400
    );
    assert!(
        env.error_codes().await.is_empty(),
        "{:?}",
        env.error_codes().await
    );
    // Counted once across the crashed job (recovered) and the next ones.
    assert_eq!(
        count(
            &env,
            "SELECT coalesce(sum(inserted), 0)::int8 FROM {schema}.steps WHERE step = 3"
        )
        .await,
        400
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}
