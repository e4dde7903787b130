//! Scale-out as DESIGN §7 lays it out, on this machine: one stream sharded over 4 quorum queues
//! by RabbitMQ's consistent-hash exchange, one pipeline per shard, the pipelines spread over 3
//! `conveyor run` processes so that each shard's standby lives in another process than its
//! active worker. One process is killed (a real SIGKILL, aimed just after a batch committed and
//! before its ack); the standbys in the other processes take its shards over and every row is
//! loaded exactly once, without restarting it.

mod support;

use std::time::Duration;

use conveyor::config::{QueueDeclare, SecretUrl};
use support::{Daemon, Env};

const SHARDS: usize = 4;
const PROCESSES: usize = 3;
const ROWS: u64 = 20_000;

/// The processes that host shard `k`: its first is started first, so it holds the shard.
fn hosts(k: usize) -> [usize; 2] {
    [k % PROCESSES, (k + 1) % PROCESSES]
}

fn config(env: &Env, process: usize, queues: &[String]) -> String {
    let mut text = format!(
        "[amqp]\nurl = \"{amqp}\"\n[database]\nurl = \"{pg}\"\nschema = \"{schema}\"\nconnect_timeout_ms = 2000\n[http]\nlisten = \"\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n[state]\ndir = {state:?}\n[report]\ndir = {report:?}\n",
        amqp = support::AMQP_URL,
        pg = support::PG_URL,
        schema = env.schema,
        state = env.dir.join(format!("state-{process}")).display().to_string(),
        report = env.dir.join(format!("report-{process}")).display().to_string(),
    );
    for (k, q) in queues.iter().enumerate() {
        if hosts(k).contains(&process) {
            text.push_str(&format!(
                "\n[[pipeline]]\nname = \"shard{k}\"\nqueue = \"{q}\"\nqueue_declare = \"quorum\"\ntarget = \"{}.person\"\ndurability = \"broker\"\npack = 200\nlatency_ms = 50\nsessions = 1\nprefetch = 1000\nqueue_time_column = \"queue_time\"\n",
                env.schema
            ));
        }
    }
    text
}

fn spawn(env: &Env, process: usize, queues: &[String], vars: &[(&str, &str)]) -> Daemon {
    let path = env.dir.join(format!("conveyor-{process}.toml"));
    std::fs::write(&path, config(env, process, queues)).expect("write config");
    env.spawn_config(&path, vars)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_four_shards_one_killed_every_row_once() {
    let env = Env::new("scale").await;
    let exchange = format!("{}.hash", env.queue);
    let queues: Vec<String> = (0..SHARDS).map(|k| format!("{}.s{k}", env.queue)).collect();

    // The topology an operator declares once (docs/scaling.md).
    let amqp = conveyor::source::connect(&SecretUrl::new(support::AMQP_URL), "test-scaleout")
        .await
        .expect("amqp connect");
    let ch = amqp.create_channel().await.expect("channel");
    let _topology = Topology {
        exchange: exchange.clone(),
        queues: queues.clone(),
    };
    conveyor::source::declare_sharded(&ch, &exchange, &queues, QueueDeclare::Quorum)
        .await
        .expect("declare the sharded stream");

    // Process 0 starts first, so it holds shards 0, 2 and 3 (their standbys: processes 1, 2, 0's
    // partner); it dies just after its 5th batch commit, before that batch's ack.
    let mut daemons = vec![spawn(
        &env,
        0,
        &queues,
        &[("CONVEYOR_CRASH_AT", "after_commit:5")],
    )];
    daemons[0]
        .wait_log("every worker registered", Duration::from_secs(60))
        .await;
    for p in 1..PROCESSES {
        daemons.push(spawn(&env, p, &queues, &[]));
        daemons[p]
            .wait_log("every worker registered", Duration::from_secs(60))
            .await;
    }

    // The stream, routed by message id: one message always lands in the same shard.
    conveyor::feed::run(conveyor::feed::FeedOptions {
        amqp_url: SecretUrl::new(support::AMQP_URL),
        queue: env.queue.clone(),
        declare: QueueDeclare::Passive,
        count: ROWS,
        rate: 0,
        errors_pct: 0.0,
        file: None,
        seed: 7,
        id_base: 1,
        progress: false,
        exchange: Some(exchange.clone()),
    })
    .await
    .expect("feed the sharded stream");

    let code = daemons[0].wait_exit(Duration::from_secs(120)).await;
    assert_eq!(
        code, None,
        "process 0 was killed by its crash point (SIGKILL)"
    );
    assert!(daemons[0].log_text().contains("crash point reached"));
    env.wait_for("every row loaded", Duration::from_secs(180), || async {
        env.loaded().await.0 >= ROWS as i64
    })
    .await;
    for q in &queues {
        let depth =
            conveyor::source::declare_queue(&ch, q, conveyor::config::QueueDeclare::Passive)
                .await
                .expect("shard queue");
        assert_eq!(depth, 0, "shard {q} drained");
    }
    // A moment for a redelivered duplicate to show up, were one to slip through.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.loaded().await,
        (ROWS as i64, (1..=ROWS as i64).sum()),
        "every row exactly once"
    );
    assert!(
        env.error_codes().await.is_empty(),
        "{:?}",
        env.error_codes().await
    );
    let per_shard: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT pipeline, count(*) FILTER (WHERE activated_at IS NOT NULL)::int8 FROM {}.jobs GROUP BY pipeline ORDER BY pipeline",
        env.schema
    )))
    .fetch_all(&mut support::pg().await)
    .await
    .expect("jobs per shard");
    assert_eq!(
        per_shard.len(),
        SHARDS,
        "every shard ran jobs: {per_shard:?}"
    );
    // Shards 0, 2 and 3 were taken over by another process after the kill.
    let pid0 = daemons[0].child.id() as i32;
    for k in [0, 2, 3] {
        let took_over: i64 = env
            .scalar(&format!(
                "SELECT count(*) FROM {{schema}}.jobs WHERE pipeline = 'shard{k}' AND activated_at IS NOT NULL AND pid <> {pid0}"
            ))
            .await;
        assert!(took_over >= 1, "shard{k} taken over by another process");
    }
    for d in daemons.iter().skip(1) {
        d.sigterm();
    }
    for d in daemons.iter_mut().skip(1) {
        assert_eq!(d.wait_exit(Duration::from_secs(30)).await, Some(0));
    }
    let _ = amqp.close(200, "done".into()).await;
    env.cleanup().await;
}

/// The shard queues and the exchange, deleted when the test ends, failed or not.
struct Topology {
    exchange: String,
    queues: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let (exchange, queues) = (self.exchange.clone(), self.queues.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let url = SecretUrl::new(support::AMQP_URL);
                let Ok(conn) = conveyor::source::connect(&url, "test-cleanup").await else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    conveyor::source::delete_sharded(&ch, &exchange, &queues).await;
                }
                let _ = conn.close(200, "done".into()).await;
            });
        })
        .join();
    }
}
