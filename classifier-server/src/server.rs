//! The request pipeline of the model server.
//!
//! ```text
//!  broker ──next()──▶ intake ──▶ decode pool ──▶ batcher ──▶ model thread ──▶ publisher ──▶ broker
//!                      (async)   (worker threads)  (async)    (own thread)     (async: reply, then ack)
//! ```
//!
//! - **intake** takes deliveries from the subscription while fewer than `max_in_flight`
//!   are unfinished (a permit travels with each request until it is acked), so memory
//!   is bounded whatever the backlog on the broker.
//! - **decode** runs on a small dedicated thread pool, never on the async executor:
//!   untrusted bytes become a model input or an error reply ([`crate::request`]).
//! - **batcher** groups inputs up to `max_batch_size`, waiting at most
//!   `max_batch_wait_ms` after the first one; error replies skip the model.
//! - **model thread** runs the CNN on one batch at a time, on its own thread, so
//!   decoding the next batch and publishing the last overlap with it.
//! - **publisher** publishes replies grouped by reply topic and acks each request only
//!   after its reply was confirmed: at-least-once. A failed publish is retried with
//!   backoff and the request is not acked meanwhile; if the server stops first, the
//!   unacked request goes back to the broker.
//!
//! Shutdown (the `shutdown` token): intake stops, everything already taken is finished
//! within `drain_timeout`, then the subscription is closed (committing acks).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use classifier_inference::Classifier;
use classifier_inference::Preprocessor;
use classifier_proto::{ClassifyError, ErrorCode};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use unified_broker::{
    Broker, BrokerError, Delivery, Message, Resubscribing, SubscribeOptions, Subscriber,
};

use crate::config::ServerConfig;
use crate::request::{
    error_response, prepare, response_message, success_response, PreparedInput, Rejected,
    ReplyContext,
};

/// Counters a running server keeps; read them for logs, tests and benchmarks.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Deliveries taken from the broker.
    pub received: AtomicU64,
    /// Requests answered with predictions.
    pub classified: AtomicU64,
    /// Requests answered with an error reply.
    pub rejected: AtomicU64,
    /// Requests acked without any reply (no reply topic, or the reply topic is gone).
    pub unanswerable: AtomicU64,
    /// Batches run through the model.
    pub batches: AtomicU64,
    /// Reply publishes that failed and were retried.
    pub publish_retries: AtomicU64,
    /// Requests copied to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

/// A snapshot of [`ServerStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`ServerStats::received`].
    pub received: u64,
    /// See [`ServerStats::classified`].
    pub classified: u64,
    /// See [`ServerStats::rejected`].
    pub rejected: u64,
    /// See [`ServerStats::unanswerable`].
    pub unanswerable: u64,
    /// See [`ServerStats::batches`].
    pub batches: u64,
    /// See [`ServerStats::publish_retries`].
    pub publish_retries: u64,
    /// See [`ServerStats::dead_lettered`].
    pub dead_lettered: u64,
}

impl ServerStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            classified: get(&self.classified),
            rejected: get(&self.rejected),
            unanswerable: get(&self.unanswerable),
            batches: get(&self.batches),
            publish_retries: get(&self.publish_retries),
            dead_lettered: get(&self.dead_lettered),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One request travelling through the pipeline, holding its in-flight permit.
struct Work {
    delivery: Delivery,
    received_at: Instant,
    _permit: OwnedSemaphorePermit,
}

/// Output of the decode stage.
enum Prepared {
    Ready(Work, PreparedInput),
    Rejected(Work, Rejected),
}

/// A reply to publish, and the request to ack once it is out.
struct Outgoing {
    work: Work,
    reply_topic: String,
    message: Message,
    /// For requests that can never succeed: the copy for the dead-letter topic.
    dead_letter: Option<Message>,
}

/// Everything the server needs, bundled so `run` reads as the pipeline it is.
pub struct ModelServer {
    broker: Arc<dyn Broker>,
    config: ServerConfig,
    classifier: Arc<Classifier>,
    stats: Arc<ServerStats>,
    server_id: String,
}

impl ModelServer {
    /// Prepares a server; nothing happens until [`ModelServer::run`].
    pub fn new(broker: Arc<dyn Broker>, config: ServerConfig, classifier: Arc<Classifier>) -> Self {
        let server_id = if config.server_id.is_empty() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            format!("server-{}-{}", std::process::id(), &id[..6])
        } else {
            config.server_id.clone()
        };
        ModelServer {
            broker,
            config,
            classifier,
            stats: Arc::new(ServerStats::default()),
            server_id,
        }
    }

    /// The counters, shared with the running server.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
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
        let config = &self.config;
        let options = SubscribeOptions {
            max_outstanding_messages: config.max_in_flight,
            ..SubscribeOptions::default()
        };
        // The broker may not be up yet: wait for it, saying so. Once subscribed, the
        // subscription re-creates itself if the broker restarts and forgets it.
        let subscribed = retry_while_unavailable("the request topic", &shutdown, || async {
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
        let mut subscriber = match subscribed {
            Some(result) => result.context("subscribing to the request topic")?,
            None => return Ok(self.stats.snapshot()),
        };
        tracing::info!(
            server_id = %self.server_id,
            backend = self.broker.backend(),
            topic = %config.request_topic,
            group = %config.group,
            model = %self.classifier.metadata().name,
            version = %self.classifier.metadata().version,
            "serving"
        );

        let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let (prepared_tx, prepared_rx) = mpsc::channel::<Prepared>(config.max_in_flight.max(1));
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<(Work, PreparedInput)>>(2);
        let (outgoing_tx, outgoing_rx) =
            mpsc::channel::<Vec<Outgoing>>(config.max_in_flight.max(1));

        let decode_pool = DecodePool::new(&self.classifier, config)?;
        let mut stages = JoinSet::new();
        stages.spawn(batcher(
            prepared_rx,
            batch_tx,
            outgoing_tx.clone(),
            BatchLimits {
                max_batch: config.max_batch_size.max(1),
                max_wait: config.max_batch_wait(),
            },
            self.reply_context(),
            DeadLetters {
                enabled: !config.dead_letter_topic.is_empty(),
                source_topic: config.request_topic.clone(),
            },
            Arc::clone(&self.stats),
        ));
        let model_thread = spawn_model_thread(
            Arc::clone(&self.classifier),
            batch_rx,
            outgoing_tx,
            config.default_top_k,
            self.reply_context(),
            Arc::clone(&self.stats),
        )?;
        let publisher_done = tokio::spawn(publisher(
            Arc::clone(&self.broker),
            outgoing_rx,
            config.dead_letter_topic.clone(),
            Arc::clone(&self.stats),
        ));

        // Intake: take work while there is room, until shutdown.
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&in_flight).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let next = tokio::select! {
                next = subscriber.next() => next,
                _ = shutdown.cancelled() => break,
            };
            match next {
                Some(Ok(delivery)) => {
                    let received_at = Instant::now();
                    let mut chunk = vec![Work {
                        delivery,
                        received_at,
                        _permit: permit,
                    }];
                    // Take what else is already waiting (with room for it) and decode
                    // it in the same job: one hand-over to the decode threads per
                    // chunk instead of per request.
                    while chunk.len() < DECODE_CHUNK {
                        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                            break;
                        };
                        let ready = tokio::select! {
                            biased;
                            next = subscriber.next() => next,
                            () = std::future::ready(()) => None,
                        };
                        match ready {
                            Some(Ok(delivery)) => chunk.push(Work {
                                delivery,
                                received_at,
                                _permit: permit,
                            }),
                            Some(Err(error)) => {
                                tracing::warn!(%error, "receiving from the broker failed; retrying");
                                break;
                            }
                            None => break,
                        }
                    }
                    ServerStats::add(&self.stats.received, chunk.len() as u64);
                    decode_pool.submit(chunk, prepared_tx.clone());
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "receiving from the broker failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None => {
                    tracing::warn!("the broker client was closed; stopping");
                    break;
                }
            }
        }

        // Drain: no new work; let every stage finish what it holds.
        tracing::info!(
            drain_timeout_secs = config.drain_timeout_secs,
            "stopping intake; finishing requests in flight"
        );
        drop(prepared_tx);
        let drained = tokio::time::timeout(config.drain_timeout(), async {
            let max = config.max_in_flight.max(1) as u32;
            // Every permit back means every request taken was acked (or given up).
            let _all = in_flight.acquire_many(max).await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "drain timeout passed with requests unfinished; the broker will redeliver them"
            );
        }
        decode_pool.shutdown();
        stages.abort_all();
        publisher_done.abort();
        let _ = model_thread.join();
        if let Err(error) = Box::new(subscriber).close().await {
            tracing::warn!(%error, "closing the subscription failed");
        }
        let stats = self.stats.snapshot();
        tracing::info!(?stats, "stopped");
        Ok(stats)
    }

    fn reply_context(&self) -> ReplyContext {
        ReplyContext {
            server_id: self.server_id.clone(),
            ..ReplyContext::default()
        }
    }
}

/// Runs `operation` until it succeeds or fails for good, retrying transient broker
/// errors with backoff (250 ms doubling to 10 s) and logging what it waits for. `None`
/// if `shutdown` was cancelled first.
pub async fn retry_while_unavailable<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut operation: F,
) -> Option<Result<T, BrokerError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BrokerError>>,
{
    let mut backoff = Duration::from_millis(250);
    loop {
        let result = tokio::select! {
            result = operation() => result,
            _ = shutdown.cancelled() => return None,
        };
        match result {
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "waiting for the broker to serve {what}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            result => return Some(result),
        }
    }
}

/// Requests decoded together in one job on a decode thread, at most: enough to make the
/// hand-over cheap, few enough that both decode threads get work.
const DECODE_CHUNK: usize = 16;

/// Decoding and preprocessing on dedicated worker threads.
struct DecodePool {
    pool: Arc<rayon::ThreadPool>,
    preprocessor: Arc<Preprocessor>,
    limits: Arc<crate::decode::DecodeLimits>,
}

impl DecodePool {
    fn new(classifier: &Classifier, config: &ServerConfig) -> anyhow::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .context("starting the decode threads")?;
        Ok(DecodePool {
            pool: Arc::new(pool),
            preprocessor: Arc::new(Preprocessor::new(classifier.metadata())),
            limits: Arc::new(config.limits.clone()),
        })
    }

    /// Decodes `chunk` on one decode thread, in order, sending each result on `out`.
    fn submit(&self, chunk: Vec<Work>, out: mpsc::Sender<Prepared>) {
        let preprocessor = Arc::clone(&self.preprocessor);
        let limits = Arc::clone(&self.limits);
        self.pool.spawn(move || {
            for work in chunk {
                let prepared = match prepare(work.delivery.message(), &limits, &preprocessor) {
                    Ok(input) => Prepared::Ready(work, input),
                    Err(rejected) => Prepared::Rejected(work, *rejected),
                };
                // Fails only while shutting down; the rest of the chunk is then dropped
                // (nacked).
                if out.blocking_send(prepared).is_err() {
                    break;
                }
            }
        });
    }

    fn shutdown(self) {
        drop(self.pool);
    }
}

/// How big batches get and how long a partial batch waits.
struct BatchLimits {
    max_batch: usize,
    max_wait: Duration,
}

/// Whether and how rejected requests are copied to the dead-letter topic.
struct DeadLetters {
    enabled: bool,
    source_topic: String,
}

/// Attributes added to a dead-letter copy (the original attributes are kept).
pub mod dead_letter_attributes {
    /// The error code name, e.g. `CORRUPT_IMAGE`.
    pub const CODE: &str = "dead-letter-code";
    /// The human-readable reason.
    pub const REASON: &str = "dead-letter-reason";
    /// The topic the request came from.
    pub const SOURCE_TOPIC: &str = "dead-letter-source-topic";
    /// The server that gave up on it.
    pub const SERVER_ID: &str = "dead-letter-server-id";
}

impl DeadLetters {
    /// The original message, byte for byte, with the reason added as attributes.
    fn copy(&self, original: &Message, rejected: &Rejected, server_id: &str) -> Option<Message> {
        if !self.enabled {
            return None;
        }
        let code = ErrorCode::try_from(rejected.error.code)
            .map(|c| c.as_str_name().to_string())
            .unwrap_or_else(|_| rejected.error.code.to_string());
        let mut copy = original.clone();
        copy.attributes
            .insert(dead_letter_attributes::CODE.into(), code);
        copy.attributes.insert(
            dead_letter_attributes::REASON.into(),
            rejected.error.reason.clone(),
        );
        copy.attributes.insert(
            dead_letter_attributes::SOURCE_TOPIC.into(),
            self.source_topic.clone(),
        );
        copy.attributes.insert(
            dead_letter_attributes::SERVER_ID.into(),
            server_id.to_string(),
        );
        Some(copy)
    }
}

/// Groups ready inputs into batches; forwards rejections straight to the publisher.
async fn batcher(
    mut prepared: mpsc::Receiver<Prepared>,
    batches: mpsc::Sender<Vec<(Work, PreparedInput)>>,
    outgoing: mpsc::Sender<Vec<Outgoing>>,
    limits: BatchLimits,
    context: ReplyContext,
    dead_letters: DeadLetters,
    stats: Arc<ServerStats>,
) {
    let BatchLimits {
        max_batch,
        max_wait,
    } = limits;
    let reject = |work: Work, rejected: Rejected| {
        ServerStats::add(&stats.rejected, 1);
        tracing::info!(
            request_id = %rejected.route.request_id,
            code = ?ErrorCode::try_from(rejected.error.code).unwrap_or(ErrorCode::Internal),
            reason = %rejected.error.reason,
            "request rejected"
        );
        let mut context = context.clone();
        context.queue_time_micros = work.received_at.elapsed().as_micros() as u64;
        Outgoing {
            reply_topic: rejected.route.reply_topic.clone(),
            message: response_message(&error_response(&rejected, &context)),
            dead_letter: dead_letters.copy(work.delivery.message(), &rejected, &context.server_id),
            work,
        }
    };
    let mut open = true;
    while open {
        let mut batch = Vec::with_capacity(max_batch);
        let mut deadline = None;
        while batch.len() < max_batch {
            let item = match deadline {
                None => prepared.recv().await,
                Some(deadline) => tokio::select! {
                    item = prepared.recv() => item,
                    _ = tokio::time::sleep_until(deadline) => break,
                },
            };
            match item {
                Some(Prepared::Ready(work, input)) => {
                    if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + max_wait);
                    }
                    batch.push((work, input));
                }
                Some(Prepared::Rejected(work, rejected)) => {
                    if outgoing.send(vec![reject(work, rejected)]).await.is_err() {
                        return;
                    }
                }
                None => {
                    open = false;
                    break;
                }
            }
        }
        if !batch.is_empty() && batches.send(batch).await.is_err() {
            return;
        }
    }
}

/// Runs the model on its own thread, one batch at a time.
fn spawn_model_thread(
    classifier: Arc<Classifier>,
    mut batches: mpsc::Receiver<Vec<(Work, PreparedInput)>>,
    outgoing: mpsc::Sender<Vec<Outgoing>>,
    default_top_k: usize,
    context: ReplyContext,
    stats: Arc<ServerStats>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || {
            while let Some(batch) = batches.blocking_recv() {
                let replies = run_batch(&classifier, batch, default_top_k, &context, &stats);
                if outgoing.blocking_send(replies).is_err() {
                    return;
                }
            }
        })
        .context("starting the model thread")
}

fn run_batch(
    classifier: &Classifier,
    batch: Vec<(Work, PreparedInput)>,
    default_top_k: usize,
    context: &ReplyContext,
    stats: &ServerStats,
) -> Vec<Outgoing> {
    let started = Instant::now();
    let n = batch.len();
    let mut inputs = Vec::with_capacity(n * classifier.input_len());
    for (_, prepared) in &batch {
        inputs.extend_from_slice(&prepared.input);
    }
    let result = classifier.predict(&inputs, n);
    let inference_micros = started.elapsed().as_micros() as u64;
    ServerStats::add(&stats.batches, 1);
    let metadata = classifier.metadata();
    batch
        .into_iter()
        .enumerate()
        .map(|(i, (work, prepared))| {
            let context = ReplyContext {
                queue_time_micros: started.duration_since(work.received_at).as_micros() as u64,
                inference_time_micros: inference_micros,
                batch_size: n as u32,
                ..context.clone()
            };
            let response = match result.as_ref().map(|rows| rows.get(i)) {
                Ok(Some(probabilities)) => {
                    ServerStats::add(&stats.classified, 1);
                    success_response(
                        &prepared.route,
                        probabilities,
                        metadata,
                        default_top_k,
                        &context,
                    )
                }
                Ok(None) | Err(_) => {
                    ServerStats::add(&stats.rejected, 1);
                    let reason = match &result {
                        Err(error) => format!("the model failed: {error:#}"),
                        Ok(_) => "the model returned too few rows".to_string(),
                    };
                    tracing::error!(%reason, "inference failed");
                    error_response(
                        &Rejected {
                            route: prepared.route.clone(),
                            error: ClassifyError {
                                code: ErrorCode::Internal as i32,
                                reason,
                            },
                        },
                        &context,
                    )
                }
            };
            Outgoing {
                reply_topic: prepared.route.reply_topic.clone(),
                message: response_message(&response),
                // A model failure is the server's fault, not the request's.
                dead_letter: None,
                work,
            }
        })
        .collect()
}

/// Publishes replies (grouped by reply topic) and dead-letter copies, and acks their
/// requests afterwards.
async fn publisher(
    broker: Arc<dyn Broker>,
    mut outgoing: mpsc::Receiver<Vec<Outgoing>>,
    dead_letter_topic: String,
    stats: Arc<ServerStats>,
) {
    let mut tasks = JoinSet::new();
    while let Some(replies) = outgoing.recv().await {
        let mut by_topic: BTreeMap<String, Vec<Outgoing>> = BTreeMap::new();
        for reply in replies {
            by_topic
                .entry(reply.reply_topic.clone())
                .or_default()
                .push(reply);
        }
        for (topic, replies) in by_topic {
            tasks.spawn(publish_then_ack(
                Arc::clone(&broker),
                topic,
                replies,
                dead_letter_topic.clone(),
                Arc::clone(&stats),
            ));
        }
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// What became of a publish that was retried until it stopped failing transiently.
enum Published {
    Confirmed,
    /// The topic does not exist (a client's reply topic after it gave up).
    TopicGone,
}

/// Publishes, retrying transient failures with backoff (50 ms doubling to 5 s) for as
/// long as it takes; the caller's requests stay unacked meanwhile.
async fn publish_with_retry(
    broker: &dyn Broker,
    topic: &str,
    messages: Vec<Message>,
    stats: &ServerStats,
) -> Published {
    let mut backoff = Duration::from_millis(50);
    loop {
        match broker.publish_batch(topic, messages.clone()).await {
            Ok(()) => return Published::Confirmed,
            Err(BrokerError::TopicNotFound(_)) => return Published::TopicGone,
            Err(error) => {
                ServerStats::add(&stats.publish_retries, 1);
                tracing::warn!(%topic, %error, retry_in_ms = backoff.as_millis() as u64, "publishing failed; retrying (requests stay unacked)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn publish_then_ack(
    broker: Arc<dyn Broker>,
    topic: String,
    replies: Vec<Outgoing>,
    dead_letter_topic: String,
    stats: Arc<ServerStats>,
) {
    if topic.is_empty() {
        // Nobody to answer: a message without any routing information.
        ServerStats::add(&stats.unanswerable, replies.len() as u64);
        tracing::warn!(
            count = replies.len(),
            "requests without a reply topic; dead-lettering and acking them"
        );
    } else {
        let messages: Vec<Message> = replies.iter().map(|r| r.message.clone()).collect();
        if let Published::TopicGone = publish_with_retry(&*broker, &topic, messages, &stats).await {
            ServerStats::add(&stats.unanswerable, replies.len() as u64);
            tracing::warn!(%topic, count = replies.len(), "reply topic no longer exists; the client is gone");
        }
    }
    let dead: Vec<Message> = replies
        .iter()
        .filter_map(|r| r.dead_letter.clone())
        .collect();
    if !dead.is_empty() && !dead_letter_topic.is_empty() {
        let count = dead.len() as u64;
        match publish_with_retry(&*broker, &dead_letter_topic, dead, &stats).await {
            Published::Confirmed => ServerStats::add(&stats.dead_lettered, count),
            Published::TopicGone => {
                tracing::error!(topic = %dead_letter_topic, "the dead-letter topic does not exist; copies dropped")
            }
        }
    }
    for reply in replies {
        if let Err(error) = reply.work.delivery.ack() {
            tracing::warn!(%error, "ack failed; the request may be redelivered and answered twice");
        }
    }
}
