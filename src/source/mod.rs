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
    let ch = |what| move |source| SourceError::Channel { what, source };
    let channel = conn.create_channel().await.map_err(ch("channel.open"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(ch("basic.qos"))?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            consumer_tag.into(),
            BasicConsumeOptions::default(),
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
