//! `conveyor errors` against the real services: every refused message shows up with its code
//! and its exact payload (text as a JSON string, other bytes as base64), the same before and
//! after consolidation moved it into `error_history`; the filters, the table, and the export
//! that `conveyor feed --file` re-sends once a row is fixed.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::{Env, Settings};

/// A `person` row with id `n` (20 digits) and this first name (raw JSON text of the value).
fn row(n: u64, fname_json: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{n:020}","fname":{fname_json},"age":{}}}"#,
        n % 90
    )
    .into_bytes()
}

/// Standard base64, decoded independently of the crate's encoder.
fn unbase64(text: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = String::new();
    for c in text.trim_end_matches('=').bytes() {
        let v = A.iter().position(|&a| a == c).expect("a base64 digit");
        bits.push_str(&format!("{v:06b}"));
    }
    bits.as_bytes()
        .chunks_exact(8)
        .map(|b| u8::from_str_radix(std::str::from_utf8(b).expect("ascii"), 2).expect("bits"))
        .collect()
}

/// The payload an output object carries.
fn payload(v: &Value) -> Vec<u8> {
    match (v.get("body"), v.get("body_base64")) {
        (Some(Value::String(s)), None) => s.as_bytes().to_vec(),
        (None, Some(Value::String(b))) => unbase64(b),
        _ => panic!("exactly one of body, body_base64: {v}"),
    }
}

/// Runs `conveyor errors ARGS --format jsonl` and parses its lines.
fn jsonl(env: &Env, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["errors"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "jsonl"]);
    let (code, out, err) = support::cli(&env.config_path(), &all);
    assert_eq!(code, Some(0), "errors {args:?}: stdout {out}\nstderr {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The objects without `consolidated`, the one field consolidation changes.
fn without_consolidated(rows: &[Value]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            r.as_object_mut().expect("object").remove("consolidated");
            r
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_shows_every_refused_payload_before_and_after_consolidation_and_exports_for_feed() {
    let env = Env::new("errcli").await;
    let settings = Settings {
        pack: 50,
        sessions: 1,
        top: "[consolidate]\nafter_job = false\n".into(),
        ..Settings::default()
    };
    const BASE: u64 = 7_000_000;
    let good: Vec<Vec<u8>> = (0..5).map(|i| row(BASE + i, r#""Ann""#)).collect();
    let mut utf8 = row(BASE + 12, r#""a@@b""#);
    let at = utf8.windows(2).position(|w| w == b"@@").expect("marker");
    utf8.splice(at..at + 2, [0xff, 0xfe]);
    let mut raw_nul = row(BASE + 14, r#""A@B""#);
    let at = raw_nul.iter().position(|&b| b == b'@').expect("marker");
    raw_nul[at] = 0;
    // (expected code, body); the malformed JSON is the one the test fixes and re-sends.
    let malformed = format!(r#"{{"id":"{:020}","fname":"Broken""#, BASE + 11).into_bytes();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_json", malformed.clone()),
        ("invalid_utf8", utf8),
        ("nul_byte", row(BASE + 13, r#""Ann\u0000e""#)),
        // A NUL byte inside a JSON string is not JSON at all.
        ("malformed_json", raw_nul),
        ("duplicate_key", row(BASE, r#""Dup""#)),
    ];
    let mut bodies = good.clone();
    bodies.extend(bad.iter().map(|(_, b)| b.clone()));
    env.publish_raw(&bodies).await;
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(bodies.len() as i64, Duration::from_secs(60))
        .await;
    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "log: {}",
        daemon.log_text()
    );
    let mut db = support::pg().await;
    assert_eq!(
        env.error_tables(&mut db).await.len(),
        2,
        "et_ and uv_ wait for consolidation"
    );
    let job: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT job_name FROM {}.jobs WHERE rows_rejected > 0",
        env.schema
    )))
    .fetch_one(&mut db)
    .await
    .expect("the job");

    // Every refused message, with its code and its exact bytes, from the job's tables.
    let before = jsonl(&env, &[]);
    assert_eq!(before.len(), bad.len(), "{before:#?}");
    for (code, body) in &bad {
        let found: Vec<&Value> = before.iter().filter(|v| payload(v) == *body).collect();
        assert_eq!(found.len(), 1, "{code}: one row with the exact payload");
        let v = found[0];
        assert_eq!(v["code"], *code, "{v}");
        assert_eq!(v["job"], job.as_str());
        assert_eq!(v["pipeline"], "person");
        assert_eq!(v["consolidated"], false);
        assert_eq!(
            v["kind"],
            if *code == "duplicate_key" { "uv" } else { "et" }
        );
        assert!(v["seq"].as_i64().is_some_and(|s| s > 0), "{v}");
        assert!(!v["message"].as_str().expect("message").is_empty());
        assert!(v["recorded_at"].as_str().expect("time").ends_with('Z'));
        // Text travels as text; only the invalid UTF-8 needs base64.
        assert_eq!(
            v.get("body_base64").is_some(),
            *code == "invalid_utf8",
            "{v}"
        );
    }
    let dup = before
        .iter()
        .find(|v| v["code"] == "duplicate_key")
        .expect("dup");
    assert_eq!(dup["sqlstate"], "23505");
    let nul = before
        .iter()
        .find(|v| v["code"] == "nul_byte")
        .expect("nul");
    assert_eq!(nul["column"], "fname");
    let recorded: Vec<&str> = before
        .iter()
        .map(|v| v["recorded_at"].as_str().expect("time"))
        .collect();
    assert!(
        recorded.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {recorded:?}"
    );

    // Filters.
    let uv = jsonl(&env, &["--kind", "uv"]);
    assert_eq!(uv.len(), 1, "{uv:#?}");
    assert_eq!(uv[0]["code"], "duplicate_key");
    assert_eq!(uv, jsonl(&env, &["--kind", "duplicate_key"]));
    assert_eq!(jsonl(&env, &["--kind", "malformed_json"]).len(), 2);
    assert_eq!(jsonl(&env, &["--kind", "et"]).len(), 4);
    assert_eq!(jsonl(&env, &["--job", &job]), before);
    assert_eq!(jsonl(&env, &["--pipeline", "person"]), before);
    assert_eq!(jsonl(&env, &["--since", "1h"]), before);
    assert!(jsonl(&env, &["--since", "2999-01-01T00:00:00Z"]).is_empty());
    let (code, _, err) = support::cli(&env.config_path(), &["errors", "--kind", "bogus"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("malformed_json") && err.contains("duplicate_key") && err.contains("uv"),
        "an unknown kind lists the valid ones: {err}"
    );
    let (code, _, err) = support::cli(&env.config_path(), &["errors", "--since", "soon"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = support::cli(
        &env.config_path(),
        &["errors", "--job", "20000101_000000_person_01"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not in"), "an unknown job is named: {err}");
    let (code, out, err) = support::cli(
        &env.config_path(),
        &["errors", "--limit", "2", "--format", "jsonl"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 2);
    assert!(err.contains("2 of 5"), "stderr says more matched: {err}");
    assert_eq!(
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("json"))
            .collect::<Vec<_>>(),
        before[..2]
    );

    // The table: codes, escaped payloads.
    let (code, table, err) = support::cli(&env.config_path(), &["errors"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(table.lines().count(), 1 + bad.len(), "{table}");
    assert!(table.starts_with("JOB"), "{table}");
    for (code, _) in &bad {
        assert!(table.contains(code), "{code} in\n{table}");
    }
    assert!(
        table.contains(r"a\xff\xfeb"),
        "invalid UTF-8 as \\x bytes:\n{table}"
    );
    assert!(table.contains(r#""A\0B""#), "a NUL byte escaped:\n{table}");
    assert!(table.contains(r"Ann\u0000e"), "{table}");
    assert!(!table.contains('\0'), "no raw control characters");
    // The JSON array holds the same objects.
    let (code, out, err) = support::cli(&env.config_path(), &["errors", "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let array: Vec<Value> = serde_json::from_str(&out).expect("a JSON array");
    assert_eq!(array, before);

    // Consolidation moves the rows into error_history: the output stays the same.
    let (code, out, err) = support::cli(&env.config_path(), &["consolidate"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(env.error_tables(&mut db).await.is_empty());
    let after = jsonl(&env, &[]);
    assert!(
        after.iter().all(|v| v["consolidated"] == true),
        "{after:#?}"
    );
    assert_eq!(without_consolidated(&after), without_consolidated(&before));
    let (code, table_after, _) = support::cli(&env.config_path(), &["errors"]);
    assert_eq!(code, Some(0));
    assert_eq!(table_after, table);

    // Export, fix the malformed row, re-send the file with feed.
    let file = env.dir.join("errors.jsonl");
    let file_arg = file.display().to_string();
    let (code, out, err) = support::cli(&env.config_path(), &["errors", "--export", &file_arg]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!("wrote {} error row(s)", bad.len())),
        "{out}"
    );
    assert!(
        out.contains(&format!("feed --file {file_arg} --queue {}", env.queue)),
        "says how to re-send: {out}"
    );
    let text = std::fs::read_to_string(&file).expect("export file");
    let exported: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(exported, after, "the export holds the jsonl objects");
    const FIXED: u64 = BASE + 21;
    let fixed_row = row(FIXED, r#""Fixed""#);
    let edited: Vec<String> = exported
        .iter()
        .map(|v| {
            let mut v = v.clone();
            if payload(&v) == malformed {
                v["body"] = Value::String(String::from_utf8(fixed_row.clone()).expect("utf8"));
            }
            serde_json::to_string(&v).expect("json")
        })
        .collect();
    std::fs::write(&file, edited.join("\n") + "\n").expect("write the fixed export");
    let (code, out, err) = support::cli(
        &env.config_path(),
        &[
            "feed", "--file", &file_arg, "--queue", &env.queue, "--quiet",
        ],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!("published {} rows", bad.len())),
        "{out}"
    );

    assert_eq!(env.loaded().await.0, 5);
    let mut daemon = env.spawn(&settings);
    // 5 good + the fixed one; 5 error rows before, 4 again now.
    env.wait_loaded(6 + 5 + 4, Duration::from_secs(60)).await;
    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "log: {}",
        daemon.log_text()
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.person WHERE id = '{FIXED:020}' AND fname = 'Fixed'"
        ))
        .await,
        1,
        "the fixed row loaded"
    );
    assert_eq!(env.loaded().await.0, 6);
    let all = jsonl(&env, &[]);
    let again: Vec<&Value> = all.iter().filter(|v| v["job"] != job.as_str()).collect();
    let mut got: BTreeMap<Vec<u8>, String> = again
        .iter()
        .map(|v| (payload(v), v["code"].as_str().expect("code").to_string()))
        .collect();
    assert_eq!(got.len(), again.len(), "no payload twice");
    for (code, body) in bad.iter().filter(|(_, b)| *b != malformed) {
        assert_eq!(
            got.remove(body).as_deref(),
            Some(*code),
            "the still-bad {code} row is refused again, with its exact bytes"
        );
        let v = again
            .iter()
            .find(|v| payload(v) == *body)
            .expect("re-sent row");
        assert!(
            v["message_id"].as_str().is_some_and(|id| !id.is_empty()),
            "feed stamps a new message id: {v}"
        );
    }
    assert!(got.is_empty(), "nothing else refused: {got:?}");

    // A schema without conveyor's tables: the error says to migrate.
    let config = std::fs::read_to_string(env.config_path()).expect("config");
    let other = env.dir.join("unmigrated.toml");
    std::fs::write(
        &other,
        config.replace(
            &format!("schema = \"{}\"", env.schema),
            &format!("schema = \"{}_none\"", env.schema),
        ),
    )
    .expect("write config");
    let (code, _, err) = support::cli(&other, &["errors"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("conveyor --config") && err.contains("migrate"),
        "{err}"
    );

    env.cleanup().await;
}
