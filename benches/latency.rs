//! Latency benchmark: rows fed at a fixed offered rate (1,000 and 5,000 rows/s, 60 s each) into
//! the daemon running as a child process with default settings; row latency (queue_time →
//! insert, both on the database side: the feed stamps `x-queue-time`, the table's `db_time` is
//! the insert time, a few ms before the batch's commit) as p50 / p99 / max per rate. Aim at 5,000
//! rows/s: p50 ≤ 25 ms, p99 ≤ 100 ms, max ≤ 250 ms.
//!
//! `cargo bench --bench latency` (`LATENCY_SECONDS` overrides 60, `LATENCY_EXTRA` adds pipeline
//! lines such as `latency_ms = 20`); section `latency` of
//! `target/bench/results.json`. Under `cargo test --all-targets` a 2-second smoke run at 500
//! rows/s checks that every row loads and latencies are recorded.

mod common;

use std::time::Duration;

fn main() {
    let bench = common::is_bench();
    let seconds: u64 = if bench {
        std::env::var("LATENCY_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60)
    } else {
        2
    };
    let rates: &[u64] = if bench { &[1_000, 5_000] } else { &[500] };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(common::with_world(|w, mut db| async move {
        // LATENCY_EXTRA: pipeline lines to try a setting (e.g. `latency_ms = 20`).
        let extra = std::env::var("LATENCY_EXTRA").unwrap_or_default();
        let (daemon, config) = common::spawn_daemon(&w, &extra);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let mut results = Vec::new();
        println!(
            "\nlatency benchmark: offered rate for {seconds} s each, default settings, one run\n"
        );
        println!(
            "{:>10} {:>10} {:>10} {:>10} {:>10}",
            "rows/s", "rows", "p50 ms", "p99 ms", "max ms"
        );
        for (i, &rate) in rates.iter().enumerate() {
            let seed = 10 + i as u64;
            let fed = common::feed(&w, rate * seconds, rate, 0.0, seed).await;
            // The feed's ids for this seed: seed * 1e8 + 0 .. count (20 digits, so text order
            // is numeric order).
            let (lo, hi) = (seed * 100_000_000, seed * 100_000_000 + rate * seconds);
            let range = format!("id >= '{lo:020}' AND id < '{hi:020}'");
            for _ in 0..600 {
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {}.person WHERE {range}",
                    w.schema
                )))
                .fetch_one(&mut db)
                .await
                .expect("count");
                if n as u64 >= fed.good {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (rows, p50, p99, max): (i64, f64, f64, f64) =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY l),
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY l), max(l)
                 FROM (SELECT extract(epoch FROM db_time - queue_time)::float8 * 1000 AS l
                       FROM {}.person WHERE {range}) t",
                    w.schema
                )))
                .fetch_one(&mut db)
                .await
                .expect("latencies");
            assert_eq!(rows as u64, fed.good, "every row loaded at {rate} rows/s");
            assert!(max.is_finite() && p50 <= max, "latencies recorded");
            println!("{rate:>10} {rows:>10} {p50:>10.1} {p99:>10.1} {max:>10.1}");
            results.push(serde_json::json!({
                "rate": rate, "seconds": seconds, "rows": rows,
                "p50_ms": p50, "p99_ms": p99, "max_ms": max,
            }));
        }
        println!("\naim at 5,000 rows/s: p50 ≤ 25 ms, p99 ≤ 100 ms, max ≤ 250 ms");
        common::stop_daemon(daemon, &config);
        if bench {
            common::record(
                "latency",
                serde_json::json!({ "runs": results, "extra": extra }),
            );
        }
    }));
}
