//! Source: the AMQP side — connect, declare or check the queue, consume with a bounded prefetch,
//! and the header conventions (queue time, message id).
//!
//! Acks are not sent from here directly by callers on the data path: the worker acks from the
//! outcome of a committed batch through [`acks::AckTracker`], in one place. This module never
//! acks on its own, and a lost connection is reported, never papered over with auto-recovery
//! (after a reconnect delivery tags restart, and an ack for an old tag would hit a new message).

pub mod acks;

use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

use crate::config::{QueueDeclare, SecretUrl};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to RabbitMQ at {url}: {source} (is RabbitMQ running? start it with `rabbitmq-server -detached`, or fix amqp.url / CONVEYOR_AMQP_URL)")]
    Connect { url: String, source: lapin::Error },
    #[error("queue {queue:?} does not exist and queue_declare = \"passive\": create it, or set queue_declare = \"quorum\" to let conveyor declare it")]
    QueueMissing { queue: String },
    #[error("cannot declare queue {queue:?}: {source} (it may already exist with other arguments — e.g. a classic queue while queue_declare = \"quorum\"; delete it or set queue_declare to match)")]
    Declare { queue: String, source: lapin::Error },
    #[error("the broker refused a message published to {exchange:?} (nack); check the broker's log for resource alarms")]
    Nacked { exchange: String },
    #[error("exchange {exchange:?} does not exist: declare it first (deploy/rabbitmq/definitions.json, or docs/scaling.md for a sharded stream)")]
    ExchangeMissing { exchange: String },
    #[error("cannot declare the consistent-hash exchange {exchange:?}: {source} (\"unknown exchange type\" means the plugin is off: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)")]
    ShardExchange {
        exchange: String,
        source: lapin::Error,
    },
    #[error("AMQP {what} failed: {source}")]
    Channel {
        what: &'static str,
        source: lapin::Error,
    },
}

/// Opens a connection; `name` shows in the broker's management UI.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection, SourceError> {
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    Connection::connect(url.expose(), props)
        .await
        .map_err(|source| SourceError::Connect {
            url: url.to_string(),
            source,
        })
}

/// Opens a channel on `conn`.
pub async fn open_channel(conn: &Connection) -> Result<Channel, SourceError> {
    conn.create_channel()
        .await
        .map_err(|source| SourceError::Channel {
            what: "channel.open",
            source,
        })
}

/// Checks that `exchange` exists (a passive declare; on failure the broker closes `channel`).
pub async fn check_exchange(channel: &Channel, exchange: &str) -> Result<(), SourceError> {
    let opts = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            opts,
            FieldTable::default(),
        )
        .await
        .map_err(|source| {
            if is_not_found(&source) {
                SourceError::ExchangeMissing {
                    exchange: exchange.to_string(),
                }
            } else {
                SourceError::Channel {
                    what: "exchange.declare",
                    source,
                }
            }
        })
}

/// Declares a stream sharded over `queues` (DESIGN §7): a durable consistent-hash exchange
/// `exchange` and each queue (as `declare` says) bound to it with weight 1, so every queue
/// gets an equal share of the routing keys and one key always reaches the same queue.
/// Idempotent. Publishers then publish to `exchange` with the row's key as routing key.
pub async fn declare_sharded(
    channel: &Channel,
    exchange: &str,
    queues: &[String],
    declare: QueueDeclare,
) -> Result<(), SourceError> {
    let opts = lapin::options::ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Custom("x-consistent-hash".into()),
            opts,
            FieldTable::default(),
        )
        .await
        .map_err(|source| SourceError::ShardExchange {
            exchange: exchange.to_string(),
            source,
        })?;
    for q in queues {
        declare_queue(channel, q, declare).await?;
        // The binding key is the queue's weight in the hash ring.
        channel
            .queue_bind(
                q.as_str().into(),
                exchange.into(),
                "1".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| SourceError::Channel {
                what: "queue.bind",
                source,
            })?;
    }
    Ok(())
}

/// Deletes a sharded stream's queues and exchange (what [`declare_sharded`] made), with the
/// messages still in them: for tearing down tests and benchmarks. Best effort: what is already
/// gone is skipped.
pub async fn delete_sharded(channel: &Channel, exchange: &str, queues: &[String]) {
    for q in queues {
        let _ = channel
            .queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel
        .exchange_delete(
            exchange.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}

/// Queue arguments for `declare`: durable with single-active-consumer, so that a second worker
/// (or process) on the same queue waits as standby instead of sharing deliveries.
pub fn queue_arguments(declare: QueueDeclare) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    if declare == QueueDeclare::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// Declares (or passively checks) the queue; returns its ready-message count.
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    declare: QueueDeclare,
) -> Result<u32, SourceError> {
    let opts = QueueDeclareOptions {
        passive: declare == QueueDeclare::Passive,
        durable: true,
        ..Default::default()
    };
    let args = if declare == QueueDeclare::Passive {
        FieldTable::default()
    } else {
        queue_arguments(declare)
    };
    match channel.queue_declare(queue.into(), opts, args).await {
        Ok(q) => Ok(q.message_count()),
        Err(source) if declare == QueueDeclare::Passive && is_not_found(&source) => {
            Err(SourceError::QueueMissing {
                queue: queue.to_string(),
            })
        }
        Err(source) => Err(SourceError::Declare {
            queue: queue.to_string(),
            source,
        }),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

/// Opens a channel with `prefetch` and registers a manual-ack consumer on `queue`.
pub async fn consume(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    consumer_tag: &str,
) -> Result<(Channel, Consumer), SourceError> {
    consume_with(
        conn,
        queue,
        prefetch,
        consumer_tag,
        BasicConsumeOptions::default(),
    )
    .await
}

/// Consumes with `exclusive`: fails with ACCESS_REFUSED while another worker holds the queue.
pub async fn consume_exclusive(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    consumer_tag: &str,
) -> Result<(Channel, Consumer), SourceError> {
    let opts = BasicConsumeOptions {
        exclusive: true,
        ..Default::default()
    };
    consume_with(conn, queue, prefetch, consumer_tag, opts).await
}

async fn consume_with(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    consumer_tag: &str,
    opts: BasicConsumeOptions,
) -> Result<(Channel, Consumer), SourceError> {
    let ch = |what| move |source| SourceError::Channel { what, source };
    let channel = open_channel(conn).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(ch("basic.qos"))?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            consumer_tag.into(),
            opts,
            FieldTable::default(),
        )
        .await
        .map_err(ch("basic.consume"))?;
    Ok((channel, consumer))
}

/// The queue time a publisher stamped: header `name` as microseconds since the epoch (integer)
/// or RFC 3339 text; else the AMQP `timestamp` property (seconds); else `None`.
pub fn header_queue_time_us(props: &BasicProperties, name: &str) -> Option<i64> {
    let from_header = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            AMQPValue::LongUInt(n) => Some(i64::from(*n)),
            AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
                .ok()
                .and_then(crate::decode::parse_queue_time_text),
            AMQPValue::ShortString(s) => crate::decode::parse_queue_time_text(s.as_str()),
            _ => None,
        });
    from_header.or_else(|| {
        props
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .map(|s| s.saturating_mul(1_000_000))
    })
}

/// Header that makes a message an end-of-job marker; its value names the job to end, or `*`.
pub const EOJ_HEADER: &str = "x-conveyor-eoj";
/// Optional header on a marker: why the job ends (`schedule`, `manual`, …); default `manual`.
pub const REASON_HEADER: &str = "x-conveyor-reason";
/// Fanout exchange every worker listens on, for control that must overtake the backlog.
pub const CONTROL_EXCHANGE: &str = "conveyor.control";

/// An end-of-job marker found in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The job to end, or `*` for whichever job reads it.
    pub job: String,
    pub reason: crate::job::EndReason,
}

impl Marker {
    pub fn applies_to(&self, job: &str) -> bool {
        self.job == "*" || self.job == job
    }
}

/// The marker a delivery carries, if it is one: header `x-conveyor-eoj`, or a zero-length body.
pub fn marker(props: &BasicProperties, body: &[u8]) -> Option<Marker> {
    let headers = props.headers().as_ref().map(|h| h.inner());
    let text = |name: &str| {
        headers.and_then(|h| h.get(name)).and_then(|v| match v {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_string),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        })
    };
    let job = text(EOJ_HEADER).or_else(|| body.is_empty().then(|| "*".to_string()))?;
    let reason = text(REASON_HEADER)
        .and_then(|r| crate::job::EndReason::parse(&r))
        .unwrap_or(crate::job::EndReason::Manual);
    Some(Marker { job, reason })
}

/// Publishes an end-of-job marker for `job` into `queue` (behind the backlog) and waits for the
/// broker's confirm.
pub async fn publish_marker(
    channel: &Channel,
    queue: &str,
    job: &str,
    reason: crate::job::EndReason,
) -> Result<(), SourceError> {
    let mut headers = FieldTable::default();
    headers.insert(EOJ_HEADER.into(), AMQPValue::LongString(job.into()));
    headers.insert(
        REASON_HEADER.into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    publish_confirmed(
        channel,
        "",
        queue,
        b"",
        BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2),
    )
    .await
}

/// A control message on the `conveyor.control` fanout exchange.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Control {
    pub pipeline: String,
    /// The pipeline's queue: the exchange is broker-wide, and two deployments may share
    /// pipeline names (and, within a second, job names); the queue tells them apart.
    pub queue: String,
    /// The job to end now, or `*`.
    pub job: String,
    pub reason: String,
}

/// Declares the control exchange (idempotent).
pub async fn declare_control(channel: &Channel) -> Result<(), SourceError> {
    use lapin::options::ExchangeDeclareOptions;
    channel
        .exchange_declare(
            CONTROL_EXCHANGE.into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| SourceError::Channel {
            what: "exchange.declare conveyor.control",
            source,
        })
}

/// Publishes a control message to every worker of every process.
pub async fn publish_control(channel: &Channel, msg: &Control) -> Result<(), SourceError> {
    declare_control(channel).await?;
    let body = serde_json::to_vec(msg).unwrap_or_default();
    publish_confirmed(
        channel,
        CONTROL_EXCHANGE,
        "",
        &body,
        BasicProperties::default(),
    )
    .await
}

/// Opens a channel that receives every control message (a private, auto-deleted queue bound to
/// the fanout exchange).
pub async fn control_consumer(conn: &Connection) -> Result<(Channel, Consumer), SourceError> {
    use lapin::options::QueueBindOptions;
    let ch = |what| move |source| SourceError::Channel { what, source };
    let channel = open_channel(conn).await?;
    declare_control(&channel).await?;
    let q = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(ch("queue.declare (control)"))?;
    channel
        .queue_bind(
            q.name().as_str().into(),
            CONTROL_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(ch("queue.bind (control)"))?;
    let consumer = channel
        .basic_consume(
            q.name().as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(ch("basic.consume (control)"))?;
    Ok((channel, consumer))
}

async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), SourceError> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let ch = |what| move |source| SourceError::Channel { what, source };
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(ch("confirm.select"))?;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(ch("basic.publish"))?
        .await
        .map_err(ch("publisher confirm"))?;
    if confirm.is_nack() {
        return Err(SourceError::Nacked {
            exchange: exchange.to_string(),
        });
    }
    Ok(())
}

/// The publisher's message id, if it set one.
pub fn message_id(props: &BasicProperties) -> Option<String> {
    props.message_id().as_ref().map(|s| s.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_time_from_header_forms() {
        let mut h = FieldTable::default();
        h.insert("x-queue-time".into(), AMQPValue::LongLongInt(42));
        let p = BasicProperties::default().with_headers(h);
        assert_eq!(header_queue_time_us(&p, "x-queue-time"), Some(42));

        let mut h = FieldTable::default();
        h.insert(
            "x-queue-time".into(),
            AMQPValue::LongString("1970-01-01T00:00:01Z".into()),
        );
        let p = BasicProperties::default().with_headers(h);
        assert_eq!(header_queue_time_us(&p, "x-queue-time"), Some(1_000_000));

        let p = BasicProperties::default().with_timestamp(3);
        assert_eq!(header_queue_time_us(&p, "x-queue-time"), Some(3_000_000));
        assert_eq!(
            header_queue_time_us(&BasicProperties::default(), "x-queue-time"),
            None
        );
    }
}
