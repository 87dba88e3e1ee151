//! Sending one folder's worth of requests and collecting the replies.
//!
//! A job publishes every file as a `ClassifyRequest` to the request topic, with at most
//! `window` requests unanswered at a time, and reads replies from a reply topic of its
//! own (created for the job, deleted afterwards). Replies are matched to requests by
//! id; a second reply to the same request (the server is at-least-once) is counted as a
//! duplicate and otherwise ignored. Request ids are random, and a reply counts only if
//! it carries the job's id and an id the job sent: anything else on the reply topic (a
//! peer's forgery, another job's reply) is counted as rejected and never becomes a
//! result. The job ends when every request is answered, or when no reply arrived for
//! `reply_timeout`; what is still open is then reported as unanswered.
//!
//! The parts: [`run_job`] here waits for events and hands each to the part it concerns;
//! `sender` reads the files (`files`) and publishes the requests within the window and
//! the byte budget (`budget`); `pending` holds the requests published and not yet
//! answered; `collector` turns replies and the sender's local failures into the
//! [`JobReport`].

mod budget;
mod collector;
mod files;
mod pending;
mod sender;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use budget::ByteBudget;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use unified_broker::{Broker, Delivery, Resubscribing, SubscribeOptions, Subscriber};

use crate::failure::FailureCode;
use crate::inputs::InputFile;
use classifier_app::trace::TraceContext;
use collector::Collector;
use pending::Pending;
pub(crate) use sender::with_request_routing;
use sender::{ensure_request_topic, request_size_limit, resend_unanswered, Sender};
pub use sender::{new_request_id, request_message};

/// How a job talks to the servers.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Topic the servers consume.
    pub request_topic: String,
    /// The servers' consumer group; created up front so no request is missed when the
    /// servers start after the client (Pub/Sub keeps messages only for existing
    /// subscriptions).
    pub server_group: String,
    /// Requests sent and not yet answered, at most.
    pub window: usize,
    /// Bytes of requests sent and not yet answered, at most (see `budget`).
    pub max_in_flight_bytes: usize,
    /// Give up after this long without any reply.
    pub reply_timeout: Duration,
    /// Files larger than this are not read.
    pub max_file_bytes: usize,
    /// Largest request sent, if less than what the broker takes (`--max-bytes`).
    pub max_request_bytes: Option<usize>,
    /// Images whose request would be too large are downscaled to fit this many pixels
    /// on each side and re-encoded as PNG before sending (`--resize-to`); `None` reports
    /// them as `FILE_TOO_LARGE`.
    pub resize_to: Option<u32>,
    /// Predictions asked for per image.
    pub top_k: u32,
    /// Which of the servers' models should answer (`--model-name`); empty: their
    /// default model.
    pub model_name: String,
}

impl JobOptions {
    /// The options the config's `[server]` (topic, group) and `[client]` tables give.
    pub fn from_config(config: &classifier_app::AppConfig) -> JobOptions {
        JobOptions {
            request_topic: config.server.request_topic.clone(),
            server_group: config.server.group.clone(),
            window: config.client.window,
            max_in_flight_bytes: config.client.max_in_flight_bytes,
            reply_timeout: Duration::from_secs(config.client.reply_timeout_secs),
            max_file_bytes: config.client.max_file_bytes,
            max_request_bytes: config.client.max_request_bytes,
            resize_to: config.client.resize_to,
            top_k: config.client.top_k as u32,
            model_name: config.client.model_name.clone(),
        }
    }
}

/// One predicted class.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClassScore {
    /// Class name as the model calls it.
    pub class_name: String,
    /// Index in the model's class list.
    pub class_index: u32,
    /// Probability in [0, 1].
    pub probability: f32,
}

/// A classified outcome with one class, for tests.
#[cfg(test)]
pub(crate) fn classified(class: &str, probability: f32) -> FileOutcome {
    FileOutcome::Classified {
        top_k: vec![ClassScore {
            class_name: class.into(),
            class_index: 0,
            probability,
        }],
        model: "m".into(),
        model_version: "1".into(),
    }
}

/// What happened to one file.
#[derive(Clone, Debug, PartialEq)]
pub enum FileOutcome {
    /// The server classified it.
    Classified {
        /// Best first.
        top_k: Vec<ClassScore>,
        /// Name of the model that answered (as the server serves it).
        model: String,
        /// Its version.
        model_version: String,
    },
    /// The server (or the client, for unreadable files) could not classify it.
    Failed {
        /// Error code, e.g. `CORRUPT_IMAGE`.
        code: FailureCode,
        /// Human-readable reason.
        reason: String,
    },
    /// No reply before the timeout.
    Unanswered,
}

/// The result for one file.
#[derive(Clone, Debug)]
pub struct FileResult {
    /// The file.
    pub input: InputFile,
    /// The request id it was sent with (empty if never sent).
    pub request_id: String,
    /// The answer.
    pub outcome: FileOutcome,
    /// Which server answered.
    pub server_id: String,
    /// Send → reply received.
    pub latency: Option<Duration>,
}

/// Everything a job learned.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// Job id (also in the requests).
    pub job_id: String,
    /// One entry per input file, in input order.
    pub results: Vec<FileResult>,
    /// Replies received for requests that were already answered.
    pub duplicate_replies: u64,
    /// Replies received that were not this job's: an unknown request id (a peer's
    /// guess, a forgery), another job's id, or not a reply at all. Never results.
    pub rejected_replies: u64,
    /// Wall time of the whole job.
    pub elapsed: Duration,
    /// Replies per answering server.
    pub answered_by: HashMap<String, u64>,
}

/// Receives progress as the job runs (a progress bar, or nothing).
pub trait Progress: Send + Sync {
    /// Called once per file when its result is known.
    fn file_done(&self, result: &FileResult);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn file_done(&self, _result: &FileResult) {}
}

/// Why a file was not sent: the code and reason reported for it (the client's own
/// failures never reach a server).
#[derive(Debug)]
struct Failure {
    code: FailureCode,
    reason: String,
}

impl Failure {
    /// `FILE_TOO_LARGE`: larger than the client reads or the broker takes.
    fn too_large(reason: impl Into<String>) -> Failure {
        Failure {
            code: FailureCode::FileTooLarge,
            reason: reason.into(),
        }
    }

    /// `UNREADABLE_FILE`: not read (an I/O error, not a regular file).
    fn unreadable(reason: impl Into<String>) -> Failure {
        Failure {
            code: FailureCode::UnreadableFile,
            reason: reason.into(),
        }
    }
}

/// What the sender tells the waiting job besides registering requests in [`Pending`].
enum Sent {
    /// File `index` was not sent, for this reason.
    LocalFailure { index: usize, failure: Failure },
    /// Every file was sent or reported.
    Done,
}

/// How often the job looks whether its reply subscription was re-created, even while no
/// reply arrives (after a broker restart, none will for the lost requests).
const RESUBSCRIPTION_CHECK: Duration = Duration::from_millis(500);

/// Runs one job to completion.
pub async fn run_job(
    broker: Arc<dyn Broker>,
    files: Vec<InputFile>,
    options: &JobOptions,
    progress: &dyn Progress,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    let job_id = uuid::Uuid::new_v4().simple().to_string();
    let reply_topic = format!("classify-replies-{job_id}");
    let reply_group = format!("client-{}", &job_id[..12]);

    ensure_request_topic(&*broker, options)
        .await
        .context("creating the request topic and the servers' subscription")?;
    let max_request_bytes = request_size_limit(&*broker, options).await;
    let replies = subscribe_to_replies(&broker, &reply_topic, &reply_group)
        .await
        .context("subscribing to the reply topic")?;

    // The job's span: every request names it as its parent (W3C `traceparent`), when an
    // OpenTelemetry layer records it (see `classifier_app::trace`).
    let job_span =
        tracing::trace_span!(target: "client_app::trace", "classify job", job_id = %job_id);
    let window = Arc::new(Semaphore::new(options.window.max(1)));
    let budget = ByteBudget::new(options.max_in_flight_bytes);
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    let pending = Pending::default();
    let sender = tokio::spawn(
        Sender {
            broker: Arc::clone(&broker),
            options: options.clone(),
            files: files.clone(),
            job_id: job_id.clone(),
            reply_topic: reply_topic.clone(),
            pending: pending.clone(),
            window: Arc::clone(&window),
            budget: budget.clone(),
            sent: sent_tx,
            max_request_bytes,
            trace: TraceContext::of_span(&job_span),
        }
        .send_all(),
    );
    let mut job = Waiting {
        broker: &broker,
        options,
        reply_topic: &reply_topic,
        reply_group: &reply_group,
        progress,
        window: &window,
        budget: &budget,
        sent: sent_rx,
        sending_done: false,
        replies,
        resubscriptions_seen: 0,
        resends: JoinSet::new(),
        last_progress: Instant::now(),
        collector: Collector::new(job_id, files, pending),
    };
    job.until_done().await;

    sender.abort();
    let collector = job.stop().await;
    Ok(collector.into_report(started.elapsed()))
}

/// Subscribes to the job's reply topic, creating it and the subscription, and again
/// should a broker restart lose them, so replies to what is sent after the restart
/// still find their way back.
async fn subscribe_to_replies(
    broker: &Arc<dyn Broker>,
    reply_topic: &str,
    reply_group: &str,
) -> unified_broker::Result<Resubscribing> {
    Resubscribing::subscribe(
        Arc::clone(broker),
        reply_topic,
        reply_group,
        // Nobody else reads a job's reply topic: no group join to wait for.
        SubscribeOptions {
            sole_member: true,
            ..SubscribeOptions::default()
        },
    )
    .await
}

/// The job while it waits for results: for the sender's news, for replies, for the
/// timeout. Each event goes to a method of its own.
struct Waiting<'a> {
    broker: &'a Arc<dyn Broker>,
    options: &'a JobOptions,
    /// The job's reply topic and its subscription, deleted when the job stops.
    reply_topic: &'a str,
    reply_group: &'a str,
    progress: &'a dyn Progress,
    /// Slots of the window: the sender takes one per request, a reply gives it back.
    window: &'a Semaphore,
    /// The bytes in flight: the sender takes each request's size, its reply gives it
    /// back.
    budget: &'a ByteBudget,
    /// The sender's news.
    sent: mpsc::UnboundedReceiver<Sent>,
    /// Whether the sender said it is done (or is gone).
    sending_done: bool,
    replies: Resubscribing,
    /// Re-creations of the reply subscription already answered with a re-send.
    resubscriptions_seen: u64,
    /// Re-sends under way; aborted when the job ends.
    resends: JoinSet<()>,
    /// When the last result came (or the last re-send went): the timeout counts from it.
    last_progress: Instant,
    collector: Collector,
}

impl Waiting<'_> {
    /// Waits until every file has a result, the replies stop for `reply_timeout`, or the
    /// broker client is closed.
    async fn until_done(&mut self) {
        let mut check_resubscribed = tokio::time::interval(RESUBSCRIPTION_CHECK);
        while !self.collector.is_complete() {
            self.resend_if_resubscribed();
            let idle_deadline = self.last_progress + self.options.reply_timeout;
            let next = tokio::select! {
                sent = self.sent.recv(), if !self.sending_done => self.on_sent(sent),
                delivery = self.replies.next() => self.on_reply(delivery),
                _ = check_resubscribed.tick() => ControlFlow::Continue(()),
                _ = tokio::time::sleep_until(idle_deadline.into()) => self.on_idle_timeout(),
            };
            if next.is_break() {
                break;
            }
        }
    }

    /// After the reply subscription had to be re-created (the broker may have lost its
    /// state), sends every unanswered request again, and gives them a full timeout.
    fn resend_if_resubscribed(&mut self) {
        let resubscriptions = self.replies.resubscriptions();
        if resubscriptions > self.resubscriptions_seen {
            self.resubscriptions_seen = resubscriptions;
            resend_unanswered(
                self.broker,
                self.options,
                self.collector.pending(),
                &mut self.resends,
            );
            self.last_progress = Instant::now();
        }
    }

    /// The sender's news: a file it could not send is a result; `None` means the sender
    /// is gone.
    fn on_sent(&mut self, sent: Option<Sent>) -> ControlFlow<()> {
        match sent {
            Some(Sent::LocalFailure { index, failure }) => {
                self.collector
                    .local_failure(index, failure.code, failure.reason, self.progress);
                self.last_progress = Instant::now();
            }
            Some(Sent::Done) | None => self.sending_done = true,
        }
        ControlFlow::Continue(())
    }

    /// A reply (or the subscription's error, or its end): an answer frees a window slot
    /// and its request's bytes.
    fn on_reply(&mut self, delivery: Option<unified_broker::Result<Delivery>>) -> ControlFlow<()> {
        match delivery {
            Some(Ok(delivery)) => {
                if let Some(request_bytes) = self.collector.receive(delivery, self.progress) {
                    self.window.add_permits(1);
                    self.budget.give_back(request_bytes);
                    self.last_progress = Instant::now();
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "receiving replies failed; retrying"),
            None => {
                tracing::warn!("the broker client was closed");
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// No result for `reply_timeout`: the job gives up on the rest.
    fn on_idle_timeout(&self) -> ControlFlow<()> {
        tracing::warn!(
            timeout_secs = self.options.reply_timeout.as_secs(),
            unanswered = self.collector.open(),
            "no reply within the timeout; giving up on the rest"
        );
        ControlFlow::Break(())
    }

    /// Stops the re-sends, closes the reply subscription and deletes it and the reply
    /// topic (failures only logged); returns what was collected.
    async fn stop(mut self) -> Collector {
        self.resends.abort_all();
        if let Err(error) = Box::new(self.replies).close().await {
            tracing::debug!(%error, "closing the reply subscription failed");
        }
        let (topic, group) = (self.reply_topic, self.reply_group);
        if let Err(error) = self.broker.delete_subscription(topic, group).await {
            tracing::debug!(%error, "deleting the reply subscription failed");
        }
        if let Err(error) = self.broker.delete_topic(topic).await {
            tracing::debug!(%error, "deleting the reply topic failed");
        }
        self.collector
    }
}

#[cfg(test)]
mod tests;
