//! The producer side of the Kafka backend: one shared idempotent producer, replaced
//! when it cannot be trusted any more.
//!
//! A librdkafka producer keeps state that a broker restart can invalidate:
//!
//! - its idempotence state (producer id and sequence numbers): a broker that forgot
//!   them fences the producer with a *fatal* error, after which it never works again;
//! - its metadata cache: topics a memory-only broker (like Tansu) lost in the restart
//!   still look present, so the producer sends them Produce requests. Tansu answers
//!   those with a leader hint carrying a null topic name, and librdkafka 2.12 then reads
//!   that null name and crashes the whole process (`rd_kafka_metadata_update_op`).
//!
//! So the producer is replaced (a) after a fatal error and (b) when it reports that it
//! lost every broker connection while it had messages to send: the old one's queued and
//! in-flight messages are purged, which fails their publishes with a retryable error,
//! and callers publish again on a fresh producer, whose metadata comes from the broker
//! as it is after the restart. A producer that was never used is not replaced (it has
//! nothing stale), so an outage does not churn producers.
//!
//! A producer is also retired, gracefully, after it published to
//! [`TOPICS_PER_PRODUCER`] new topics: librdkafka keeps an object per topic a client ever
//! saw (about 13 KB each with its metadata, measured on Tansu), for the life of the
//! client, and a server publishes to a new reply topic for every client job. The fresh
//! producer takes over new publishes; the old one is flushed (its publishes complete
//! normally) and destroyed off the async workers.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer, PurgeConfig};
use rdkafka::ClientContext;
use tokio::sync::mpsc;

use super::{forward_log, map_error, ErrorContext, KafkaConfig};
use crate::sync::lock;
use crate::{BrokerError, Result};

/// How many new topics a producer publishes to before it is retired (see the module
/// docs): its topic objects then cost at most a dozen MB.
pub(crate) const TOPICS_PER_PRODUCER: usize = 1024;

/// How long a retired producer is kept after its flush before it is destroyed, so the
/// publishes that used it have let go of it and its destruction (which blocks while its
/// threads stop) happens on the blocking pool, not on an async worker.
const RETIRED_GRACE: Duration = Duration::from_secs(1);

/// The producer's librdkafka context: forwards logs and reports a lost cluster.
pub(crate) struct ProducerContext {
    generation: u64,
    lost: mpsc::UnboundedSender<u64>,
    /// Shared with the slot: see [`Producers::final_error`].
    final_error: FinalError,
}

/// librdkafka's reason for the last connection error that only a config change fixes
/// ([`is_final_connect_error`]), shared by every generation's context and the slot.
type FinalError = Arc<Mutex<Option<String>>>;

/// Connection errors that only a config change fixes: a failed TLS handshake (the
/// server's certificate not signed by a trusted CA or not naming the host, TLS spoken to
/// a plain listener) or failed SASL authentication (wrong credentials, a mechanism the
/// broker lacks). librdkafka retries them like a broker that is down, for ever; Java's
/// client treats them as final (`SslAuthenticationException`,
/// `SaslAuthenticationException`). librdkafka reports a refused certificate under two
/// codes: `SSL`, and a transport failure whose reason names the check.
fn is_final_connect_error(error: &KafkaError, reason: &str) -> bool {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication) => true,
        Some(RDKafkaErrorCode::BrokerTransportFailure) => {
            reason.contains("certificate verify failed")
        }
        _ => false,
    }
}

impl ClientContext for ProducerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        super::statistics::record(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka producer error");
        if is_final_connect_error(&error, reason) {
            *lock(&self.final_error) = Some(reason.to_string());
        }
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // The receiver is gone only when the broker client is.
            let _ = self.lost.send(self.generation);
        }
    }
}

/// The producer in use.
struct Slot {
    generation: u64,
    producer: FutureProducer<ProducerContext>,
    /// Something was published with it (so it may hold stale metadata).
    used: bool,
    /// New topics published to with it (see [`Producers::note_new_topic`]).
    new_topics: usize,
    /// For the contexts of new producers. Only producers and the slot hold senders, so
    /// the replacing task ends when the broker client (and with it the slot) is gone.
    lost: mpsc::UnboundedSender<u64>,
    /// For the contexts of new producers.
    final_error: FinalError,
}

/// The shared producer of one [`super::KafkaBroker`], replaced as the module docs say.
pub(crate) struct Producers {
    config: KafkaConfig,
    slot: Arc<Mutex<Slot>>,
}

impl Producers {
    /// Creates the first producer and the task that replaces it when it loses the
    /// cluster. Needs a tokio runtime.
    pub(crate) fn new(config: &KafkaConfig) -> Result<Producers> {
        let (lost, mut lost_rx) = mpsc::unbounded_channel();
        let final_error = FinalError::default();
        let producer = create(config, 0, &lost, &final_error)?;
        let producers = Producers {
            config: config.clone(),
            slot: Arc::new(Mutex::new(Slot {
                generation: 0,
                producer,
                used: false,
                new_topics: 0,
                lost,
                final_error,
            })),
        };
        let slot = Arc::downgrade(&producers.slot);
        let config = config.clone();
        tokio::spawn(async move {
            while let Some(generation) = lost_rx.recv().await {
                let Some(slot) = Weak::upgrade(&slot) else {
                    break;
                };
                replace(&slot, &config, generation, "it lost every broker");
            }
        });
        Ok(producers)
    }

    /// The producer to publish with now, and its generation.
    pub(crate) fn current(&self) -> (u64, FutureProducer<ProducerContext>) {
        let mut slot = lock(&self.slot);
        slot.used = true;
        (slot.generation, slot.producer.clone())
    }

    /// librdkafka's reason for the last TLS handshake or SASL authentication that failed
    /// on any producer's connection: what `connect` reports, as a config error, when the
    /// cluster did not answer.
    pub(crate) fn final_error(&self) -> Option<String> {
        let shared = Arc::clone(&lock(&self.slot).final_error);
        let reason = lock(&shared).clone();
        reason
    }

    /// The current producer without marking it used (for probes and flushes).
    pub(crate) fn current_unused(&self) -> FutureProducer<ProducerContext> {
        lock(&self.slot).producer.clone()
    }

    /// Counts a topic that is about to be published to for the first time (as far as
    /// the caller knows); after [`TOPICS_PER_PRODUCER`] of them, retires the producer
    /// for a fresh one (see the module docs).
    pub(crate) fn note_new_topic(&self) {
        let old = {
            let mut slot = lock(&self.slot);
            slot.new_topics += 1;
            if slot.new_topics < TOPICS_PER_PRODUCER {
                return;
            }
            swap_in_fresh(&mut slot, &self.config)
        };
        let Some(old) = old else {
            return;
        };
        tracing::info!(
            topics = TOPICS_PER_PRODUCER,
            "retiring the kafka producer after as many new topics; a fresh one takes over"
        );
        let timeout = self.config.message_timeout();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || {
                if let Err(error) = old.flush(timeout) {
                    tracing::warn!(%error, "flushing the retired kafka producer failed");
                }
                std::thread::sleep(RETIRED_GRACE);
                drop(old);
            });
        }
    }

    /// After a failed publish on `producer`: if it hit a fatal error, replaces it (once
    /// per generation) and returns a retryable error; otherwise returns `error`.
    pub(crate) fn replace_if_fatal(
        &self,
        generation: u64,
        producer: &FutureProducer<ProducerContext>,
        error: BrokerError,
    ) -> BrokerError {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return error;
        };
        replace(&self.slot, &self.config, generation, "it failed for good");
        BrokerError::Unavailable(format!(
            "the kafka producer failed for good ({code:?}: {reason}); publish again"
        ))
    }
}

fn create(
    config: &KafkaConfig,
    generation: u64,
    lost: &mpsc::UnboundedSender<u64>,
    final_error: &FinalError,
) -> Result<FutureProducer<ProducerContext>> {
    config
        .producer()
        .create_with_context(ProducerContext {
            generation,
            lost: lost.clone(),
            final_error: Arc::clone(final_error),
        })
        .map_err(|error| map_error(&error, ErrorContext::Connect))
}

/// Puts a fresh producer (the next generation) in `slot` and returns the old one, or
/// `None` (logged) if none can be created.
fn swap_in_fresh(slot: &mut Slot, config: &KafkaConfig) -> Option<FutureProducer<ProducerContext>> {
    let fresh = match create(config, slot.generation + 1, &slot.lost, &slot.final_error) {
        Ok(fresh) => fresh,
        Err(error) => {
            tracing::warn!(%error, "could not create a new kafka producer; keeping the old one");
            return None;
        }
    };
    slot.generation += 1;
    slot.used = false;
    slot.new_topics = 0;
    Some(std::mem::replace(&mut slot.producer, fresh))
}

/// Replaces the producer of `generation` (if it is still the current one and was used)
/// and purges the old one, whose pending publishes then fail and are retried.
fn replace(slot: &Mutex<Slot>, config: &KafkaConfig, generation: u64, why: &str) {
    let old = {
        let mut slot = lock(slot);
        if slot.generation != generation || !slot.used {
            return;
        }
        swap_in_fresh(&mut slot, config)
    };
    let Some(old) = old else {
        return;
    };
    tracing::warn!(
        generation,
        "replacing the kafka producer because {why}; its unconfirmed messages are published again"
    );
    old.purge(PurgeConfig::default().queue().inflight().non_blocking());
    // Destroying a producer blocks until its threads stop: not on an async worker.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(move || drop(old));
    }
}
