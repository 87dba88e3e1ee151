//! Settling deliveries: the ack handle of each delivery and the task that sends acks.
//!
//! An ack frees flow-control room and queues an `XACK`; a nack serves the entry again
//! through the subscriber's own channel, or gives it back once the subscriber is closed.
//! One background task per subscriber sends the queued acks and give-backs in batches
//! (see "Acks, nacks and flow control" in the `consumer` module docs). Separate because
//! it outlives the pump: handles may be settled after the subscriber is gone.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::RedisResult;
use tokio::sync::{mpsc, oneshot};

use super::leave::give_back;
use super::{is_transient, lock, Item, Member, Pending, Shared};
use crate::{AckHandle, BrokerError, Result};

/// Acks (and give-backs) sent in one command at most.
const SETTLE_BATCH: usize = 1_000;

/// What the settling task sends to the server.
pub(super) enum Settle {
    Ack(String),
    GiveBack(String),
    /// Answered once everything sent before it was sent to the server.
    Flush(oneshot::Sender<()>),
}

/// Settles one Redis delivery.
pub(super) struct RedisAck {
    pub(super) shared: Arc<Shared>,
    pub(super) pending: Pending,
}

impl AckHandle for RedisAck {
    fn ack(self: Box<Self>) -> Result<()> {
        let RedisAck { shared, pending } = *self;
        shared.release(&pending.id);
        shared
            .settle
            .send(Settle::Ack(pending.id))
            .map_err(|_| BrokerError::Closed)
    }

    fn nack(self: Box<Self>) -> Result<()> {
        let RedisAck {
            shared,
            mut pending,
        } = *self;
        if !lock(&shared.state).closed {
            pending.attempt = pending.attempt.saturating_add(1);
            match shared.requeue.send(Item::Delivery(pending)) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(Item::Delivery(returned))) => pending = returned,
                Err(_) => return Ok(()),
            }
        }
        // Closed: hand the entry to the group's other members.
        shared.release(&pending.id);
        shared
            .settle
            .send(Settle::GiveBack(pending.id))
            .map_err(|_| BrokerError::Closed)
    }
}

/// Sends acks and give-backs in batches until every delivery handle and the subscriber
/// are gone. A failed ack leaves the entry pending: it is delivered again after
/// `claim_idle_ms` (a duplicate, never a loss).
pub(super) async fn settle_in_background(
    mut manager: ConnectionManager,
    member: Member,
    mut settling: mpsc::UnboundedReceiver<Settle>,
) {
    let mut batch = Vec::with_capacity(64);
    while settling.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
        let mut acks = Vec::new();
        let mut give_backs = Vec::new();
        let mut flushes = Vec::new();
        for settle in batch.drain(..) {
            match settle {
                Settle::Ack(id) => acks.push(id),
                Settle::GiveBack(id) => give_backs.push(id),
                Settle::Flush(done) => flushes.push(done),
            }
        }
        if !acks.is_empty() {
            let acked = with_retries(|| {
                let mut manager = manager.clone();
                let command = redis::cmd("XACK")
                    .arg(&member.topic)
                    .arg(&member.group)
                    .arg(&acks)
                    .to_owned();
                async move { command.query_async::<i64>(&mut manager).await }
            })
            .await;
            match acked {
                Ok(count) => tracing::trace!(topic = %member.topic, count, "acked"),
                Err(error) => {
                    tracing::warn!(topic = %member.topic, group = %member.group, count = acks.len(), %error, "XACK failed; the entries will be delivered again")
                }
            }
        }
        if !give_backs.is_empty() {
            if let Err(error) = give_back(&mut manager, &member, &give_backs).await {
                tracing::debug!(topic = %member.topic, %error, "giving back nacked entries failed; others take them over after claim_idle_ms");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Runs `attempt` up to three times while the server is unreachable.
async fn with_retries<T, F, Fut>(mut attempt: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RedisResult<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(error) if tries < 2 && is_transient(&error) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            result => return result,
        }
    }
}
