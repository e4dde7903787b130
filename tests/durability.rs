//! Durability with the default `durability = "spool"`: a process killed at any moment — by
//! itself at a chosen crash point (`CONVEYOR_CRASH_AT`) or by an outside `kill -9` — loses no
//! acked message and loads none twice, even into a table with no key; and a spool damaged on
//! disk (a flipped byte, a torn tail) still gives back every whole record exactly once.

mod support;

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use conveyor::spool::record::{self, Kind};
use conveyor::spool::{frame, Spool, SpoolOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Row;

use support::{Daemon, Env, Settings};

/// Polls the child until it exits or `timeout` passes; `None` if it is still running.
async fn wait_dead(daemon: &mut Daemon, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn killed_by_sigkill(status: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGKILL)
}

/// Up to ten ids the target holds more than once, with how often (for failure messages).
async fn duplicated_ids(env: &Env) -> Vec<(String, i64)> {
    let mut db = support::pg().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id::text AS id, count(*)::int8 AS n FROM {}.person GROUP BY id HAVING count(*) <> 1 ORDER BY id LIMIT 10",
        env.schema
    )))
    .fetch_all(&mut db)
    .await
    .expect("list duplicated ids")
    .iter()
    .map(|r| (r.get("id"), r.get("n")))
    .collect()
}

/// What one chaos round aims at.
#[derive(Debug, Clone)]
enum Kill {
    /// `CONVEYOR_CRASH_AT=<point>:<n>`.
    Point(&'static str, u64),
    /// No crash point: `kill -9` from outside after this delay.
    External(Duration),
}

impl std::fmt::Display for Kill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kill::Point(p, n) => write!(f, "{p}:{n}"),
            Kill::External(d) => write!(f, "kill9@{}ms", d.as_millis()),
        }
    }
}

/// (round, kill, (id, copies)) of the first round after which an id was in the target twice.
type FirstDuplicate = Option<(usize, String, Vec<(String, i64)>)>;

/// What the chaos rounds saw.
struct Chaos {
    summary: Vec<String>,
    /// Kills after which rows were still missing from the target.
    kills_mid_load: usize,
    /// The first round after which some id was in the target twice: (round, kill, ids).
    first_duplicate: FirstDuplicate,
}

/// Starts and kills the daemon `rounds` times (see [`Kill`]); stops killing once `rows` rows
/// are in the target.
async fn chaos_rounds(env: &Env, settings: &Settings, rows: i64, rounds: usize) -> Chaos {
    // The points in rotation; every third round is an outside kill -9 instead.
    let mut rng = StdRng::seed_from_u64(0xC4A05);
    let mut next_point = 0usize;
    let mut summary: Vec<String> = Vec::new();
    let mut kills_mid_load = 0;
    let mut first_duplicate: FirstDuplicate = None;
    for round in 0..rounds {
        let (before, _) = env.loaded().await;
        if before >= rows {
            summary.push(format!("round {round}: skipped (all {rows} rows loaded)"));
            continue;
        }
        let kill = if round % 3 == 2 {
            Kill::External(Duration::from_millis(rng.random_range(300..=1500)))
        } else {
            let k = match next_point % 5 {
                0 => Kill::Point(conveyor::faults::AFTER_COMMIT, rng.random_range(2..=8)),
                1 => Kill::Point(conveyor::faults::BEFORE_ACK, rng.random_range(2..=5)),
                2 => Kill::Point(conveyor::faults::MID_CHECKPOINT, rng.random_range(1..=2)),
                3 => Kill::Point(conveyor::faults::HANDOFF, 1),
                _ => Kill::Point(conveyor::faults::MID_RECOVERY, 1),
            };
            next_point += 1;
            k
        };
        let t = Instant::now();
        let outcome = match &kill {
            Kill::Point(point, n) => {
                let spec = format!("{point}:{n}");
                let mut daemon = env.spawn_env(settings, &[("CONVEYOR_CRASH_AT", &spec)]);
                // A point that is not reached in time (mid_recovery with nothing to recover)
                // would let the round load everything: bound it tighter than the others.
                let bound = if *point == conveyor::faults::MID_RECOVERY {
                    Duration::from_secs(4)
                } else {
                    Duration::from_secs(15)
                };
                match wait_dead(&mut daemon, bound).await {
                    Some(status) => {
                        assert!(
                            killed_by_sigkill(&status)
                                && daemon.log_text().contains("crash point reached"),
                            "round {round} ({kill}): the daemon exited with {status:?} instead of reaching its crash point; log {}",
                            daemon.log.display()
                        );
                        "crashed at its point".to_string()
                    }
                    None => {
                        daemon.kill9();
                        "point not reached; kill -9".to_string()
                    }
                }
            }
            Kill::External(delay) => {
                let mut daemon = env.spawn(settings);
                tokio::time::sleep(*delay).await;
                if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                    panic!(
                        "round {round}: the daemon exited by itself with {status:?}; log {}",
                        daemon.log.display()
                    );
                }
                daemon.kill9();
                "kill -9".to_string()
            }
        };
        let (after, _) = env.loaded().await;
        // Rows only ever get added: fewer than all after the kill means fewer at the kill.
        let mid_load = after < rows;
        if mid_load {
            kills_mid_load += 1;
        }
        if first_duplicate.is_none() {
            let dups = duplicated_ids(env).await;
            if !dups.is_empty() {
                first_duplicate = Some((round, kill.to_string(), dups));
            }
        }
        summary.push(format!(
            "round {round:2}: {:<18} {outcome:<28} rows {before:>6} -> {after:>6}{} ({} ms)",
            kill.to_string(),
            if mid_load { "" } else { " (all loaded)" },
            t.elapsed().as_millis()
        ));
    }
    Chaos {
        summary,
        kills_mid_load,
        first_duplicate,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_chaos_loads_every_row_exactly_once_into_a_table_without_a_key() {
    const ROWS: i64 = 30_000;
    const ROUNDS: usize = 20;
    const FEED_RATE: u64 = 1_200;
    let started = Instant::now();
    let env = Env::new("chaos").await;
    // Without the key a reloaded row is a new row (the seed's MULTISET table): only the robust
    // marks stand between a crash and a duplicate.
    let mut db = support::pg().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {}.person DROP CONSTRAINT person_pkey",
        env.schema
    )))
    .execute(&mut db)
    .await
    .expect("drop the primary key");
    drop(db);
    let settings = Settings {
        pack: 200,
        sessions: 2,
        prefetch: 2000,
        extra: [
            "rotate_every = \"1s\"",
            "idle_eoj = \"0s\"",
            "checkpoint_interval = \"200ms\"",
            "checkpoint_rows = 1000",
        ]
        .join("\n"),
        ..Settings::default()
    };

    // A backlog of 30,000 rows loads in about two seconds even in the debug build: a kill
    // every round would find it loaded after three or four rounds. Publishing at a steady rate
    // meanwhile keeps rows arriving through all the rounds, so every kill lands mid-load.
    let (report, chaos) = tokio::join!(
        env.feed_rate(ROWS as u64, FEED_RATE, 0.0, 6_000_000, 31),
        chaos_rounds(&env, &settings, ROWS, ROUNDS)
    );
    println!(
        "fed {ROWS} rows at {FEED_RATE}/s; rounds done after {:?}",
        started.elapsed()
    );
    let Chaos {
        summary,
        kills_mid_load,
        first_duplicate,
    } = chaos;
    println!("chaos rounds:\n  {}", summary.join("\n  "));
    if let Some((round, kill, dups)) = &first_duplicate {
        panic!(
            "duplicates first seen after round {round} ({kill}): (id, copies) {dups:?}; daemon logs in {}",
            env.dir.display()
        );
    }
    assert!(
        kills_mid_load >= 10,
        "only {kills_mid_load} kills landed while rows were still missing (need 10)"
    );

    // A clean start recovers what the last kill left and loads the rest.
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(ROWS, Duration::from_secs(90)).await;
    // …and stays there: nothing is recovered or redelivered a second time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "clean exit; log {}",
        daemon.log.display()
    );
    let (n, sum) = env.loaded().await;
    let dups = duplicated_ids(&env).await;
    assert!(
        dups.is_empty(),
        "no id twice; (id, copies) {dups:?}; daemon logs in {}",
        env.dir.display()
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM (SELECT id FROM {schema}.person GROUP BY id HAVING count(*) <> 1) d")
            .await,
        0
    );
    assert_eq!(
        n,
        ROWS,
        "every row loaded once; logs in {}",
        env.dir.display()
    );
    assert_eq!(sum as u128, report.good_id_sum, "exactly the fed ids");
    assert!(
        env.error_codes().await.is_empty(),
        "no error rows: {:?}",
        env.error_codes().await
    );
    let crashed = env
        .scalar("SELECT count(*) FROM {schema}.jobs WHERE end_reason = 'crash'")
        .await;
    assert!(crashed >= 1, "crashed jobs are closed as such");
    let recovered = env
        .scalar("SELECT coalesce(sum(rows_recovered), 0)::int8 FROM {schema}.jobs")
        .await;
    assert_eq!(env.queue_depth().await, 0, "the queue is drained");
    println!(
        "{kills_mid_load} kills mid-load, {crashed} jobs closed as crashed, {recovered} rows recovered from spools; {:?} in all",
        started.elapsed()
    );
    env.cleanup().await;
}

const CRASHED_JOB: &str = "20261123_000000_person_01";
/// The hand-made spool's rows have ids `ID_BASE + seq`.
const ID_BASE: u64 = 7_000_000;
/// `x-queue-time` of every hand-made record: 2023-11-14 22:13:20 UTC.
const QUEUE_TIME_US: i64 = 1_700_000_000_000_000;

/// Writes a spool for [`CRASHED_JOB`] at `path` with records of sequence 1..=100 through the
/// daemon's own writer, and keeps the file (as a killed process would).
async fn write_spool(path: &Path) {
    let spool = Spool::open(
        SpoolOptions {
            spool: Some(path.to_path_buf()),
            journal: None,
            fsync_every: Duration::from_millis(2),
            fsync_rows: 100,
            pipeline: "person".into(),
            slot: "01".into(),
        },
        CRASHED_JOB,
    )
    .await
    .expect("open the spool");
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-queue-time"),
        AMQPValue::LongLongInt(QUEUE_TIME_US),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    let mut rng = StdRng::seed_from_u64(41);
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    for seq in 1..=100u64 {
        let body = conveyor::feed::person_row(ID_BASE + seq, &mut rng, None, None);
        spool
            .append(
                seq,
                record::delivery(Kind::Delivery, now_us, false, &props, &body),
            )
            .await
            .expect("append");
    }
    spool.sync().await;
    let mut durable = spool.durable();
    tokio::time::timeout(Duration::from_secs(10), durable.wait_for(|d| d.seq >= 100))
        .await
        .expect("the spool is durable in time")
        .map(|_| ())
        .expect("the writer is alive");
    spool.finish(false).await.expect("finish, keeping the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_spool_tail_loads_every_whole_record_once() {
    let started = Instant::now();
    let env = Env::new("corrupt").await;
    // conveyor's own tables first, so that robust marks can be written before the start.
    let config = env.write_config(&Settings::default());
    let (code, _, err) = support::cli(&config, &["migrate"]);
    assert_eq!(code, Some(0), "migrate: {err}");

    let path = conveyor::spool::spool_path(&env.state_dir(), "person", "01");
    assert_eq!(
        path,
        env.state_dir()
            .join("person")
            .join("01")
            .join("checkpoint.spool")
    );
    write_spool(&path).await;

    // Damage: one flipped byte in the middle of record 50's payload, and a tail torn in the
    // middle of record 100 (a write the crash interrupted).
    let mut bytes = std::fs::read(&path).expect("read the spool");
    let scan = frame::scan(&bytes);
    assert!(scan.damaged.is_empty(), "the writer's file is whole");
    assert_eq!(scan.records.len(), 101, "header + 100 records");
    assert_eq!(scan.records[0].seq, 0, "records[0] is the header");
    let r50 = scan.records[50].clone();
    assert_eq!(r50.seq, 50);
    let mid = r50.payload.start + r50.payload.len() / 2;
    bytes[mid] ^= 0x5A;
    let last = scan.records[100].clone();
    assert_eq!(last.seq, 100);
    let torn_at = last.at.start + last.at.len() / 2;
    bytes.truncate(torn_at);
    std::fs::write(&path, &bytes).expect("write the damaged spool");
    let damaged = conveyor::spool::read_file(&path)
        .expect("read the damaged spool")
        .expect("it exists");
    assert_eq!(damaged.job, CRASHED_JOB);
    let seqs: Vec<u64> = damaged.records().map(|(s, _)| s).collect();
    let whole: Vec<u64> = (1..=99).filter(|s| *s != 50).collect();
    assert_eq!(
        seqs, whole,
        "the scan skips the flipped and the torn record"
    );
    assert!(damaged.scan.damaged_bytes() > 0);

    // Records 1..=10 were committed before the "crash": their mark covers them, so recovery
    // skips them (they are deliberately not in the table, to see that they are not loaded).
    let mut db = support::pg().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.robust_log (job_name, batch_id, first_seq, last_seq, rows) VALUES ($1, 0, 1, 10, 10)",
        env.schema
    )))
    .bind(CRASHED_JOB)
    .execute(&mut db)
    .await
    .expect("insert the robust mark");
    drop(db);

    let mut daemon = env.spawn(&Settings::default());
    env.wait_for(
        "the crashed job to be recovered and closed",
        Duration::from_secs(60),
        || async {
            env.scalar(&format!(
                "SELECT count(*) FROM {{schema}}.jobs WHERE job_name = '{CRASHED_JOB}' AND end_reason = 'crash' AND status = 1"
            ))
            .await
                == 1
        },
    )
    .await;

    let expected: Vec<u64> = (11..=99).filter(|s| *s != 50).collect();
    assert_eq!(expected.len(), 88);
    let (n, sum) = env.loaded().await;
    assert_eq!(
        n,
        88,
        "100 records − 10 covered − 1 flipped − 1 torn; log {}",
        daemon.log.display()
    );
    assert_eq!(
        sum as u64,
        expected.iter().map(|s| ID_BASE + s).sum::<u64>()
    );
    let mut db = support::pg().await;
    let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id::text FROM {}.person ORDER BY id",
        env.schema
    )))
    .fetch_all(&mut db)
    .await
    .expect("read ids");
    drop(db);
    let want: Vec<String> = expected
        .iter()
        .map(|s| format!("{:020}", ID_BASE + s))
        .collect();
    assert_eq!(ids, want, "exactly the whole, uncovered records, once each");
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.person WHERE queue_time = to_timestamp({}) AT TIME ZONE 'UTC'",
            QUEUE_TIME_US / 1_000_000
        ))
        .await,
        88,
        "the spooled x-queue-time header is loaded as queue_time"
    );
    let job = |col: &str| {
        format!("SELECT {col}::int8 FROM {{schema}}.jobs WHERE job_name = '{CRASHED_JOB}'")
    };
    assert_eq!(env.scalar(&job("rows_recovered")).await, 88);
    assert_eq!(env.scalar(&job("restarts")).await, 1);
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.robust_log WHERE job_name = '{CRASHED_JOB}'"
        ))
        .await,
        0,
        "the recovered job's marks are deleted with its spool"
    );
    assert!(env.error_codes().await.is_empty());
    // The recovered spool is gone; slot 01 may already hold a fresh one for its new job.
    match conveyor::spool::read_file(&path).expect("read slot 01's spool") {
        None => {}
        Some(f) => assert_ne!(f.job, CRASHED_JOB, "the recovered spool was deleted"),
    }
    let log = daemon.log_text();
    assert!(
        log.contains("damaged"),
        "the damage is logged; log {}",
        daemon.log.display()
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.loaded().await.0, 88, "nothing more was loaded");
    println!("corrupt spool test took {:?}", started.elapsed());
    env.cleanup().await;
}
