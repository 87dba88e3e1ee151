//! Leaving the group: closing or dropping a subscriber and giving its entries back.
//!
//! Stops the pump, flushes the acks sent before closing, marks every entry still in this
//! consumer's PEL long idle (`XCLAIM … IDLE <2 days> JUSTID`) so other members take them
//! at once, and deletes the consumer if it holds nothing (a Lua script, atomically); see
//! "Leaving" in the `consumer` module docs. Separate because it is the one path that runs
//! after the subscriber is gone (from `close` or from `Drop`, in a spawned task).

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::StreamPendingCountReply;
use redis::RedisResult;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::claims::claim_for_self;
use super::settle::Settle;
use super::{lock, Member, RedisSubscriber, PAGE};
use crate::redis::config::GIVE_BACK_IDLE;
use crate::redis::{is_lost_group, map_error, ErrorContext};
use crate::Result;

/// Deletes consumer `ARGV[2]` of group `ARGV[1]` on stream `KEYS[1]` if it holds no
/// pending entry (atomically, so nothing it holds is dropped). Returns 1 if deleted.
const DELETE_IF_EMPTY: &str = r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
end
return 0
"#;

impl RedisSubscriber {
    /// Marks the subscriber closed and tells the pump to stop; returns what `leave`
    /// needs, or `None` if that already happened.
    pub(super) fn shut(&mut self) -> Option<Leaving> {
        let pump = self.pump.take()?;
        lock(&self.shared.state).closed = true;
        let _ = self.stop.send(true);
        self.deliveries.close();
        Some(Leaving {
            pump,
            reader_id: self.shared.reader_id.load(Ordering::Relaxed),
            settle: self.shared.settle.clone(),
            manager: self.manager.clone(),
            member: self.shared.member.clone(),
            stop_timeout: self.stop_timeout,
        })
    }
}

/// How often leaving repeats `CLIENT UNBLOCK` while the pump runs: a read the pump
/// started just after the previous one is ended too.
const UNBLOCK_EVERY: Duration = Duration::from_millis(20);

/// Waits up to `stop_timeout` for `pump` to stop, unblocking its read (connection
/// `reader_id`) meanwhile; whether it stopped.
async fn unblock_until_stopped(
    pump: &mut JoinHandle<()>,
    manager: &mut ConnectionManager,
    reader_id: i64,
    stop_timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + stop_timeout;
    loop {
        if reader_id > 0 {
            let unblocked: RedisResult<i64> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(reader_id)
                .query_async(manager)
                .await;
            if let Err(error) = unblocked {
                // Not fatal (an ACL may refuse it): the read ends by itself soon
                // (`MAX_READ_BLOCK` in `read.rs`).
                tracing::debug!(%error, "CLIENT UNBLOCK failed");
            }
        }
        let wait =
            UNBLOCK_EVERY.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        if tokio::time::timeout(wait, &mut *pump).await.is_ok() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// What is left to do when a subscriber goes: wait for its pump, give its entries back.
pub(super) struct Leaving {
    pump: JoinHandle<()>,
    /// The pump's reading connection on the server (see `Shared::reader_id`).
    reader_id: i64,
    settle: mpsc::UnboundedSender<Settle>,
    manager: ConnectionManager,
    member: Member,
    stop_timeout: Duration,
}

impl Leaving {
    pub(super) async fn run(self) -> Result<()> {
        let Leaving {
            mut pump,
            reader_id,
            settle,
            mut manager,
            member,
            stop_timeout,
        } = self;
        // The pump stops after its current command; cutting a read short could leave
        // entries in our PEL that the give-back below would not see. A blocked read
        // is ended by the server instead (`CLIENT UNBLOCK`, as if its wait had timed
        // out: it returns nothing), so leaving takes milliseconds; where the server
        // refuses that, the read ends within `MAX_READ_BLOCK` (read.rs).
        if !unblock_until_stopped(&mut pump, &mut manager, reader_id, stop_timeout).await {
            tracing::warn!(topic = %member.topic, consumer = %member.consumer, "the redis pump did not stop in time; aborting it");
            pump.abort();
        }
        // Acks sent before closing must reach the server first, or their entries
        // would be given back (and delivered again) below.
        let (flushed, flushing) = oneshot::channel();
        if settle.send(Settle::Flush(flushed)).is_ok()
            && tokio::time::timeout(stop_timeout, flushing).await.is_err()
        {
            tracing::debug!(topic = %member.topic, "acks not confirmed before leaving");
        }
        let given_back = give_back_all(&mut manager, &member).await;
        let deleted = redis::cmd("EVAL")
            .arg(DELETE_IF_EMPTY)
            .arg(1)
            .arg(&member.topic)
            .arg(&member.group)
            .arg(&member.consumer)
            .query_async::<i64>(&mut manager)
            .await;
        match (given_back, deleted) {
            (Ok(count), Ok(deleted)) => {
                tracing::info!(topic = %member.topic, group = %member.group, consumer = %member.consumer, given_back = count, deleted = deleted == 1, "redis subscriber left its group");
                Ok(())
            }
            (Err(error), _) | (_, Err(error)) if is_lost_group(&error) => Ok(()),
            (Err(error), _) | (_, Err(error)) => {
                // Not lost: the group's other members claim them after claim_idle_ms.
                tracing::warn!(topic = %member.topic, consumer = %member.consumer, %error, "could not give back unacked entries on leaving; others take them over after claim_idle_ms");
                Err(map_error(&error, ErrorContext::Subscribe(&member.topic)))
            }
        }
    }
}

impl Drop for RedisSubscriber {
    fn drop(&mut self) {
        let Some(leaving) = self.shut() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = leaving.run().await;
                });
            }
            // No runtime to give the entries back with: others claim them after
            // claim_idle_ms.
            Err(_) => leaving.pump.abort(),
        }
    }
}

/// Marks every entry in `member`'s PEL long idle (without counting a delivery), so the
/// group's other members claim it at once. Returns how many entries it gave back.
async fn give_back_all(manager: &mut ConnectionManager, member: &Member) -> RedisResult<usize> {
    let mut start = "-".to_string();
    let mut total = 0;
    loop {
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&member.topic)
            .arg(&member.group)
            .arg(&start)
            .arg("+")
            .arg(PAGE)
            .arg(&member.consumer)
            .query_async(manager)
            .await?;
        let Some(last) = pending.ids.last() else {
            return Ok(total);
        };
        start = format!("({}", last.id);
        let ids: Vec<String> = pending.ids.into_iter().map(|entry| entry.id).collect();
        total += ids.len();
        give_back(manager, member, &ids).await?;
    }
}

/// `XCLAIM`s `ids` for `member` itself, marked long idle: any member's next claim takes
/// them.
pub(super) async fn give_back(
    manager: &mut ConnectionManager,
    member: &Member,
    ids: &[String],
) -> RedisResult<()> {
    claim_for_self(manager, member, ids, GIVE_BACK_IDLE).await
}
