//! The feed's publisher: ordered publishes with a bounded window of outstanding writes and
//! broker confirms, paced to a rate.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use indicatif::ProgressBar;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::time::{Duration, Instant};

use super::{FeedError, CONFIRM_WINDOW, PACE_TICK, QUEUE_TIME_HEADER};

/// A publish whose frames are queued on the channel, and what is still to wait for.
enum InFlight<'a> {
    /// The frames are queued but not yet written to the socket.
    Sending(Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + 'a>>),
    /// Written; waiting for the broker's confirm.
    Confirming(PublisherConfirm),
}

/// Ordered publishes with a bounded window of outstanding writes and confirms, paced to `rate`.
///
/// Each publish future is polled once on the spot: that first poll registers the confirm and
/// queues the frames on the channel synchronously, so messages reach the broker in call order
/// (a duplicate always after its original) without waiting for each socket write.
pub(crate) struct Publisher<'a> {
    channel: &'a Channel,
    queue: &'a str,
    /// "" (the default exchange, routing key = `queue`) or an exchange routing by message id.
    exchange: &'a str,
    window: VecDeque<(String, InFlight<'a>)>,
    rate: u64,
    pub(crate) start: Instant,
    sent: u64,
    bar: ProgressBar,
}

impl<'a> Publisher<'a> {
    pub(crate) fn new(channel: &'a Channel, queue: &'a str, rate: u64, bar: ProgressBar) -> Self {
        Publisher {
            channel,
            queue,
            exchange: "",
            window: VecDeque::with_capacity(CONFIRM_WINDOW),
            rate,
            start: Instant::now(),
            sent: 0,
            bar,
        }
    }

    /// Publishes to `exchange` with each message's id as the routing key.
    pub(crate) fn via_exchange(mut self, exchange: &'a str) -> Self {
        self.exchange = exchange;
        self
    }

    pub(super) async fn publish(
        &mut self,
        message_id: String,
        body: Vec<u8>,
    ) -> Result<(), FeedError> {
        let mut headers = FieldTable::default();
        headers.insert(
            QUEUE_TIME_HEADER.into(),
            AMQPValue::LongLongInt(now_micros()),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(message_id.as_str().into())
            .with_headers(headers);
        self.publish_with(message_id, body, props).await
    }

    /// Publishes `body` with exactly these properties (replay keeps a message's own).
    pub(crate) async fn publish_with(
        &mut self,
        message_id: String,
        body: Vec<u8>,
        props: BasicProperties,
    ) -> Result<(), FeedError> {
        pace(self.start, self.sent, self.rate).await;
        if self.window.len() >= CONFIRM_WINDOW {
            self.confirm_oldest().await?;
        }
        let channel = self.channel;
        let exchange = self.exchange;
        let routing_key = if exchange.is_empty() {
            self.queue.into()
        } else {
            message_id.as_str().into()
        };
        let mut sending: Pin<Box<dyn Future<Output = _> + Send + 'a>> = Box::pin(async move {
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key,
                    BasicPublishOptions {
                        // Unroutable (queue deleted meanwhile) comes back instead of vanishing.
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    props,
                )
                .await
        });
        let first = std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await;
        let in_flight = match first {
            Poll::Pending => InFlight::Sending(sending),
            Poll::Ready(Ok(confirm)) => InFlight::Confirming(confirm),
            Poll::Ready(Err(source)) => {
                return Err(FeedError::Amqp {
                    what: "basic.publish",
                    source,
                })
            }
        };
        self.window.push_back((message_id, in_flight));
        self.sent += 1;
        self.bar.inc(1);
        Ok(())
    }

    pub(super) async fn confirm_oldest(&mut self) -> Result<(), FeedError> {
        let Some((message_id, in_flight)) = self.window.pop_front() else {
            return Ok(());
        };
        let confirm = match in_flight {
            InFlight::Confirming(confirm) => confirm,
            InFlight::Sending(sending) => sending.await.map_err(|source| FeedError::Amqp {
                what: "basic.publish",
                source,
            })?,
        };
        match confirm.await {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(FeedError::Unroutable {
                queue: self.queue.to_string(),
                message_id,
            }),
            Ok(Confirmation::Nack(_)) => Err(FeedError::Nacked {
                queue: self.queue.to_string(),
                message_id,
            }),
            Ok(Confirmation::NotRequested) => Err(FeedError::NotConfirmed { message_id }),
            Err(source) => Err(FeedError::Amqp {
                what: "publisher confirm",
                source,
            }),
        }
    }

    pub(crate) async fn drain(&mut self) -> Result<(), FeedError> {
        while !self.window.is_empty() {
            self.confirm_oldest().await?;
        }
        Ok(())
    }
}

/// With a rate, message number `sent` is due at `start + sent / rate`; when ahead of schedule,
/// sleep at least one tick so messages leave in small bursts and the average rate is exact.
/// (A free function: holding `&Publisher` across the sleep would make the feed future `!Send`.)
pub(super) async fn pace(start: Instant, sent: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let nanos = u128::from(sent) * 1_000_000_000 / u128::from(rate);
    let due = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
    let now = Instant::now();
    if due > now {
        tokio::time::sleep_until(due.max(now + PACE_TICK)).await;
    }
}

pub(super) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
