//! `conveyor check` against the real services: a good config passes with its plan printed (the
//! queue missing is fine: `conveyor run` declares it); a missing target table, a rename to a
//! missing column, a queue of the wrong type and an unreachable broker each make it exit 1
//! naming the cause; `--json` carries the same plan and problems.
//!
//! The services must be up: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`) and
//! RabbitMQ on 127.0.0.1:5672 (guest/guest); `bash .ci/run` starts them.

mod support;

use conveyor::config::SecretUrl;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use support::{Env, Settings};

/// `conveyor check <args>` on a blocking thread: (exit code, stdout, stderr).
async fn check(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let config = config.to_path_buf();
    let mut all = vec!["check".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        support::cli(&config, &args)
    })
    .await
    .expect("cli thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_config_passes_and_prints_the_plan() {
    let env = Env::new("check").await;
    let path = env.write_config(&Settings::default());
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&env.queue), "{out}");
    assert!(out.contains(&format!("{}.person", env.schema)), "{out}");
    assert!(out.contains("will be declared"), "{out}");
    assert!(out.contains("person_pkey (id)"), "{out}");
    assert!(out.contains("no problems"), "{out}");

    let (code, out, err) = check(&path, &["--json", "--pipeline", "person"]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
    let p = &v["pipelines"][0];
    assert_eq!(p["name"], "person", "{v}");
    assert_eq!(p["plan"]["queue"], env.queue.as_str(), "{v}");
    assert_eq!(p["plan"]["pack"], 500, "{v}");
    assert_eq!(p["plan"]["durability"], "spool", "{v}");
    // 33 columns, db_time filled by the database; queue_time written by conveyor.
    assert_eq!(p["plan"]["columns"], 33, "{v}");
    assert_eq!(p["plan"]["columns_mapped"], 32, "{v}");

    let (code, out, _) = check(&path, &["--pipeline", "nope"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no pipeline named \"nope\""), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_target_table_is_named() {
    let env = Env::new("check").await;
    let path = env.write_config(&Settings::default());
    let text = std::fs::read_to_string(&path).expect("read config");
    let text = text.replace(
        &format!("target = \"{}.person\"", env.schema),
        &format!("target = \"{}.no_such_table\"", env.schema),
    );
    std::fs::write(&path, text).expect("write config");
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("no_such_table"), "{out}");
    assert!(out.contains("does not exist"), "{out}");
    assert!(err.contains("problem(s) found"), "{err}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_to_a_missing_column_is_named() {
    let env = Env::new("check").await;
    let path = env.write_config(&Settings {
        extra: "[pipeline.rename]\n\"first name\" = \"no_such_col\"".into(),
        ..Settings::default()
    });
    let (code, out, err) = check(&path, &["--json"]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let problems = v["pipelines"][0]["problems"].to_string();
    assert!(problems.contains("no_such_col"), "{v}");
    assert!(v["problems"].to_string().contains("no_such_col"), "{v}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_that_takes_a_not_null_columns_field_is_a_problem() {
    let env = Env::new("check").await;
    // `id` (the primary key, NOT NULL) now feeds fname: nothing fills id any more.
    let path = env.write_config(&Settings {
        extra: "[pipeline.rename]\n\"id\" = \"fname\"".into(),
        ..Settings::default()
    });
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("column \"id\""), "{out}");
    assert!(out.contains("NOT NULL"), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queue_under_a_quorum_config_is_the_wrong_type() {
    let env = Env::new("check").await;
    let conn = conveyor::source::connect(&SecretUrl::new(support::AMQP_URL), "test-check")
        .await
        .expect("amqp connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        env.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare a classic queue");
    let _ = conn.close(200, "done".into()).await;
    let path = env.write_config(&Settings::default());
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    // With the management API the type is read; without it, conveyor's own declare is refused
    // by the broker (inequivalent x-queue-type): either way the problem is named.
    assert!(out.contains("wrong queue type"), "{out}");
    assert!(out.contains("exists, 0 ready"), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_named() {
    let env = Env::new("check").await;
    let port = support::free_port();
    let path = env.write_config(&Settings {
        amqp_url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        ..Settings::default()
    });
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!(
            "RabbitMQ unreachable at amqp://guest:***@127.0.0.1:{port}"
        )),
        "{out}"
    );
    assert!(!out.contains("guest:guest"), "password shown: {out}");
    // The database side is still checked: the table was found.
    assert!(out.contains("32 mapped of 33"), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_lists_every_problem() {
    let env = Env::new("check").await;
    let path = env.write_config(&Settings {
        extra: "pack = 0\nsessions = 0".into(),
        ..Settings::default()
    });
    // `pack` and `sessions` now appear twice: make them the only values instead.
    let text = std::fs::read_to_string(&path)
        .expect("read config")
        .replace("pack = 500\n", "")
        .replace("sessions = 2\n", "");
    std::fs::write(&path, text).expect("write config");
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("pack = 0"), "{out}");
    assert!(out.contains("sessions = 0"), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_pipeline_is_checked_route_by_route() {
    let env = Env::new("check_routes").await;
    let s = env.schema.clone();
    let path = env.write_config(&Settings {
        target: false,
        extra: format!(
            "[[pipeline.route]]\ntable = \"{s}.person\"\nwhen = \"type = person\"\n[[pipeline.route]]\ntable = \"{s}.missing\"\nwhen = \"type = other\"\n[[pipeline.route]]\ntable = \"{s}.person\"\nwhen = \"type = p2\"\nmode = \"upsert\"\nkey = [\"nope\"]\n[[pipeline.post_step]]\nsql = \"SELECT $1\"\n"
        ),
        ..Settings::default()
    });
    let (code, out, err) = check(&path, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("step 1:"), "the plan lists the steps: {out}");
    assert!(out.contains("after each job"), "{out}");
    assert!(
        out.contains(&format!("step 2: table \"{s}\".\"missing\" does not exist")),
        "{out}"
    );
    assert!(
        out.contains("step 3") && out.contains("no column \"nope\""),
        "{out}"
    );
    env.cleanup().await;
}
