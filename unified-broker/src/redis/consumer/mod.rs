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
//! `close` (or dropping the subscriber) stops the pump after its current read (which
//! it ends at once with `CLIENT UNBLOCK` where the server allows it, so the read
//! returns nothing; reads block at most 100 ms anyway), then
//! *gives back* every entry still in this consumer's PEL: `XCLAIM … IDLE <2 days>
//! JUSTID` marks them long idle, so the group's other or future members take them with
//! their next `XAUTOCLAIM` (within `claim_interval_ms`, at once for a new one) instead of
//! waiting for `claim_idle_ms`. Deliveries the application still holds are given back
//! too, as the trait requires; their later ack still works (`XACK` needs no consumer),
//! and a later nack gives the entry back the same way. A consumer that held nothing is
//! deleted from the group.
//!
//! # Layout
//!
//! As the Kafka consumer keeps its offset bookkeeping in a file of its own, this one is
//! split by concern: this file holds the subscriber, its shared state and flow control;
//! `read.rs` the pump and `XREADGROUP`; `claims.rs` taking over and re-claiming entries
//! (`XAUTOCLAIM`, `XCLAIM`) and cleaning up abandoned consumers; `settle.rs` the delivery
//! handles (acks, nacks) and the task that sends them; `leave.rs` closing, dropping and
//! giving entries back.

mod claims;
mod leave;
mod read;
mod settle;

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use self::read::pump;
use self::settle::{settle_in_background, RedisAck, Settle};
use super::config::RedisConfig;
use super::{map_error, ErrorContext};
use crate::sync::lock;
use crate::{BrokerError, Delivery, Message, Result, SubscribeOptions, Subscriber};

/// Entries per `XPENDING`/`XCLAIM` page when giving back or re-claiming.
const PAGE: usize = 500;

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
    /// The server's id of the pump's reading connection (`CLIENT ID`; 0 before it is
    /// known), so leaving can end a blocked read at once (`CLIENT UNBLOCK`) instead of
    /// waiting up to a claim interval for it.
    reader_id: AtomicI64,
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
        // The blocking read waits up to one claim interval (at most `MAX_READ_BLOCK`,
        // read.rs), on top of the usual timeout.
        let reader_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.request_timeout()))
            .set_response_timeout(Some(config.request_timeout() + config.claim_interval()));
        let (reader, reader_id) = read::reader_connection(client, &reader_config)
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
            reader_id: AtomicI64::new(reader_id),
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

/// Whether an error is about the connection (worth reconnecting and retrying).
fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}
