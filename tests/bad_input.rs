//! Bad input against the real services: every message that cannot be loaded ends up as a row in
//! the job's error table with its raw bytes (exactly as published), a stable code and a reason;
//! the daemon goes on; nothing is silently dropped and nothing is loaded twice. Covers every
//! client-side reject class the feed cannot generate, duplicate keys (uv_<job>) inside one batch
//! and across batches, with `mode = "insert"` and `"insert_ignore"`, and CHECK / foreign-key
//! violations only the database can see (isolated by line, then by bisect).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::SeedableRng;
use serde_json::{json, Value};
use support::{Env, Settings};

/// A valid `person` body with id `n` (20 digits), after `edit` changed its fields.
fn person(n: u64, seed: u64, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let body = conveyor::feed::person_row(n, &mut rng, None, None);
    let mut v: Value = serde_json::from_slice(&body).expect("person_row is JSON");
    let obj = v.as_object_mut().expect("person_row is an object");
    edit(obj);
    serde_json::to_vec(&v).expect("serialize")
}

/// Error rows of every error table of the test's schema: (code, sqlstate, raw).
async fn error_details(env: &Env) -> Vec<(String, Option<String>, Vec<u8>)> {
    env.error_rows_full()
        .await
        .into_iter()
        .map(|e| (e.code, e.sqlstate, e.raw))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unloadable_message_lands_in_the_error_table_and_the_daemon_goes_on() {
    let env = Env::new("badinput").await;
    let report = env.feed(10_000, 1.0, 4_000_000, 17).await;
    assert_eq!(report.published, 10_000);
    assert!(report.bad_total() > 0, "the feed planned bad rows");

    // Ids 9xxxxxxxxxxxxxxxxxxx never collide with the fed ids.
    let id = |k: u64| format!("{:020}", 90_000_000_000_000_000_000u128 + u128::from(k));
    let mut utf8 = person(0, 1, |o| {
        o.insert("id".into(), json!(id(1)));
        o.insert("fname".into(), json!("@@@@"));
    });
    let at = utf8.windows(4).position(|w| w == b"@@@@").expect("marker");
    utf8.splice(at..at + 4, [b'a', 0xff, 0xfe, b'b']);
    let oversize = serde_json::to_vec(&json!({"id": id(3), "fname": "x".repeat(10 << 20)}))
        .expect("serialize");
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_json", br#"{"id": "x""#.to_vec()),
        ("invalid_utf8", utf8),
        (
            "nul_byte",
            person(0, 2, |o| {
                o.insert("id".into(), json!(id(2)));
                o.insert("fname".into(), json!("Ann\u{0}e"));
            }),
        ),
        ("oversize", oversize),
        ("missing_field", person(0, 4, |o| drop(o.remove("id")))),
        (
            "extra_field",
            person(0, 5, |o| {
                o.insert("id".into(), json!(id(5)));
                o.insert("nickname".into(), json!("Bob"));
            }),
        ),
        ("not_object", b"[1,2]".to_vec()),
        ("not_object", b"42".to_vec()),
        ("not_object", b"null".to_vec()),
        (
            "wrong_type",
            person(0, 8, |o| {
                o.insert("id".into(), json!(id(8)));
                o.insert("age".into(), json!({"years": 42}));
            }),
        ),
        (
            "too_long",
            person(0, 6, |o| {
                o.insert("id".into(), json!(id(6)));
                o.insert("fname".into(), json!("x".repeat(30)));
            }),
        ),
    ];
    let nul_body = &raw[2].1;
    assert!(
        nul_body.windows(6).any(|w| w == br"\u0000"),
        "the NUL travels as the JSON escape \\u0000"
    );
    assert!(raw[3].1.len() > 10 << 20, "a 10 MB message");
    // Injection-shaped text is data: it loads verbatim (every statement binds or COPYs it).
    let injection = "'); DROP TABLE x;--";
    let sql_shaped = person(0, 9, |o| {
        o.insert("id".into(), json!(format!("{:020}", 8_000_000_000_009u64)));
        o.insert("fname".into(), json!(injection));
        o.insert("lname".into(), json!("\\\t\"; --"));
    });
    let mut bodies: Vec<Vec<u8>> = raw.iter().map(|(_, b)| b.clone()).collect();
    bodies.push(sql_shaped);
    env.publish_raw(&bodies).await;
    let total = report.published as i64 + bodies.len() as i64;
    let bad_total = report.bad_total() as i64 + raw.len() as i64;

    let mut daemon = env.spawn(&Settings::default());
    env.wait_loaded(total, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(
        n as u64,
        report.good + 1,
        "good rows load, once each; of the raw rows only the SQL-shaped one"
    );
    assert_eq!(
        sum as u128,
        report.good_id_sum + 8_000_000_000_009u128,
        "the loaded ids are the good fed ids"
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.person WHERE fname = '{}' AND lname = '\\\t\"; --'",
            injection.replace('\'', "''")
        ))
        .await,
        1,
        "injection-shaped strings are stored as the text they are"
    );

    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for (kind, k) in &report.bad {
        *expected.entry(kind.as_str().to_string()).or_default() += *k as i64;
    }
    for (code, _) in &raw {
        *expected.entry(code.to_string()).or_default() += 1;
    }
    let got: BTreeMap<String, i64> = env.error_codes().await.into_iter().collect();
    assert_eq!(
        got, expected,
        "one error row per bad message, with its code"
    );

    let rows = env.error_rows().await;
    assert_eq!(rows.len() as i64, bad_total);
    for (code, _, message) in &rows {
        assert!(!message.trim().is_empty(), "error row {code} has a reason");
    }
    for (code, body) in &raw {
        let found: Vec<_> = rows
            .iter()
            .filter(|(c, r, _)| c == code && r.len() == body.len() && r == body)
            .collect();
        assert_eq!(found.len(), 1, "exactly one {code} row for its body");
        assert_eq!(found[0].1.len(), body.len(), "{code}: raw length");
        assert!(
            found[0].1 == *body,
            "{code}: raw bytes kept exactly as published"
        );
    }

    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "the daemon is still running after the bad input; log: {}",
        daemon.log_text()
    );
    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "log: {}",
        daemon.log_text()
    );
    assert_eq!(
        env.queue_depth().await,
        0,
        "every message acked, bad ones included"
    );
    let jobs = env
        .scalar(&format!(
            "SELECT count(*) FROM {{schema}}.jobs WHERE status = 1 AND end_reason = 'shutdown' \
             AND rows_read = {total} AND rows_rejected = {bad_total} AND rows_inserted = {} \
             AND rows_uv = {}",
            report.good + 1,
            report
                .bad
                .iter()
                .filter(|(k, _)| k.as_str() == "duplicate_key")
                .map(|(_, n)| n)
                .sum::<u64>()
        ))
        .await;
    assert_eq!(
        jobs,
        1,
        "the job row counts every message; log: {}",
        daemon.log_text()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_the_same_and_a_later_batch_are_refused_and_the_rest_loads() {
    let env = Env::new("dupkey").await;
    const BASE: u64 = 5_000_000;
    const ROWS: u64 = 150;
    // Batches of 50 (latency long enough that only `pack` closes them; one session so the
    // original always commits before its later duplicate). Row 30 repeats row 10's id in batch
    // 0; row 120 repeats row 20's id in batch 2.
    let dups = [(30u64, 10u64, "DupSame"), (120, 20, "DupLater")];
    let mut bodies = Vec::new();
    let mut dup_bodies = Vec::new();
    let mut sum: i64 = 0;
    for i in 0..ROWS {
        match dups.iter().find(|d| d.0 == i) {
            Some(&(_, orig, fname)) => {
                let b = person(BASE + i, i, |o| {
                    o.insert("id".into(), json!(format!("{:020}", BASE + orig)));
                    o.insert("fname".into(), json!(fname));
                });
                dup_bodies.push(b.clone());
                bodies.push(b);
            }
            None => {
                sum += (BASE + i) as i64;
                bodies.push(person(BASE + i, i, |_| {}));
            }
        }
    }
    env.publish_raw(&bodies).await;
    let settings = Settings {
        pack: 50,
        latency_ms: 5_000,
        sessions: 1,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(ROWS as i64, Duration::from_secs(60)).await;

    let batches = env
        .scalar(
            "SELECT count(*) FROM {schema}.robust_log WHERE (batch_id, first_seq, last_seq, rows) \
             IN ((0, 1, 50, 50), (1, 51, 100, 50), (2, 101, 150, 50))",
        )
        .await;
    assert_eq!(
        batches,
        3,
        "three batches of 50 as planned; log: {}",
        daemon.log_text()
    );
    assert_eq!(
        env.loaded().await,
        (ROWS as i64 - 2, sum),
        "every row but the two duplicates loads"
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM {schema}.person WHERE fname LIKE 'Dup%'")
            .await,
        0,
        "the originals keep their key"
    );
    let errors = error_details(&env).await;
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (code, sqlstate, raw) in &errors {
        assert_eq!(code, "duplicate_key");
        assert_eq!(sqlstate.as_deref(), Some("23505"));
        assert!(
            dup_bodies.contains(raw),
            "raw body is the duplicate as published"
        );
    }
    assert_ne!(
        errors[0].2, errors[1].2,
        "both duplicates recorded, not one twice"
    );
    assert!(
        env.error_rows_full().await.iter().all(|e| e.kind == "uv"),
        "duplicates of a unique key go to uv_<job>"
    );
    // Row 30 repeats row 10 in the same batch: found client-side. Row 120 repeats a committed
    // row: the database finds it, and from then on the job checks keys before each COPY.
    assert_eq!(
        daemon
            .log_text()
            .matches("first duplicate key of the job")
            .count(),
        1,
        "log: {}",
        daemon.log_text()
    );

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.queue_depth().await, 0);
    let jobs = env
        .scalar(
            "SELECT count(*) FROM {schema}.jobs WHERE rows_read = 150 AND rows_inserted = 148 \
             AND rows_rejected = 2 AND rows_uv = 2",
        )
        .await;
    assert_eq!(jobs, 1, "log: {}", daemon.log_text());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_foreign_key_violations_only_the_database_sees_are_isolated() {
    let env = Env::new("dbrefused").await;
    let mut db = support::pg().await;
    // Rules the decoder cannot know: a CHECK (refused per COPY line) and a foreign key
    // (checked at the end of the COPY, with no line: bisect).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET search_path = {s};
         CREATE TABLE states (code varchar(20) PRIMARY KEY);
         INSERT INTO states VALUES ('CA'), ('NY');
         ALTER TABLE person ADD CONSTRAINT age_plausible CHECK (age BETWEEN 0 AND 149);
         ALTER TABLE person ADD CONSTRAINT person_state FOREIGN KEY (state) REFERENCES states (code);",
        s = env.schema
    )))
    .execute(&mut db)
    .await
    .expect("constraints");
    let mut bodies = Vec::new();
    let mut bad_check = Vec::new();
    let mut bad_fk = Vec::new();
    let mut sum = 0i64;
    for i in 0..200u64 {
        let b = person(7_000 + i, i, |o| {
            o.insert("age".into(), json!(30));
            o.insert("state".into(), json!(if i % 2 == 0 { "CA" } else { "NY" }));
            if [17, 77, 150].contains(&i) {
                o.insert("age".into(), json!(200));
            }
            if [40, 41, 160].contains(&i) {
                o.insert("state".into(), json!("ZZ"));
            }
        });
        if [17, 77, 150].contains(&i) {
            bad_check.push(b.clone());
        } else if [40, 41, 160].contains(&i) {
            bad_fk.push(b.clone());
        } else {
            sum += 7_000 + i as i64;
        }
        bodies.push(b);
    }
    env.publish_raw(&bodies).await;
    let settings = Settings {
        pack: 50,
        latency_ms: 5_000,
        sessions: 1,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(200, Duration::from_secs(60)).await;
    assert_eq!(
        env.loaded().await,
        (194, sum),
        "the rest of each batch loads"
    );
    let errors = env.error_rows_full().await;
    assert_eq!(errors.len(), 6, "{errors:?}");
    for e in &errors {
        assert_eq!(e.kind, "et");
        assert_eq!(e.code, "db_refused");
        match e.sqlstate.as_deref() {
            Some("23514") => assert!(bad_check.contains(&e.raw), "{e:?}"),
            Some("23503") => assert!(bad_fk.contains(&e.raw), "{e:?}"),
            other => panic!("unexpected sqlstate {other:?}: {e:?}"),
        }
        assert!(!e.message.is_empty());
    }
    let log = daemon.log_text();
    assert!(
        log.contains("bisected a refused batch"),
        "the foreign key names no line: bisect; log: {log}"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.queue_depth().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_ignore_sends_duplicates_to_uv_without_a_failed_copy() {
    let env = Env::new("insignore").await;
    let mut bodies = Vec::new();
    let mut sum = 0i64;
    for i in 0..300u64 {
        // Every 10th row repeats a key from 25 rows back (the same or an earlier batch).
        let id = if i % 10 == 9 && i >= 25 {
            6_000 + i - 25
        } else {
            6_000 + i
        };
        if id == 6_000 + i {
            sum += id as i64;
        }
        bodies.push(person(id, i, |_| {}));
    }
    let dups = (0..300u64).filter(|i| i % 10 == 9 && *i >= 25).count() as i64;
    env.publish_raw(&bodies).await;
    let settings = Settings {
        pack: 50,
        latency_ms: 5_000,
        sessions: 2,
        extra: "mode = \"insert_ignore\"".into(),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(300, Duration::from_secs(60)).await;
    assert_eq!(env.loaded().await, (300 - dups, sum));
    let errors = env.error_rows_full().await;
    assert_eq!(errors.len() as i64, dups);
    assert!(errors.iter().all(|e| e.kind == "uv"
        && e.code == "duplicate_key"
        && e.sqlstate.as_deref() == Some("23505")));
    let log = daemon.log_text();
    assert!(
        !log.contains("first duplicate key of the job"),
        "keys are checked before every COPY from the start; log: {log}"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.jobs WHERE rows_uv = {dups} AND rows_inserted = {}",
            300 - dups
        ))
        .await,
        1
    );
    env.cleanup().await;
}
