//! `conveyor migrate` creates conveyor's objects in the configured schema and is idempotent.

mod support;

use std::process::Command;

use support::{Env, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_idempotent_and_creates_the_tables() {
    let env = Env::new("migrate").await;
    let config = env.write_config(&Settings::default());
    for round in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .arg("--config")
            .arg(&config)
            .arg("migrate")
            .output()
            .expect("run conveyor migrate");
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
    }
    let tables = env
        .scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}' AND table_name IN ('jobs', 'robust_log', '_sqlx_migrations', 'config')")
        .await;
    assert_eq!(tables, 4);
    let applied = env
        .scalar("SELECT count(*) FROM {schema}._sqlx_migrations")
        .await;
    assert_eq!(
        applied,
        conveyor::db::MIGRATOR.iter().count() as i64,
        "each migration recorded once"
    );
    env.cleanup().await;
}
