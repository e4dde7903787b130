//! `conveyor check`, the broker side: the queue exists or will be declared, and its type and
//! single-active-consumer are what `conveyor run` needs (read from the management API, or
//! checked by an equivalent declare).

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::*;

pub(super) async fn check_queue(config: &Config, p: &PipelineConfig, r: &mut PipelineReport) {
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
