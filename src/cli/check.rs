//! `conveyor check`: everything `conveyor run` would trip over, found before it runs — the
//! config, each pipeline's queue (exists or will be declared, its type and
//! single-active-consumer), its target table (exists, the messages' fields map onto its
//! columns, the privileges conveyor needs) and the free space where the spools and journals go.
//!
//! Read-only, with one exception: when the management API cannot be reached, an existing
//! queue's type is checked by declaring it again with the arguments conveyor would use. The
//! broker answers PRECONDITION_FAILED if they differ and changes nothing if they match, which is
//! exactly the declare `conveyor run` does at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::config::{Config, ConfigError, Handoff, PipelineConfig, QueueDeclare};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Check only this pipeline (default: every pipeline in the config).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Print {pipelines:[{name, plan, problems}], problems, warnings, disk} as JSON instead of
    /// text; `problems` lists every pipeline's problems too (empty = ready to run).
    #[arg(long)]
    pub json: bool,
}

/// Free space below which a spool or journal directory gets a warning: a spool holds every row
/// since the last checkpoint, and a full disk stops acking (DESIGN §5).
const LOW_DISK: u64 = 1 << 30;

/// Port of RabbitMQ's management plugin, the only place a queue's arguments can be read.
const MANAGEMENT_PORT: u16 = 15672;

#[derive(Debug, Default, Serialize)]
struct Report {
    pipelines: Vec<PipelineReport>,
    /// Every problem (config, disk and each pipeline's, prefixed with its name): exit 1 if any.
    problems: Vec<String>,
    /// Worth knowing, not blocking (e.g. little free disk).
    warnings: Vec<String>,
    disk: Vec<Disk>,
}

#[derive(Debug, Serialize)]
struct PipelineReport {
    name: String,
    plan: Plan,
    problems: Vec<String>,
    warnings: Vec<String>,
}

/// What `conveyor run` will do for one pipeline, with what the check found.
#[derive(Debug, Serialize)]
struct Plan {
    queue: String,
    target: String,
    queue_declare: &'static str,
    /// "exists, N ready, M consumers", "missing: will be declared (…)", or why unknown.
    queue_state: String,
    /// The queue's type and single-active-consumer, or why they were not checked.
    queue_type: String,
    durability: crate::config::Durability,
    mode: crate::config::LoadMode,
    handoff: crate::config::Handoff,
    pack: usize,
    sessions: usize,
    prefetch: u16,
    latency_ms: u128,
    rotate_every: String,
    idle_eoj: String,
    journal: bool,
    /// Columns of the target table (None: not read).
    columns: Option<usize>,
    /// Columns conveyor writes (the COPY columns); the others the database fills.
    columns_mapped: Option<usize>,
    unique_keys: Vec<String>,
    /// A routed pipeline's steps: each route (table, rule, mode) and post-job step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps: Vec<String>,
    /// conveyor's own schema (jobs, error tables): ready, or created by `conveyor run`.
    conveyor_schema: String,
}

#[derive(Debug, Serialize)]
struct Disk {
    what: &'static str,
    dir: PathBuf,
    /// Free bytes for an unprivileged user; None when the filesystem could not be read.
    free_bytes: Option<u64>,
}

pub async fn run(config_path: &Path, args: CheckArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    match Config::load(config_path) {
        Ok(config) => {
            // lapin logs every channel the broker closes; check closes some on purpose (a passive
            // declare of a missing queue) and reports every AMQP error itself.
            super::init_logging(config.log_format, "warn,lapin=off");
            check_config(&config, args.pipeline.as_deref(), &mut report).await;
        }
        Err(e) => {
            super::init_logging(crate::config::LogFormat::Pretty, "warn,lapin=off");
            match e {
                // One problem per entry: Config::load already collected all of them.
                ConfigError::Invalid { path, problems } => report.problems.extend(
                    problems
                        .into_iter()
                        .map(|p| format!("config {}: {p}", path.display())),
                ),
                other => report.problems.push(format!("config: {other}")),
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(super::Exit::new(
            1,
            format!(
                "{} problem(s) found (listed above): fix them and run `conveyor check` again",
                report.problems.len()
            ),
        )
        .into())
    }
}

async fn check_config(config: &Config, only: Option<&str>, report: &mut Report) {
    let pipelines: Vec<&PipelineConfig> = match only {
        Some(_) => match super::pick_pipeline(config, only) {
            Ok(p) => vec![p],
            Err(e) => {
                let names: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
                report
                    .problems
                    .push(format!("{e} (configured: {})", names.join(", ")));
                return;
            }
        },
        None => config.pipelines.iter().collect(),
    };
    for p in pipelines {
        let r = check_pipeline(config, p).await;
        report.problems.extend(
            r.problems
                .iter()
                .map(|x| format!("pipeline {}: {x}", r.name)),
        );
        report.warnings.extend(
            r.warnings
                .iter()
                .map(|x| format!("pipeline {}: {x}", r.name)),
        );
        report.pipelines.push(r);
    }
    let mut dirs = vec![("state dir", &config.state_dir)];
    if config.pipelines.iter().any(|p| p.journal) {
        dirs.push(("journal dir", &config.journal_dir));
    }
    for (what, dir) in dirs {
        let free = free_bytes(dir);
        match &free {
            Ok(n) if *n < LOW_DISK => report.warnings.push(format!(
                "{what} {}: only {} MiB free (under 1 GiB); a full disk stops the spool, and with it the acks",
                dir.display(),
                *n >> 20
            )),
            Ok(_) => {}
            Err(e) => report.warnings.push(format!(
                "{what} {}: cannot read its filesystem's free space: {e}",
                dir.display()
            )),
        }
        report.disk.push(Disk {
            what,
            dir: dir.clone(),
            free_bytes: free.ok(),
        });
    }
}

fn declare_name(d: QueueDeclare) -> &'static str {
    match d {
        QueueDeclare::Quorum => "quorum",
        QueueDeclare::Classic => "classic",
        QueueDeclare::Passive => "passive",
    }
}

fn never_or(d: Option<Duration>) -> String {
    d.map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "never".into())
}

async fn check_pipeline(config: &Config, p: &PipelineConfig) -> PipelineReport {
    let target = match &p.target_schema {
        Some(s) => format!("{s}.{}", p.target_table),
        None => p.target_table.clone(),
    };
    let mut r = PipelineReport {
        name: p.name.clone(),
        plan: Plan {
            queue: p.queue.clone(),
            target,
            queue_declare: declare_name(p.queue_declare),
            queue_state: "not checked".into(),
            queue_type: "not checked".into(),
            durability: p.durability,
            mode: p.mode,
            handoff: p.handoff,
            pack: p.pack,
            sessions: p.sessions,
            prefetch: p.prefetch,
            latency_ms: p.latency.as_millis(),
            rotate_every: never_or(p.rotate_every),
            idle_eoj: never_or(p.idle_eoj),
            journal: p.journal,
            columns: None,
            columns_mapped: None,
            unique_keys: Vec::new(),
            steps: Vec::new(),
            conveyor_schema: "not checked".into(),
        },
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    check_queue(config, p, &mut r).await;
    check_table(config, p, &mut r).await;
    r
}

// ---- RabbitMQ ----------------------------------------------------------------------------

async fn check_queue(config: &Config, p: &PipelineConfig, r: &mut PipelineReport) {
    let url = &config.amqp_url;
    let conn = match tokio::time::timeout(
        config.connect_timeout,
        crate::source::connect(url, "conveyor-check"),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(crate::source::SourceError::Connect { source, .. })) => {
            r.problems.push(format!(
                "RabbitMQ unreachable at {url}: {source} (is RabbitMQ running? fix amqp.url / CONVEYOR_AMQP_URL)"
            ));
            return;
        }
        Ok(Err(e)) => {
            r.problems
                .push(format!("RabbitMQ unreachable at {url}: {e}"));
            return;
        }
        Err(_) => {
            r.problems.push(format!(
                "RabbitMQ unreachable at {url}: no answer within {:?} (check the host and port)",
                config.connect_timeout
            ));
            return;
        }
    };
    queue_checks(&conn, config, p, r).await;
    let _ = conn.close(200, "check done".into()).await;
}

async fn queue_checks(
    conn: &lapin::Connection,
    config: &Config,
    p: &PipelineConfig,
    r: &mut PipelineReport,
) {
    // A failed declare closes its channel, so every declare gets a channel of its own.
    let channel = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => {
            r.problems.push(format!("cannot open an AMQP channel: {e}"));
            return;
        }
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = &p.queue;
    match channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => {
            r.plan.queue_state = format!(
                "exists, {} ready, {} consumer(s)",
                q.message_count(),
                q.consumer_count()
            );
        }
        Err(e) if e.to_string().contains("NOT_FOUND") => {
            if p.queue_declare == QueueDeclare::Passive {
                r.plan.queue_state = "missing".into();
                r.problems.push(format!(
                    "queue {queue:?} does not exist and queue_declare = \"passive\": create it (durable, x-single-active-consumer), or set queue_declare = \"quorum\" to let conveyor declare it"
                ));
            } else {
                r.plan.queue_state = format!(
                    "missing: will be declared ({}, durable, single-active-consumer)",
                    declare_name(p.queue_declare)
                );
                r.plan.queue_type = format!("{} (will be declared)", declare_name(p.queue_declare));
            }
            return;
        }
        Err(e) => {
            r.problems
                .push(format!("cannot check queue {queue:?}: {e}"));
            return;
        }
    }
    let expected = match p.queue_declare {
        QueueDeclare::Quorum => Some("quorum"),
        QueueDeclare::Classic => Some("classic"),
        QueueDeclare::Passive => None,
    };
    match management_queue(config, queue).await {
        Ok(info) => {
            r.plan.queue_type = format!(
                "{}, single-active-consumer {}",
                info.kind,
                if info.single_active { "on" } else { "off" }
            );
            if let Some(expected) = expected {
                if info.kind != expected {
                    r.problems.push(format!(
                        "wrong queue type: queue {queue:?} is a {} queue but queue_declare = \"{expected}\"; `conveyor run` would fail to declare it. Delete the queue (after draining it) or set queue_declare to match",
                        info.kind
                    ));
                }
            }
            if !info.single_active && p.handoff == Handoff::SingleActive {
                r.problems.push(format!(
                    "queue {queue:?} has no x-single-active-consumer but handoff = \"single_active\": both workers would consume at once. Re-create the queue with it, or set handoff = \"exclusive\""
                ));
            }
        }
        Err(why) => match p.queue_declare {
            QueueDeclare::Passive => {
                r.plan.queue_type = format!("not checked (management API unreachable: {why})");
            }
            declare => {
                // The same declare `conveyor run` does: equal arguments change nothing,
                // different ones are refused with the argument's name.
                r.plan.queue_type = equivalent_declare(conn, queue, declare, r, &why).await;
            }
        },
    }
}

async fn equivalent_declare(
    conn: &lapin::Connection,
    queue: &str,
    declare: QueueDeclare,
    r: &mut PipelineReport,
    why: &str,
) -> String {
    let name = declare_name(declare);
    let channel = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return format!("not checked (management API unreachable: {why}; {e})"),
    };
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match channel
        .queue_declare(
            queue.into(),
            opts,
            crate::source::queue_arguments(declare),
        )
        .await
    {
        Ok(_) => format!(
            "{name}, single-active-consumer on (the broker accepted conveyor's declare; management API unreachable)"
        ),
        Err(e) => {
            let text = e.to_string();
            // The broker names only the first argument that differs: find the queue's type and
            // single-active-consumer by declares that change nothing, refused until one matches.
            match probe_arguments(conn, queue).await {
                Some(info) if info.kind != name => {
                    r.problems.push(format!(
                        "wrong queue type: queue {queue:?} is a {} queue but queue_declare = \"{name}\"; `conveyor run` would fail to declare it. Delete the queue (after draining it) or set queue_declare to match",
                        info.kind
                    ));
                    format!(
                        "{}, single-active-consumer {} (found by declares; management API unreachable)",
                        info.kind,
                        if info.single_active { "on" } else { "off" }
                    )
                }
                Some(info) if !info.single_active => {
                    r.problems.push(format!(
                        "queue {queue:?} has no x-single-active-consumer, which conveyor declares: `conveyor run` would fail to declare it. Delete the queue (after draining it) so conveyor re-creates it"
                    ));
                    format!("{}, single-active-consumer off", info.kind)
                }
                _ => {
                    r.problems.push(format!(
                        "queue {queue:?} exists with other arguments than conveyor declares for queue_declare = \"{name}\" (broker: {text}); delete it or set queue_declare to match"
                    ));
                    "arguments differ (see problems)".into()
                }
            }
        }
    }
}

/// The type and single-active-consumer of an existing queue, found without the management API:
/// a declare whose arguments equal the queue's succeeds and changes nothing; any other is
/// refused (PRECONDITION_FAILED, on a channel of its own). None if no candidate matched (the
/// queue has other arguments too, e.g. x-max-length).
async fn probe_arguments(conn: &lapin::Connection, queue: &str) -> Option<QueueInfo> {
    use lapin::types::AMQPValue;
    for kind in [Some("quorum"), Some("classic"), None, Some("stream")] {
        for single_active in [true, false] {
            let mut args = FieldTable::default();
            if let Some(k) = kind {
                args.insert("x-queue-type".into(), AMQPValue::LongString(k.into()));
            }
            if single_active {
                args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            }
            let Ok(channel) = conn.create_channel().await else {
                return None;
            };
            let opts = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            if channel
                .queue_declare(queue.into(), opts, args)
                .await
                .is_ok()
            {
                let _ = channel.close(200, "probe done".into()).await;
                return Some(QueueInfo {
                    kind: kind.unwrap_or("classic").to_string(),
                    single_active,
                });
            }
        }
    }
    None
}

/// What the management API says about a queue.
#[derive(Debug)]
struct QueueInfo {
    kind: String,
    single_active: bool,
}

/// Reads the queue from the management API on the AMQP URL's host, port 15672, with the AMQP
/// URL's credentials (guest/guest by default). Err says why it could not be read.
async fn management_queue(config: &Config, queue: &str) -> Result<QueueInfo, String> {
    let url = url::Url::parse(config.amqp_url.expose()).map_err(|e| e.to_string())?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let user = match url.username() {
        "" => "guest".to_string(),
        u => decode(u),
    };
    let password = url.password().map(decode).unwrap_or_else(|| "guest".into());
    let vhost = match url.path().trim_start_matches('/') {
        "" => "/".to_string(),
        v => decode(v),
    };
    let path = format!("/api/queues/{}/{}", encode(&vhost), encode(queue));
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(3),
        http_get(&host, MANAGEMENT_PORT, &path, &user, &password),
    )
    .await
    .map_err(|_| format!("no answer from {host}:{MANAGEMENT_PORT} within 3 s"))?
    .map_err(|e| format!("{host}:{MANAGEMENT_PORT}: {e}"))?;
    if status != 200 {
        return Err(format!("GET {path} answered HTTP {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))?;
    let args = &v["arguments"];
    let kind = v["type"]
        .as_str()
        .or_else(|| args["x-queue-type"].as_str())
        .unwrap_or("classic")
        .to_string();
    Ok(QueueInfo {
        kind,
        single_active: args["x-single-active-consumer"].as_bool().unwrap_or(false),
    })
}

/// Percent-encodes a path segment (the vhost "/" becomes %2F).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One GET with basic auth. conveyor has no HTTP client crate (only axum, a server), and one
/// request does not justify one: this is a raw request over a TcpStream. It asks for HTTP/1.0
/// so the answer is never chunked and ends when the server closes the connection.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    user: &str,
    password: &str,
) -> std::io::Result<(u16, String)> {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAuthorization: Basic {auth}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    Ok((status, body.to_string()))
}

// ---- PostgreSQL --------------------------------------------------------------------------

async fn check_table(config: &Config, p: &PipelineConfig, r: &mut PipelineReport) {
    let mut db = match crate::db::connect(&config.database_url, config.connect_timeout).await {
        Ok(db) => db,
        Err(e) => {
            r.problems.push(format!("PostgreSQL unreachable: {e}"));
            return;
        }
    };
    table_checks(&mut db, config, p, r).await;
    use sqlx::Connection;
    let _ = db.close().await;
}

async fn table_checks(
    db: &mut sqlx::PgConnection,
    config: &Config,
    p: &PipelineConfig,
    r: &mut PipelineReport,
) {
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *db)
        .await
        .unwrap_or_else(|_| "the database user".into());
    schema_checks(db, config, &user, r).await;
    if !p.routes.is_empty() {
        route_checks(db, p, &user, r).await;
        return;
    }
    let columns = match crate::sink::catalog::read_columns(
        db,
        p.target_schema.as_deref(),
        &p.target_table,
    )
    .await
    {
        Ok(c) => c,
        Err(crate::sink::SinkError::NoTable { table }) => {
            r.problems.push(format!(
                    "target table {table} does not exist: create it (e.g. deploy/sql/person.sql), or fix the pipeline's target = {:?}",
                    r.plan.target
                ));
            return;
        }
        Err(e) => {
            r.problems
                .push(format!("cannot read the columns of {}: {e}", r.plan.target));
            return;
        }
    };
    r.plan.columns = Some(columns.len());
    let qualified = match &p.target_schema {
        Some(s) => format!(
            "{}.{}",
            crate::db::quote_ident(s),
            crate::db::quote_ident(&p.target_table)
        ),
        None => crate::db::quote_ident(&p.target_table),
    };
    match sqlx::query_scalar::<_, bool>("SELECT has_table_privilege($1, 'INSERT')")
        .bind(&qualified)
        .fetch_one(&mut *db)
        .await
    {
        Ok(true) => {}
        Ok(false) => r.problems.push(format!(
            "{user} may not INSERT into {}: GRANT INSERT ON {qualified} TO {user}",
            r.plan.target
        )),
        Err(e) => r.problems.push(format!(
            "cannot check the INSERT privilege on {}: {e}",
            r.plan.target
        )),
    }
    let decoder = match crate::decode::Decoder::new(&columns, p) {
        Ok(d) => d,
        Err(e) => {
            r.problems.push(format!(
                "the pipeline does not fit table {}: {e}",
                r.plan.target
            ));
            return;
        }
    };
    let copy: Vec<&str> = decoder.copy_columns().collect();
    r.plan.columns_mapped = Some(copy.len());
    for c in unfillable(&columns, p) {
        let col = columns.iter().find(|x| x.name == c);
        if col.is_some_and(|x| x.not_null) {
            r.problems.push(format!(
                "column {c:?} of {} is NOT NULL without a default, and no field fills it (a rename took its field): every row would be rejected. Map a field to it in [pipeline.rename]",
                r.plan.target
            ));
        } else {
            r.warnings.push(format!(
                "column {c:?} of {} is filled by no field (a rename took its field): it stays NULL",
                r.plan.target
            ));
        }
    }
    match crate::sink::keys::read_unique_keys(db, &qualified, &copy).await {
        Ok(keys) => {
            r.plan.unique_keys = keys
                .iter()
                .map(|k| format!("{} ({})", k.name, k.columns.join(", ")))
                .collect()
        }
        Err(e) => r.warnings.push(format!(
            "cannot read the unique keys of {}: {e}",
            r.plan.target
        )),
    }
}

/// A routed pipeline: every route's table exists, fits the route (keys, identity, job column)
/// and may be written; the identity tables exist; the post steps are listed.
async fn route_checks(
    db: &mut sqlx::PgConnection,
    p: &PipelineConfig,
    user: &str,
    r: &mut PipelineReport,
) {
    for route in &p.routes {
        let table = route.table_display();
        let rule = match (&route.when, &route.part) {
            (Some((f, v)), Some(part)) => format!("{f} = {v}, part {part}"),
            (Some((f, v)), None) => format!("{f} = {v}"),
            (None, Some(part)) => format!("part {part}"),
            (None, None) => "every message".into(),
        };
        r.plan.steps.push(format!(
            "step {}: {table} ({rule}; {:?}{}{})",
            route.step,
            route.mode,
            route
                .identity
                .as_ref()
                .map(|i| format!("; {} from {}.{} by {}", i.column, i.table, i.value, i.by))
                .unwrap_or_default(),
            if route.journal.is_empty() {
                String::new()
            } else {
                format!("; journal for {}", route.journal.join(", "))
            }
        ));
        if let Some(id) = &route.identity {
            let (schema, t) =
                crate::config::split_table(&id.table).unwrap_or((None, id.table.clone()));
            if let Err(e) = crate::sink::catalog::read_columns(db, schema.as_deref(), &t).await {
                r.problems.push(format!(
                    "step {}: identity table {}: {e}",
                    route.step, id.table
                ));
            }
        }
        let mut one = p.clone();
        one.routes = vec![route.clone()];
        match crate::sink::routed::Routes::check(db, &one).await {
            Ok(()) => {}
            Err(crate::sink::SinkError::NoTable { table }) => r.problems.push(format!(
                "step {}: table {table} does not exist: create it, or fix the route's table",
                route.step
            )),
            Err(e) => r.problems.push(format!("step {}: {e}", route.step)),
        }
        let privileges = if route.mode == crate::config::RouteMode::Upsert {
            "INSERT, UPDATE"
        } else {
            "INSERT"
        };
        match sqlx::query_scalar::<_, bool>("SELECT has_table_privilege($1, $2)")
            .bind(&table)
            .bind(privileges)
            .fetch_one(&mut *db)
            .await
        {
            Ok(true) => {}
            Ok(false) => r.problems.push(format!(
                "step {}: {user} may not {privileges} {table}: GRANT {privileges} ON {table} TO {user}",
                route.step
            )),
            Err(_) => {}
        }
    }
    for x in &p.post_steps {
        r.plan.steps.push(format!(
            "step {}: after each job: {} ({})",
            x.step, x.name, x.sql
        ));
    }
}

/// COPY columns that no JSON field reaches: the mapping `Decoder::new` builds (each column by
/// its own name, except the queue-time column; a rename moves a column to another field and
/// takes it from its own name), replayed here because the decoder keeps it private.
fn unfillable(columns: &[crate::decode::Column], p: &PipelineConfig) -> Vec<String> {
    let qt = p.queue_time_column.as_deref().map(str::to_lowercase);
    let copy: Vec<String> = columns
        .iter()
        .filter(|c| !c.db_filled || qt.as_deref() == Some(c.name.as_str()))
        .map(|c| c.name.to_lowercase())
        .collect();
    let mut fields: std::collections::HashMap<String, String> = copy
        .iter()
        .filter(|c| qt.as_deref() != Some(c.as_str()))
        .map(|c| (c.clone(), c.clone()))
        .collect();
    for (field, column) in &p.rename {
        fields.retain(|_, v| v != column || qt.as_deref() == Some(v.as_str()));
        fields.insert(field.clone(), column.clone());
    }
    copy.into_iter()
        .filter(|c| qt.as_deref() != Some(c.as_str()) && !fields.values().any(|v| v == c))
        .collect()
}

/// conveyor's schema: error tables `et_<job>`/`uv_<job>` are created there at every job start.
async fn schema_checks(
    db: &mut sqlx::PgConnection,
    config: &Config,
    user: &str,
    r: &mut PipelineReport,
) {
    let schema = &config.schema;
    let exists: Result<bool, _> =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *db)
            .await;
    let sql = match exists {
        Ok(true) => "SELECT has_schema_privilege($1, 'CREATE')",
        Ok(false) => "SELECT has_database_privilege(current_database(), 'CREATE')",
        Err(e) => {
            r.problems
                .push(format!("cannot look up schema {schema:?}: {e}"));
            return;
        }
    };
    let exists = exists.unwrap_or(false);
    let mut q = sqlx::query_scalar::<_, bool>(sql);
    if exists {
        q = q.bind(schema);
    }
    match q.fetch_one(&mut *db).await {
        Ok(true) if exists => r.plan.conveyor_schema = format!("{schema} (exists)"),
        Ok(true) => {
            r.plan.conveyor_schema =
                format!("{schema} (missing: `conveyor run` or `conveyor migrate` creates it)")
        }
        Ok(false) if exists => {
            r.plan.conveyor_schema = format!("{schema} (exists, no CREATE)");
            r.problems.push(format!(
                "{user} may not CREATE in schema {schema} (each job creates its error tables there): GRANT CREATE ON SCHEMA {schema} TO {user}"
            ));
        }
        Ok(false) => {
            r.plan.conveyor_schema = format!("{schema} (missing)");
            r.problems.push(format!(
                "schema {schema} does not exist and {user} may not create it: run `conveyor migrate` as the database owner, then GRANT CREATE ON SCHEMA {schema} TO {user}"
            ));
        }
        Err(e) => r
            .problems
            .push(format!("cannot check privileges on schema {schema:?}: {e}")),
    }
}

// ---- Disk --------------------------------------------------------------------------------

/// Free bytes (for an unprivileged user) of the filesystem `dir` is or will be on: `dir` may
/// not exist yet (conveyor creates it), so its nearest existing ancestor is asked.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(dir)
    };
    let existing = abs
        .ancestors()
        .find(|a| a.exists())
        .ok_or_else(|| std::io::Error::other("no existing ancestor"))?;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: `c` is a NUL-terminated path and `st` a zeroed statvfs that the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

// ---- Output ------------------------------------------------------------------------------

/// A setting as it is written in the config file (`spool`, `insert_ignore`, …).
fn wire<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

fn print_text(report: &Report) {
    for r in &report.pipelines {
        let p = &r.plan;
        println!(
            "pipeline {}: queue {} → table {}",
            r.name, p.queue, p.target
        );
        println!(
            "  queue         {} (queue_declare = {})",
            p.queue_state, p.queue_declare
        );
        println!("  queue type    {}", p.queue_type);
        println!(
            "  durability    {}, mode {}, handoff {}",
            wire(&p.durability),
            wire(&p.mode),
            wire(&p.handoff)
        );
        println!(
            "  batches       pack {} rows or {} ms, {} session(s), prefetch {}",
            p.pack, p.latency_ms, p.sessions, p.prefetch
        );
        println!(
            "  jobs          rotate every {}, idle end after {}, journal {}",
            p.rotate_every,
            p.idle_eoj,
            if p.journal { "on" } else { "off" }
        );
        match (p.columns_mapped, p.columns) {
            (Some(m), Some(n)) => {
                println!("  columns       {m} mapped of {n} (the others the database fills)")
            }
            (None, Some(n)) => println!("  columns       {n}, mapping refused (see problems)"),
            _ => println!("  columns       not read"),
        }
        println!(
            "  unique keys   {}",
            if p.unique_keys.is_empty() {
                "none".to_string()
            } else {
                p.unique_keys.join("; ")
            }
        );
        for step in &p.steps {
            println!("  {step}");
        }
        println!("  error tables  in schema {}", p.conveyor_schema);
    }
    for d in &report.disk {
        let free = d.free_bytes.map_or("unknown".to_string(), |n| {
            format!("{:.1} GiB free", n as f64 / (1u64 << 30) as f64)
        });
        println!("{} {}: {free}", d.what, d.dir.display());
    }
    if !report.warnings.is_empty() {
        println!("warnings:");
        for w in &report.warnings {
            println!("  - {w}");
        }
    }
    if report.problems.is_empty() {
        println!("no problems: ready for `conveyor run`");
    } else {
        println!("problems:");
        for x in &report.problems {
            println!("  - {x}");
        }
    }
}
