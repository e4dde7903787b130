//! Job parameters, re-read at every job start (DESIGN §3): the config file's values, then the
//! pipeline's row in `conveyor.config`, where a NULL column keeps the file's value. What cannot
//! change without a restart (queue, target, URLs) is kept and reported.

use std::path::Path;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::Row;
use tracing::warn;

use crate::config::{Config, PipelineConfig};

/// The parameters for the next job of `current`'s pipeline.
pub async fn for_next_job(
    config: &Config,
    current: &PipelineConfig,
    conn: &mut PgConnection,
) -> PipelineConfig {
    let schema = config.schema.as_str();
    let mut p = if config.reloadable {
        from_file(&config.path, current)
    } else {
        current.clone()
    };
    if let Err(e) = apply_overrides(&mut p, schema, conn).await {
        warn!(pipeline = %p.name, error = %e, "cannot read conveyor.config overrides; using the file's values");
    }
    p
}

/// Re-reads the file; keeps `current` if the file is now invalid or lost the pipeline.
fn from_file(path: &Path, current: &PipelineConfig) -> PipelineConfig {
    let fresh = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            warn!(pipeline = %current.name, error = %e, "config file is invalid now; the next job keeps the previous parameters");
            return current.clone();
        }
    };
    let Some(mut p) = fresh.pipelines.into_iter().find(|p| p.name == current.name) else {
        warn!(pipeline = %current.name, "pipeline no longer in the config file; it keeps running with its previous parameters until restart");
        return current.clone();
    };
    if p.queue != current.queue
        || p.target_table != current.target_table
        || p.target_schema != current.target_schema
        || p.queue_declare != current.queue_declare
        || p.handoff != current.handoff
    {
        warn!(pipeline = %p.name, "queue, target, queue_declare or handoff changed in the config file: these need a restart; keeping the running values");
        p.queue = current.queue.clone();
        p.target_table = current.target_table.clone();
        p.target_schema = current.target_schema.clone();
        p.queue_declare = current.queue_declare;
        p.handoff = current.handoff;
    }
    p
}

async fn apply_overrides(
    p: &mut PipelineConfig,
    schema: &str,
    conn: &mut PgConnection,
) -> Result<(), sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pack, latency_ms, sessions, rotate_every_s, idle_eoj_s, max_rows, depth_threshold,
                priority_pack, priority_sessions
         FROM {}.config WHERE pipeline = $1",
        crate::db::quote_ident(schema)
    )))
    .bind(&p.name)
    .fetch_optional(conn)
    .await?;
    let Some(r) = row else { return Ok(()) };
    let int = |name: &str| r.try_get::<Option<i32>, _>(name).ok().flatten();
    let big = |name: &str| r.try_get::<Option<i64>, _>(name).ok().flatten();
    if let Some(v) = int("pack") {
        p.pack = v as usize;
    }
    if let Some(v) = int("latency_ms") {
        p.latency = Duration::from_millis(v as u64);
    }
    if let Some(v) = int("sessions") {
        p.sessions = v as usize;
    }
    if let Some(v) = int("rotate_every_s") {
        p.rotate_every = (v > 0).then(|| Duration::from_secs(v as u64));
    }
    if let Some(v) = int("idle_eoj_s") {
        p.idle_eoj = (v > 0).then(|| Duration::from_secs(v as u64));
    }
    if let Some(v) = big("max_rows") {
        p.max_rows = (v > 0).then_some(v as u64);
    }
    if let Some(v) = big("depth_threshold") {
        p.depth_threshold = (v > 0).then_some(v as u64);
    }
    if let Some(v) = int("priority_pack") {
        p.priority_pack = Some(v as usize);
    }
    if let Some(v) = int("priority_sessions") {
        p.priority_sessions = Some(v as usize);
    }
    Ok(())
}
