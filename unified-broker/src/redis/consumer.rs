//! One member of a Redis stream consumer group: reads, claims, acks, nacks and leaving.
//!
//! # Reading
//!
//! Each subscriber is a consumer with a unique name. A background task (the *pump*)
//! reads new entries (`XREADGROUP … COUNT n BLOCK t STREAMS key >`) on a connection of
//! its own (a blocking read would stall every other command on the shared multiplexed
//! one) and hands them over an unbounded channel, so [`Subscriber::next`] is a plain
//! channel receive: cancel-safe. The channel holds at most what flow control lets the
//! pump fetch.
//!
//! # Taking over what others left
//!
//! An entry a consumer read stays in the group's pending entries list (PEL) under its
//! name until acked. A member that died (SIGKILL) leaves its entries there, so every
//! pump also runs `XAUTOCLAIM … claim_idle_ms` every `claim_interval_ms` (and once at
//! start): entries idle that long move to it and are delivered with their delivery
//! count (`XPENDING`) as [`Delivery::attempt`]. To keep slow work from looking idle,
//! the pump re-claims what its subscriber holds for itself (`XCLAIM … JUSTID`, which
//! resets the idle time without counting a delivery) every third of `claim_idle_ms`:
//! Pub/Sub's lease extension, in Redis terms. The same claim rounds delete consumers
//! that hold nothing and have been idle for long (what dead members leave behind).
//!
//! # Acks, nacks and flow control
//!
//! An ack is an `XACK`, sent (batched) by a small task of the subscriber. A nack, or a
//! dropped delivery, puts the entry back into the subscriber's own channel: it stays in
//! this consumer's PEL and is served again at once, with its attempt counted up. When
//! `max_outstanding_messages` or `max_outstanding_bytes` deliveries are fetched and not
//! yet acked, the pump stops fetching until an ack frees room.
//!
//! # Leaving
//!
//! `close` (or dropping the subscriber) stops the pump after its current read, then
//! *gives back* every entry still in this consumer's PEL: `XCLAIM … IDLE <2 days>
//! JUSTID` marks them long idle, so the group's other or future members take them with
//! their next `XAUTOCLAIM` (within `claim_interval_ms`, at once for a new one) instead of
//! waiting for `claim_idle_ms`. Deliveries the application still holds are given back
//! too, as the trait requires; their later ack still works (`XACK` needs no consumer),
//! and a later nack gives the entry back the same way. A consumer that held nothing is
//! deleted from the group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{RedisConfig, GIVE_BACK_IDLE};
use super::{is_lost_group, map_error, ErrorContext, ATTRIBUTE_PREFIX, KEY_FIELD, PAYLOAD_FIELD};
use crate::{AckHandle, BrokerError, Delivery, Message, Result, SubscribeOptions, Subscriber};

/// Entries per `XPENDING`/`XCLAIM` page when giving back or re-claiming.
const PAGE: usize = 500;

/// Acks (and give-backs) sent in one command at most.
const SETTLE_BATCH: usize = 1_000;

/// Claim rounds between two clean-ups of consumers that dead members left behind.
const CLAIMS_PER_CLEAN_UP: u64 = 30;

/// Longest pause between two attempts while the server is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Deletes consumer `ARGV[2]` of group `ARGV[1]` on stream `KEYS[1]` if it holds no
/// pending entry (atomically, so nothing it holds is dropped). Returns 1 if deleted.
const DELETE_IF_EMPTY: &str = r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
end
return 0
"#;

/// Deletes every consumer of group `ARGV[1]` on stream `KEYS[1]`, other than `ARGV[3]`,
/// that holds no pending entry and has been idle for more than `ARGV[2]` ms. Returns how
/// many it deleted. A live consumer it deletes loses nothing (it held nothing) and is
/// re-created by its next read.
const DELETE_ABANDONED: &str = r#"
local deleted = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local fields = {}
    for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
    if fields['name'] ~= ARGV[3] and fields['pending'] == 0
        and fields['idle'] > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
        deleted = deleted + 1
    end
end
return deleted
"#;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section leaves the state consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One entry read or claimed by this consumer, as its delivery handle keeps it.
struct Pending {
    id: String,
    message: Message,
    /// Deliveries so far, this one included: Redis's delivery count when read, plus the
    /// local redeliveries after nacks.
    attempt: u32,
}

/// What the pump (and a nack) hands to `next`.
enum Item {
    Delivery(Pending),
    Error(BrokerError),
    /// The stream or the group is gone: the subscription has ended.
    Ended,
}

/// What the settling task sends to the server.
enum Settle {
    Ack(String),
    GiveBack(String),
    /// Answered once everything sent before it was sent to the server.
    Flush(oneshot::Sender<()>),
}

/// Names one consumer of one group on one stream.
#[derive(Clone)]
struct Member {
    topic: String,
    group: String,
    consumer: String,
}

#[derive(Default)]
struct State {
    /// Fetched (or claimed) and not yet acked, by entry id, with its payload size.
    outstanding: HashMap<String, usize>,
    outstanding_bytes: usize,
    /// The subscriber has been closed (or dropped).
    closed: bool,
}

/// State shared by the subscriber, its pump and its deliveries' handles.
struct Shared {
    member: Member,
    state: Mutex<State>,
    /// Signalled when an ack frees flow-control room.
    room: Notify,
    /// The channel `next` reads, for serving nacked entries again.
    requeue: mpsc::UnboundedSender<Item>,
    /// To the settling task.
    settle: mpsc::UnboundedSender<Settle>,
}

impl Shared {
    /// Turns a fetched entry into a delivery whose handle points back here.
    fn delivery(self: &Arc<Self>, pending: Pending) -> Delivery {
        let message = pending.message.clone();
        let attempt = Some(pending.attempt);
        let handle = RedisAck {
            shared: Arc::clone(self),
            pending,
        };
        Delivery::new(message, attempt, Box::new(handle))
    }

    /// Forgets an entry that no longer counts against flow control.
    fn release(&self, id: &str) {
        let mut state = lock(&self.state);
        if let Some(bytes) = state.outstanding.remove(id) {
            state.outstanding_bytes = state.outstanding_bytes.saturating_sub(bytes);
        }
        drop(state);
        self.room.notify_one();
    }

    /// Records a fetched entry; false if this subscriber already holds it (a claim of
    /// its own entry), which must then not be delivered twice.
    fn record(&self, id: &str, bytes: usize) -> bool {
        let mut state = lock(&self.state);
        if state.outstanding.contains_key(id) {
            return false;
        }
        state.outstanding.insert(id.to_string(), bytes);
        state.outstanding_bytes += bytes;
        true
    }

    /// How many more entries flow control lets the pump fetch now.
    fn room_left(&self, options: &SubscribeOptions) -> usize {
        let state = lock(&self.state);
        if state.outstanding_bytes >= options.max_outstanding_bytes {
            return 0;
        }
        options
            .max_outstanding_messages
            .saturating_sub(state.outstanding.len())
    }

    fn held_ids(&self) -> Vec<String> {
        lock(&self.state).outstanding.keys().cloned().collect()
    }
}

/// Settles one Redis delivery.
struct RedisAck {
    shared: Arc<Shared>,
    pending: Pending,
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

/// A member of a Redis stream consumer group (see the module docs).
pub(crate) struct RedisSubscriber {
    shared: Arc<Shared>,
    manager: ConnectionManager,
    deliveries: mpsc::UnboundedReceiver<Item>,
    stop: watch::Sender<bool>,
    pump: Option<JoinHandle<()>>,
    /// How long closing waits for the pump's current read.
    stop_timeout: Duration,
    ended: bool,
}

/// Settings the pump runs with.
struct PumpSettings {
    options: SubscribeOptions,
    read_count: usize,
    claim_idle: Duration,
    claim_interval: Duration,
    reader_config: AsyncConnectionConfig,
}

impl RedisSubscriber {
    /// Joins `group` on `topic` (which must exist, with the group) as a new consumer and
    /// starts its pump and settling task.
    pub(crate) async fn start(
        client: &redis::Client,
        manager: ConnectionManager,
        config: &RedisConfig,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let member = Member {
            topic: topic.to_string(),
            group: group.to_string(),
            consumer: format!("{}-{}", std::process::id(), &id[..16]),
        };
        // The blocking read waits up to one claim interval, on top of the usual timeout.
        let reader_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.request_timeout()))
            .set_response_timeout(Some(config.request_timeout() + config.claim_interval()));
        let reader = client
            .get_multiplexed_async_connection_with_config(&reader_config)
            .await
            .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
        let (settle, settling) = mpsc::unbounded_channel();
        tokio::spawn(settle_in_background(
            manager.clone(),
            member.clone(),
            settling,
        ));
        let (requeue, deliveries) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            member: member.clone(),
            state: Mutex::new(State::default()),
            room: Notify::new(),
            requeue: requeue.clone(),
            settle,
        });
        let (stop, stopped) = watch::channel(false);
        let settings = PumpSettings {
            options,
            read_count: config.read_count,
            claim_idle: config.claim_idle(),
            claim_interval: config.claim_interval(),
            reader_config,
        };
        let pump = tokio::spawn(pump(
            Arc::clone(&shared),
            client.clone(),
            manager.clone(),
            reader,
            requeue,
            stopped,
            settings,
        ));
        tracing::info!(topic, group, consumer = %member.consumer, "redis subscriber joined its group");
        Ok(RedisSubscriber {
            shared,
            manager,
            deliveries,
            stop,
            pump: Some(pump),
            stop_timeout: config.request_timeout() + config.claim_interval() * 2,
            ended: false,
        })
    }

    /// Marks the subscriber closed and tells the pump to stop; returns what `leave`
    /// needs, or `None` if that already happened.
    fn shut(&mut self) -> Option<Leaving> {
        let pump = self.pump.take()?;
        lock(&self.shared.state).closed = true;
        let _ = self.stop.send(true);
        self.deliveries.close();
        Some(Leaving {
            pump,
            settle: self.shared.settle.clone(),
            manager: self.manager.clone(),
            member: self.shared.member.clone(),
            stop_timeout: self.stop_timeout,
        })
    }
}

/// What is left to do when a subscriber goes: wait for its pump, give its entries back.
struct Leaving {
    pump: JoinHandle<()>,
    settle: mpsc::UnboundedSender<Settle>,
    manager: ConnectionManager,
    member: Member,
    stop_timeout: Duration,
}

impl Leaving {
    async fn run(self) -> Result<()> {
        let Leaving {
            mut pump,
            settle,
            mut manager,
            member,
            stop_timeout,
        } = self;
        // The pump stops after its current command; cutting a read short could leave
        // entries in our PEL that the give-back below would not see.
        if tokio::time::timeout(stop_timeout, &mut pump).await.is_err() {
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

#[async_trait]
impl Subscriber for RedisSubscriber {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.ended {
            return None;
        }
        match self.deliveries.recv().await {
            Some(Item::Delivery(pending)) => Some(Ok(self.shared.delivery(pending))),
            Some(Item::Error(error)) => Some(Err(error)),
            Some(Item::Ended) | None => {
                self.ended = true;
                None
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        match self.shut() {
            Some(leaving) => leaving.run().await,
            None => Ok(()),
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
async fn give_back(
    manager: &mut ConnectionManager,
    member: &Member,
    ids: &[String],
) -> RedisResult<()> {
    claim_for_self(manager, member, ids, GIVE_BACK_IDLE).await
}

/// `XCLAIM`s `ids` (those still pending) for `member` itself with the given idle time,
/// without counting a delivery (`JUSTID`).
async fn claim_for_self(
    manager: &mut ConnectionManager,
    member: &Member,
    ids: &[String],
    idle: Duration,
) -> RedisResult<()> {
    redis::cmd("XCLAIM")
        .arg(&member.topic)
        .arg(&member.group)
        .arg(&member.consumer)
        .arg(0)
        .arg(ids)
        .arg("IDLE")
        .arg(idle.as_millis() as u64)
        .arg("JUSTID")
        .query_async::<Value>(manager)
        .await
        .map(|_| ())
}

/// Sends acks and give-backs in batches until every delivery handle and the subscriber
/// are gone. A failed ack leaves the entry pending: it is delivered again after
/// `claim_idle_ms` (a duplicate, never a loss).
async fn settle_in_background(
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

/// Whether an error is about the connection (worth reconnecting and retrying).
fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

/// Decodes one stream entry into a message (see the field names in `mod.rs`); fields
/// of other writers are ignored.
fn to_message(entry: StreamId) -> (String, Message) {
    let mut message = Message::default();
    for (field, value) in entry.map {
        let bytes = match value {
            Value::BulkString(bytes) => bytes,
            Value::SimpleString(text) => text.into_bytes(),
            _ => continue,
        };
        if field == PAYLOAD_FIELD {
            message.payload = Bytes::from(bytes);
        } else if field == KEY_FIELD {
            message.key = Some(String::from_utf8_lossy(&bytes).into_owned());
        } else if let Some(name) = field.strip_prefix(ATTRIBUTE_PREFIX) {
            message.attributes.insert(
                name.to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            );
        }
    }
    (entry.id, message)
}

/// The pump: fetches and claims entries for one subscriber until stopped or the group
/// is gone (see the module docs).
async fn pump(
    shared: Arc<Shared>,
    client: redis::Client,
    mut manager: ConnectionManager,
    reader: MultiplexedConnection,
    deliveries: mpsc::UnboundedSender<Item>,
    mut stopped: watch::Receiver<bool>,
    settings: PumpSettings,
) {
    let member = shared.member.clone();
    let mut reader = Some(reader);
    let touch_every = settings.claim_idle / 3;
    let mut next_touch = Instant::now() + touch_every;
    // Claim at once: entries a closed member gave back wait for the next claimer.
    let mut next_claim = Instant::now();
    let mut cursor = "0-0".to_string();
    let mut claims = 0u64;
    let mut failures = 0u32;
    while !*stopped.borrow() {
        let now = Instant::now();
        if now >= next_touch {
            next_touch = now + touch_every;
            if let Err(error) = touch(&mut manager, &member, shared.held_ids()).await {
                tracing::debug!(topic = %member.topic, %error, "re-claiming held entries failed");
            }
        }
        let room = shared.room_left(&settings.options);
        if room == 0 {
            // Wait for an ack, but wake up in time to keep held entries from idling.
            tokio::select! {
                _ = stopped.changed() => {}
                _ = tokio::time::timeout_at(next_touch, shared.room.notified()) => {}
            }
            continue;
        }
        let count = room.min(settings.read_count);
        let fetched = if now >= next_claim {
            claims += 1;
            let result = claim(&mut manager, &member, &mut cursor, count, &settings).await;
            // A cursor that has not wrapped means more to scan: go on right away.
            next_claim = if cursor == "0-0" {
                now + settings.claim_interval
            } else {
                now
            };
            if result.is_ok() && claims.is_multiple_of(CLAIMS_PER_CLEAN_UP) {
                delete_abandoned(&mut manager, &member, &settings).await;
            }
            result
        } else {
            let Some(connection) = reader.as_mut() else {
                match client
                    .get_multiplexed_async_connection_with_config(&settings.reader_config)
                    .await
                {
                    Ok(connection) => reader = Some(connection),
                    Err(error) => {
                        failures += 1;
                        report(&deliveries, &member, &error);
                        back_off(failures, &mut stopped).await;
                    }
                }
                continue;
            };
            let block = next_claim
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            read(connection, &member, count, block).await
        };
        match fetched {
            Ok(entries) => {
                failures = 0;
                for pending in entries {
                    if shared.record(&pending.id, pending.message.payload.len())
                        && deliveries.send(Item::Delivery(pending)).is_err()
                    {
                        return;
                    }
                }
            }
            Err(error) if is_lost_group(&error) => {
                tracing::info!(topic = %member.topic, group = %member.group, "the redis stream or group is gone; the subscription ends");
                let _ = deliveries.send(Item::Ended);
                return;
            }
            Err(error) => {
                failures += 1;
                if is_transient(&error) {
                    reader = None;
                }
                report(&deliveries, &member, &error);
                back_off(failures, &mut stopped).await;
            }
        }
    }
}

/// Hands a receive error to `next` (the caller logs it; `Resubscribing` counts them).
fn report(deliveries: &mpsc::UnboundedSender<Item>, member: &Member, error: &RedisError) {
    tracing::debug!(topic = %member.topic, %error, "redis read failed");
    let _ = deliveries.send(Item::Error(map_error(
        error,
        ErrorContext::Subscribe(&member.topic),
    )));
}

/// Waits before the next attempt after `failures` failures in a row (or until stopped).
async fn back_off(failures: u32, stopped: &mut watch::Receiver<bool>) {
    let pause =
        (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(8))).min(MAX_BACKOFF);
    tokio::select! {
        _ = stopped.changed() => {}
        _ = tokio::time::sleep(pause) => {}
    }
}

/// Reads up to `count` new entries, waiting at most `block` for the first.
async fn read(
    connection: &mut MultiplexedConnection,
    member: &Member,
    count: usize,
    block: Duration,
) -> RedisResult<Vec<Pending>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&member.group)
        .arg(&member.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(&member.topic)
        .arg(">")
        .query_async(connection)
        .await?;
    Ok(reply
        .into_iter()
        .flat_map(|reply| reply.keys)
        .flat_map(|key| key.ids)
        .map(|entry| {
            let (id, message) = to_message(entry);
            Pending {
                id,
                message,
                attempt: 1,
            }
        })
        .collect())
}

/// Takes over up to `count` entries of the group idle for `claim_idle` or longer
/// (`XAUTOCLAIM` from `cursor`, which it advances), with their delivery counts.
async fn claim(
    manager: &mut ConnectionManager,
    member: &Member,
    cursor: &mut String,
    count: usize,
    settings: &PumpSettings,
) -> RedisResult<Vec<Pending>> {
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(&member.topic)
        .arg(&member.group)
        .arg(&member.consumer)
        .arg(settings.claim_idle.as_millis() as u64)
        .arg(cursor.as_str())
        .arg("COUNT")
        .arg(count)
        .query_async(manager)
        .await?;
    *cursor = reply.next_stream_id;
    if !reply.deleted_ids.is_empty() {
        tracing::warn!(
            topic = %member.topic,
            group = %member.group,
            lost = reply.deleted_ids.len(),
            "unacked entries were trimmed from the stream (MAXLEN) before they were processed: lost"
        );
    }
    let (Some(first), Some(last)) = (reply.claimed.first(), reply.claimed.last()) else {
        return Ok(Vec::new());
    };
    // Claimed entries come in id order; their counts now include this delivery.
    let counts: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(&member.topic)
        .arg(&member.group)
        .arg(&first.id)
        .arg(&last.id)
        .arg(reply.claimed.len())
        .arg(&member.consumer)
        .query_async(manager)
        .await?;
    let counts: HashMap<String, usize> = counts
        .ids
        .into_iter()
        .map(|entry| (entry.id, entry.times_delivered))
        .collect();
    tracing::info!(topic = %member.topic, group = %member.group, count = reply.claimed.len(), "took over entries left idle by other members");
    Ok(reply
        .claimed
        .into_iter()
        .map(|entry| {
            let attempt = counts
                .get(&entry.id)
                .and_then(|&count| u32::try_from(count).ok())
                .unwrap_or(2);
            let (id, message) = to_message(entry);
            Pending {
                id,
                message,
                attempt,
            }
        })
        .collect())
}

/// Resets the idle time of the entries this subscriber holds (`XCLAIM` to itself,
/// `JUSTID`: no delivery counted), so no other member takes them over while they are
/// being worked on.
async fn touch(
    manager: &mut ConnectionManager,
    member: &Member,
    held: Vec<String>,
) -> RedisResult<()> {
    for ids in held.chunks(PAGE) {
        claim_for_self(manager, member, ids, Duration::ZERO).await?;
    }
    Ok(())
}

/// Deletes consumers that hold nothing and have been idle for long: what members that
/// died (or could not delete themselves) leave behind. Best effort.
async fn delete_abandoned(
    manager: &mut ConnectionManager,
    member: &Member,
    settings: &PumpSettings,
) {
    let idle = (settings.claim_idle * 2).max(settings.claim_interval * 10);
    let deleted = redis::cmd("EVAL")
        .arg(DELETE_ABANDONED)
        .arg(1)
        .arg(&member.topic)
        .arg(&member.group)
        .arg(idle.as_millis() as u64)
        .arg(&member.consumer)
        .query_async::<i64>(manager)
        .await;
    match deleted {
        Ok(0) => {}
        Ok(count) => {
            tracing::info!(topic = %member.topic, group = %member.group, count, "deleted abandoned consumers")
        }
        Err(error) => {
            tracing::debug!(topic = %member.topic, %error, "cleaning up abandoned consumers failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_into_messages() {
        let mut map = HashMap::new();
        map.insert(
            PAYLOAD_FIELD.to_string(),
            Value::BulkString(vec![0, 159, 255]),
        );
        map.insert(
            KEY_FIELD.to_string(),
            Value::BulkString(b"the-key".to_vec()),
        );
        map.insert(
            format!("{ATTRIBUTE_PREFIX}colour"),
            Value::BulkString(b"blue".to_vec()),
        );
        map.insert("written-by-someone-else".to_string(), Value::Int(3));
        let entry = StreamId {
            id: "1-0".into(),
            map,
            ..StreamId::default()
        };
        let (id, message) = to_message(entry);
        assert_eq!(id, "1-0");
        assert_eq!(message.payload.as_ref(), &[0, 159, 255]);
        assert_eq!(message.key.as_deref(), Some("the-key"));
        assert_eq!(message.attribute("colour"), Some("blue"));
        assert_eq!(message.attributes.len(), 1);
    }
}
