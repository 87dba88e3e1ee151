//! The request pipeline of the model server, one module per stage.
//!
//! ```text
//!  broker ──next()──▶ intake ──▶ decode pool ──▶ batcher ──▶ model thread ──▶ reply ──▶ broker
//!                      (async)   (worker threads)  (async)    (own thread)    (async: publish, then ack)
//! ```
//!
//! - [`intake`]: takes deliveries while fewer than `max_in_flight` are unfinished;
//! - [`decode_pool`]: untrusted bytes → model input or rejection, on dedicated threads;
//! - [`batch`]: groups inputs up to `max_batch_size`, waiting at most
//!   `max_batch_wait_ms`; rejections skip the model;
//! - [`infer`]: the model thread, one batch at a time;
//! - [`reply`]: publishes replies and acks each request only after its reply was
//!   confirmed (at-least-once), retrying publishes with backoff;
//! - [`dead_letter`]: the copies of requests that can never succeed;
//! - [`stats`]: the counters.
//!
//! Beside the stages, tasks of `run` reload models, ask the broker whether it answers
//! (for `/readyz`) and poll the group's backlog ([`crate::backlog`]).
//!
//! Shutdown (the `shutdown` token): intake stops, everything already taken is finished
//! within `drain_timeout`, then the subscription is closed (committing acks).

mod batch;
mod dead_letter;
mod decode_pool;
mod infer;
mod intake;
mod reply;
mod stats;

use std::sync::Arc;

use anyhow::Context;
use classifier_inference::Classifier;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use unified_broker::{
    retry_while_unavailable, Broker, BrokerError, Resubscribing, SubscribeOptions, Subscriber,
};

pub(crate) use stats::{register, render};
pub use stats::{NotReady, ServerStats, StatsSnapshot};

use crate::models::{ModelSet, Reload};
use crate::request::ReplyContext;
use classifier_app::ServerConfig;

/// How often a serving server asks the broker whether it answers (for `/readyz`).
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a probe waits for the broker's answer.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Everything the server needs, bundled so `run` reads as the pipeline it is.
pub struct ModelServer {
    broker: Arc<dyn Broker>,
    config: ServerConfig,
    models: Arc<ModelSet>,
    stats: Arc<ServerStats>,
    server_id: String,
}

impl ModelServer {
    /// Prepares a server of one model; nothing happens until [`ModelServer::run`].
    pub fn new(broker: Arc<dyn Broker>, config: ServerConfig, classifier: Arc<Classifier>) -> Self {
        Self::with_models(broker, config, ModelSet::single(classifier))
    }

    /// Prepares a server of `models` (see [`ModelSet`]: requests choose one by name, and
    /// models loaded from a directory are reloaded when it changes).
    pub fn with_models(broker: Arc<dyn Broker>, config: ServerConfig, models: ModelSet) -> Self {
        let server_id = if config.server_id.is_empty() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            format!("server-{}-{}", std::process::id(), &id[..6])
        } else {
            config.server_id.clone()
        };
        let stats = Arc::new(ServerStats::default());
        ModelServer {
            broker,
            config,
            models: Arc::new(models),
            stats: Arc::clone(&stats),
            server_id,
        }
        .with_stats(stats)
    }

    /// The counters, shared with the running server.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Counts into `stats` (made before the server, so that a metrics endpoint can
    /// report readiness while the broker is still being reached) instead of its own.
    pub fn with_stats(mut self, stats: Arc<ServerStats>) -> Self {
        stats.models_loaded(&self.models.served());
        self.stats = stats;
        self
    }

    /// The reply routes this server answers: the configured prefix and the broker's
    /// naming rules.
    fn route_policy(&self) -> crate::request::RoutePolicy {
        let broker = Arc::clone(&self.broker);
        crate::request::RoutePolicy {
            reply_topic_prefix: self.config.reply_topic_prefix.clone(),
            check_name: Arc::new(move |topic| {
                broker
                    .check_topic_name(topic)
                    .map_err(|error| error.to_string())
            }),
            deadline_grace: Some(self.config.deadline_grace()),
        }
    }

    /// How copies of requests that can never succeed are made.
    fn dead_letters(&self) -> dead_letter::DeadLetters {
        dead_letter::DeadLetters {
            enabled: !self.config.dead_letter_topic.is_empty(),
            source_topic: self.config.request_topic.clone(),
        }
    }

    /// This replica's id, as written in its replies.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Creates the request topic and the server group's subscription if needed.
    pub async fn prepare_topics(&self) -> Result<(), BrokerError> {
        self.broker
            .ensure_topic_and_subscription(&self.config.request_topic, &self.config.group)
            .await?;
        let dead_letters = &self.config.dead_letter_topic;
        let inspection = &self.config.dead_letter_subscription;
        if !dead_letters.is_empty() {
            if inspection.is_empty() {
                self.broker.ensure_topic(dead_letters).await?;
            } else {
                self.broker
                    .ensure_topic_and_subscription(dead_letters, inspection)
                    .await?;
            }
        }
        Ok(())
    }

    /// Serves until `shutdown` is cancelled (or the subscription ends), then drains.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<StatsSnapshot> {
        let Some(subscriber) = self.subscribe(&shutdown).await? else {
            return Ok(self.stats.snapshot());
        };
        let config = &self.config;
        let capacity = config.max_in_flight.max(1);
        let in_flight = Arc::new(Semaphore::new(capacity));
        self.stats.serving(subscriber.state(), config.stall_after());
        let (prepared_tx, prepared_rx) = mpsc::channel(capacity);
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let (outgoing_tx, outgoing_rx) = mpsc::channel(capacity);

        // broker → intake → decode pool → batcher → model thread → reply → broker
        let decode_pool = decode_pool::DecodePool::new(&self.models, config, self.route_policy())?;
        let reloader = self.watch_models(&shutdown);
        let prober = self.probe_broker();
        let backlog = self.poll_backlog();
        let batcher = tokio::spawn(batch::run(
            prepared_rx,
            batch_tx,
            outgoing_tx.clone(),
            batch::BatchLimits {
                max_batch: config.max_batch_size.max(1),
                max_wait: config.max_batch_wait(),
            },
            reply::ErrorReplies {
                context: self.reply_context(),
                dead_letters: self.dead_letters(),
                stats: Arc::clone(&self.stats),
            },
        ));
        let model_thread = infer::spawn_model_thread(
            infer::Model {
                default_top_k: config.default_top_k,
                context: self.reply_context(),
                stats: Arc::clone(&self.stats),
            },
            batch_rx,
            outgoing_tx,
        )?;
        let publisher = tokio::spawn(reply::run(
            Arc::new(reply::Publisher {
                broker: Arc::clone(&self.broker),
                dead_letter_topic: config.dead_letter_topic.clone(),
                dead_letters: self.dead_letters(),
                server_id: self.server_id.clone(),
                stats: Arc::clone(&self.stats),
            }),
            outgoing_rx,
        ));
        let subscriber = intake::run(
            subscriber,
            &in_flight,
            &decode_pool,
            prepared_tx,
            &self.stats,
            &shutdown,
        )
        .await;

        self.stats.draining();
        reloader.abort();
        prober.abort();
        // Its series go with it: a draining server shows no stale backlog.
        drop(backlog);
        self.drain(&in_flight).await;
        decode_pool.shutdown();
        // The async stages are cancelled and awaited until they are gone, so their ends of
        // the model thread's channels are dropped and the thread sees its input closed;
        // it is then joined off the runtime's threads. (Joining it right here once hung
        // a runtime of one worker: the cancelled batcher, never dropped, kept the model
        // thread waiting for batches, and the only worker waited for the model thread.)
        batcher.abort();
        publisher.abort();
        let _ = batcher.await;
        let _ = publisher.await;
        let _ = tokio::task::spawn_blocking(move || model_thread.join()).await;
        if let Err(error) = Box::new(subscriber).close().await {
            tracing::warn!(%error, "closing the subscription failed");
        }
        let stats = self.stats.snapshot();
        tracing::info!(?stats, "stopped");
        Ok(stats)
    }

    /// Subscribes to the request topic, waiting for the broker (and saying so) while it
    /// is not up yet. Once subscribed, the subscription re-creates itself if the broker
    /// restarts and forgets it. `None` if `shutdown` came first.
    async fn subscribe(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Resubscribing>> {
        let config = &self.config;
        let options = SubscribeOptions {
            max_outstanding_messages: config.max_in_flight,
            ..SubscribeOptions::default()
        };
        let subscribed =
            retry_while_unavailable("the request topic", shutdown.cancelled(), || async {
                self.prepare_topics().await?;
                Resubscribing::subscribe(
                    Arc::clone(&self.broker),
                    &config.request_topic,
                    &config.group,
                    options.clone(),
                )
                .await
            })
            .await;
        let Some(subscribed) = subscribed else {
            return Ok(None);
        };
        let subscriber = subscribed.context("subscribing to the request topic")?;
        let models: Vec<String> = self
            .models
            .served()
            .iter()
            .map(|m| format!("{} {}", m.name, m.version()))
            .collect();
        tracing::info!(
            server_id = %self.server_id,
            backend = self.broker.backend(),
            topic = %config.request_topic,
            group = %config.group,
            models = %models.join(", "),
            "serving"
        );
        Ok(Some(subscriber))
    }

    /// Waits (at most the drain timeout) until every request taken was acked or given
    /// up: intake has stopped, so every permit back means nothing is left in flight.
    async fn drain(&self, in_flight: &Semaphore) {
        let config = &self.config;
        tracing::info!(
            drain_timeout_secs = config.drain_timeout_secs,
            "stopping intake; finishing requests in flight"
        );
        let drained = tokio::time::timeout(config.drain_timeout(), async {
            let max = config.max_in_flight.max(1) as u32;
            let _all = in_flight.acquire_many(max).await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "drain timeout passed with requests unfinished; the broker will redeliver them"
            );
        }
    }

    /// Checks the model directories every `model_poll_ms` (if not 0) and on SIGHUP
    /// (which loads every directory again, changed or not), swapping in new models
    /// between batches and refusing, with a log line, those that do not load.
    fn watch_models(&self, shutdown: &CancellationToken) -> JoinHandle<()> {
        let models = Arc::clone(&self.models);
        let stats = Arc::clone(&self.stats);
        let poll = self.config.model_poll();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut hangups = crate::Hangups::new();
            let mut tick = poll.map(|every| {
                let mut tick = tokio::time::interval(every);
                // A slow load must not be followed by a burst of checks: the settle rule
                // needs one poll interval between two looks at the files.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            });
            loop {
                let next_tick = async {
                    match tick.as_mut() {
                        Some(tick) => drop(tick.tick().await),
                        None => std::future::pending().await,
                    }
                };
                let force = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = hangups.next() => true,
                    () = next_tick => false,
                };
                let check = Arc::clone(&models);
                let Ok(outcomes) =
                    tokio::task::spawn_blocking(move || check.reload_changed(force)).await
                else {
                    continue;
                };
                for outcome in &outcomes {
                    match outcome {
                        Reload::Swapped { name, from, to } => {
                            tracing::info!(model = %name, from = %from, to = %to, "model reloaded: new requests use it")
                        }
                        Reload::Refused { name, reason } => {
                            tracing::error!(model = %name, %reason, "refusing the new model; the old one keeps serving")
                        }
                    }
                }
                if !outcomes.is_empty() {
                    stats.models_loaded(&models.served());
                }
            }
        })
    }

    /// Asks the broker every [`PROBE_EVERY`] whether it answers (`Broker::ping`, at most
    /// [`PROBE_TIMEOUT`]) and tells the stats, so `/readyz` says 503 while it does not,
    /// even when the backend's client retries quietly and the subscription sees no error.
    fn probe_broker(&self) -> JoinHandle<()> {
        let broker = Arc::clone(&self.broker);
        let stats = Arc::clone(&self.stats);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let answer = tokio::time::timeout(PROBE_TIMEOUT, broker.ping()).await;
                let error = match answer {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(error.to_string()),
                    Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
                };
                if stats.probed(error.is_none()) {
                    match error {
                        Some(error) => {
                            tracing::warn!(%error, "the broker does not answer: not ready")
                        }
                        None => tracing::info!("the broker answers again: ready"),
                    }
                }
            }
        })
    }

    /// Asks the broker for the request group's backlog every `backlog_poll_secs` (unless
    /// 0) on a task of its own, for the backlog gauges (see [`crate::backlog`]).
    fn poll_backlog(&self) -> Option<crate::backlog::BacklogTask> {
        let every = self.config.backlog_poll()?;
        let group = (
            self.config.request_topic.as_str(),
            self.config.group.as_str(),
        );
        let gauges = self.stats.backlog_gauges();
        let poller =
            crate::backlog::BacklogPoller::new(Arc::clone(&self.broker), group, every, gauges)
                .with_own_stats(Arc::clone(&self.stats));
        Some(poller.spawn())
    }

    fn reply_context(&self) -> ReplyContext {
        ReplyContext {
            server_id: self.server_id.clone(),
            ..ReplyContext::default()
        }
    }
}

/// Helpers for the stages' unit tests.
#[cfg(test)]
mod test_support {
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Instant;

    use classifier_inference::Classifier;
    use tokio::sync::Semaphore;
    use unified_broker::{AckHandle, Delivery, Message};

    use super::intake::Work;

    /// How a test delivery was settled: `None` (not yet), `Some("ack")`, `Some("nack")`.
    #[derive(Clone, Default)]
    pub struct Settlement(Arc<Mutex<Option<&'static str>>>);

    impl Settlement {
        pub fn get(&self) -> Option<&'static str> {
            *self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    struct Recorder(Settlement);

    impl Recorder {
        fn settle(&self, how: &'static str) {
            *(self.0).0.lock().unwrap_or_else(|p| p.into_inner()) = Some(how);
        }
    }

    impl AckHandle for Recorder {
        fn ack(self: Box<Self>) -> unified_broker::Result<()> {
            self.settle("ack");
            Ok(())
        }
        fn nack(self: Box<Self>) -> unified_broker::Result<()> {
            self.settle("nack");
            Ok(())
        }
    }

    /// A request holding `message`, and what will tell how it was settled.
    pub fn work(message: Message) -> (Work, Settlement) {
        let settlement = Settlement::default();
        let delivery = Delivery::new(message, Some(1), Box::new(Recorder(settlement.clone())));
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a fresh semaphore has room");
        let stats = super::ServerStats::default();
        (
            Work::new(delivery, Instant::now(), permit, &stats),
            settlement,
        )
    }

    /// The model shipped in `models/fashion-mnist`, loaded once per test binary.
    pub fn shipped_classifier() -> Arc<Classifier> {
        static MODEL: OnceLock<Arc<Classifier>> = OnceLock::new();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/fashion-mnist");
        Arc::clone(MODEL.get_or_init(|| {
            Arc::new(Classifier::load(std::path::Path::new(dir)).expect("the shipped model loads"))
        }))
    }
}
