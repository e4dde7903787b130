//! Memory benchmark: peak RSS of the daemon (a child process, default settings) while it drains
//! a backlog of 1,000,000 seed-like messages. Memory must not grow with the backlog: prefetch,
//! channels and batches are bounded. Aim ≤ 64 MiB. Peak = the kernel's high-water mark
//! (`VmHWM` in /proc/<pid>/status), sampled with the current RSS every 100 ms.
//!
//! `cargo bench --bench memory` (`MEMORY_ROWS` overrides 1,000,000); section `memory` of
//! `target/bench/results.json`. Under `cargo test --all-targets`: 5,000 rows, counts checked.

mod common;

use std::time::{Duration, Instant};

/// (VmHWM, VmRSS) of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn main() {
    let bench = common::is_bench();
    let n: u64 = if bench {
        std::env::var("MEMORY_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    } else {
        5_000
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(common::with_world(|w, mut db| async move {
        let published = Instant::now();
        let fed = common::feed(&w, n, 0, 0.0, 21).await;
        let publish_s = published.elapsed().as_secs_f64();
        let (daemon, config) = common::spawn_daemon(&w, "");
        let pid = daemon.id();
        let started = Instant::now();
        let mut samples = Vec::new();
        loop {
            if let Some(s) = rss_kib(pid) {
                samples.push(s);
            }
            if common::loaded(&mut db, &w).await as u64 >= fed.good {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "drain did not finish in 15 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drain_s = started.elapsed().as_secs_f64();
        let final_hwm = rss_kib(pid).map(|s| s.0);
        common::stop_daemon(daemon, &config);
        let peak_kib = samples
            .iter()
            .map(|s| s.0)
            .chain(final_hwm)
            .max()
            .unwrap_or(0);
        let max_rss_kib = samples.iter().map(|s| s.1).max().unwrap_or(0);
        assert!(peak_kib > 0, "RSS was sampled");
        assert_eq!(common::loaded(&mut db, &w).await as u64, fed.good);
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "\nmemory benchmark: {n} messages published in {publish_s:.1} s, drained in {drain_s:.1} s ({:.0} rows/s)\n\
             daemon peak RSS (VmHWM) {:.1} MiB, largest sampled RSS {:.1} MiB   (aim ≤ 64 MiB)",
            n as f64 / drain_s,
            mib(peak_kib),
            mib(max_rss_kib)
        );
        if bench {
            common::record(
                "memory",
                serde_json::json!({
                    "rows": n, "drain_seconds": drain_s, "peak_rss_mib": mib(peak_kib),
                    "max_sampled_rss_mib": mib(max_rss_kib),
                }),
            );
        }
    }));
}
