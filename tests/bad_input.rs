//! Bad input against the real services: every message that cannot be loaded ends up as a row in
//! the job's error table with its raw bytes (exactly as published), a stable code and a reason;
//! the daemon goes on; nothing is silently dropped and nothing is loaded twice. Covers every
//! client-side reject class the feed cannot generate, and duplicate keys found by the database
//! both inside one batch and across batches.

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
    let oversize = serde_json::to_vec(&json!({"id": id(3), "fname": "x".repeat(5_000_000)}))
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
    assert!(raw[3].1.len() > 5_000_000);
    let bodies: Vec<Vec<u8>> = raw.iter().map(|(_, b)| b.clone()).collect();
    env.publish_raw(&bodies).await;
    let total = report.published as i64 + raw.len() as i64;
    let bad_total = report.bad_total() as i64 + raw.len() as i64;

    let mut daemon = env.spawn(&Settings::default());
    env.wait_loaded(total, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(
        n as u64, report.good,
        "good rows load, once each; no raw row is loadable"
    );
    assert_eq!(
        sum as u128, report.good_id_sum,
        "the loaded ids are the good fed ids"
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
        let found: Vec<_> = rows.iter().filter(|(c, _, _)| c == code).collect();
        assert_eq!(found.len(), 1, "exactly one {code} row");
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
             AND rows_read = {total} AND rows_rejected = {bad_total} AND rows_inserted = {}",
            report.good
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

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.queue_depth().await, 0);
    let jobs = env
        .scalar(
            "SELECT count(*) FROM {schema}.jobs WHERE rows_read = 150 AND rows_inserted = 148 \
             AND rows_rejected = 2",
        )
        .await;
    assert_eq!(jobs, 1, "log: {}", daemon.log_text());
    env.cleanup().await;
}
