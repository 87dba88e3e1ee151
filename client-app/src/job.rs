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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use classifier_proto::{
    attributes, unix_micros_now, ClassifyRequest, ClassifyResponse, ErrorCode, Outcome,
    ProstMessage, CONTENT_TYPE_REQUEST, SCHEMA_VERSION,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use unified_broker::retry::retry;
use unified_broker::{
    Backoff, Broker, BrokerError, Message, Resubscribing, SubscribeOptions, Subscriber,
};

use crate::inputs::{content_type, InputFile};

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
    pub fn from_config(config: &classifier_server::AppConfig) -> JobOptions {
        JobOptions {
            request_topic: config.server.request_topic.clone(),
            server_group: config.server.group.clone(),
            window: config.client.window,
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
        code: String,
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

/// A request published and not yet answered.
struct Unanswered {
    /// Index of its file.
    index: usize,
    /// When it was first sent.
    sent_at: Instant,
    /// The message, kept to send it again if the broker loses it.
    message: Message,
}

/// Requests published and not yet answered, by request id. Shared so the sender
/// registers a request before publishing it, and a reply can never arrive for a request
/// the receiver does not know yet.
type Pending = Arc<std::sync::Mutex<HashMap<String, Unanswered>>>;

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, HashMap<String, Unanswered>> {
    pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the sender tells the receiver besides registering requests.
enum Sent {
    LocalFailure {
        index: usize,
        code: &'static str,
        reason: String,
    },
    Done,
}

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
    // Creates the reply topic and subscription, and again should a broker restart lose
    // them, so replies to what is sent after the restart still find their way back.
    let mut replies = Resubscribing::subscribe(
        Arc::clone(&broker),
        &reply_topic,
        &reply_group,
        // Nobody else reads a job's reply topic: no group join to wait for.
        SubscribeOptions {
            sole_member: true,
            ..SubscribeOptions::default()
        },
    )
    .await
    .context("subscribing to the reply topic")?;

    let window = Arc::new(Semaphore::new(options.window.max(1)));
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let pending: Pending = Arc::default();
    let sender = tokio::spawn(send_all(
        Arc::clone(&pending),
        Arc::clone(&broker),
        files.clone(),
        options.clone(),
        job_id.clone(),
        reply_topic.clone(),
        Arc::clone(&window),
        sent_tx,
        max_request_bytes,
    ));

    let mut tally = Tally::new(job_id, files.len());
    let mut sending_done = false;
    let mut last_progress = Instant::now();
    let mut resubscriptions_seen = 0;
    // Re-sends under way; aborted with the sender when the job ends.
    let mut resends = tokio::task::JoinSet::new();
    // Wakes the loop now and then to notice a re-created reply subscription even while
    // no reply arrives (after a broker restart, none will for the lost requests).
    let mut check_resubscribed = tokio::time::interval(Duration::from_millis(500));

    while tally.finished < files.len() {
        if replies.resubscriptions() > resubscriptions_seen {
            resubscriptions_seen = replies.resubscriptions();
            resend_unanswered(&broker, options, &pending, &mut resends);
            // The resent requests get a full timeout.
            last_progress = Instant::now();
        }
        let idle_deadline = last_progress + options.reply_timeout;
        tokio::select! {
            sent = sent_rx.recv(), if !sending_done => match sent {
                Some(Sent::LocalFailure { index, code, reason }) => {
                    tally.local_failure(&files[index], index, code, reason, progress);
                    last_progress = Instant::now();
                }
                Some(Sent::Done) | None => sending_done = true,
            },
            delivery = replies.next() => match delivery {
                Some(Ok(delivery)) => {
                    if tally.receive(delivery, &pending, &files, progress) {
                        window.add_permits(1);
                        last_progress = Instant::now();
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "receiving replies failed; retrying"),
                None => {
                    tracing::warn!("the broker client was closed");
                    break;
                }
            },
            _ = check_resubscribed.tick() => {}
            _ = tokio::time::sleep_until(idle_deadline.into()) => {
                tracing::warn!(
                    timeout_secs = options.reply_timeout.as_secs(),
                    unanswered = files.len() - tally.finished,
                    "no reply within the timeout; giving up on the rest"
                );
                break;
            }
        }
    }

    sender.abort();
    resends.abort_all();
    if let Err(error) = Box::new(replies).close().await {
        tracing::debug!(%error, "closing the reply subscription failed");
    }
    if let Err(error) = broker.delete_subscription(&reply_topic, &reply_group).await {
        tracing::debug!(%error, "deleting the reply subscription failed");
    }
    if let Err(error) = broker.delete_topic(&reply_topic).await {
        tracing::debug!(%error, "deleting the reply topic failed");
    }
    Ok(tally.into_report(&files, &pending, started.elapsed()))
}

/// Rejected replies logged at most: a peer's flood of forged replies is counted, not
/// written line by line to the log.
const REJECTED_LOGGED: u64 = 5;

/// Longest part of a peer's request id that is logged.
const LOGGED_ID_CHARS: usize = 64;

/// Whose a reply is.
enum Verdict {
    /// The first reply to a request of this job.
    Answer(Unanswered),
    /// Another reply to a request of this job that was already answered.
    Duplicate,
    /// Not a reply to a request of this job, and why not.
    Rejected(&'static str),
}

/// Decides whose `response` is. A reply is this job's only if it carries the job's id
/// and a request id the job sent (ids are random: a peer cannot guess one). Anyone who
/// can write to the reply topic can send replies; this keeps theirs out of the results.
fn judge(
    job_id: &str,
    pending: &Pending,
    answered: &HashSet<String>,
    response: &ClassifyResponse,
) -> Verdict {
    if response.job_id != job_id {
        return Verdict::Rejected("it carries another job's id");
    }
    if let Some(unanswered) = lock(pending).remove(&response.request_id) {
        return Verdict::Answer(unanswered);
    }
    if answered.contains(&response.request_id) {
        Verdict::Duplicate
    } else {
        Verdict::Rejected("this job sent no request with its id")
    }
}

/// What the job learned from its replies so far.
struct Tally {
    /// The job's id: its replies carry it.
    job_id: String,
    /// One entry per file, once its result is known.
    results: Vec<Option<FileResult>>,
    /// Files whose result is known.
    finished: usize,
    /// Request ids answered.
    answered: HashSet<String>,
    /// Replies per answering server.
    answered_by: HashMap<String, u64>,
    /// Replies to requests already answered.
    duplicates: u64,
    /// Replies that were not this job's.
    rejected: u64,
}

impl Tally {
    fn new(job_id: String, files: usize) -> Self {
        Tally {
            job_id,
            results: vec![None; files],
            finished: 0,
            answered: HashSet::new(),
            answered_by: HashMap::new(),
            duplicates: 0,
            rejected: 0,
        }
    }

    /// Takes one reply: acks it, and records it if it answers a request of this job.
    /// Returns whether it did (a window slot is then free again).
    fn receive(
        &mut self,
        delivery: unified_broker::Delivery,
        pending: &Pending,
        files: &[InputFile],
        progress: &dyn Progress,
    ) -> bool {
        let response = ClassifyResponse::decode(delivery.message().payload.as_ref());
        if let Err(error) = delivery.ack() {
            tracing::warn!(%error, "acking a reply failed");
        }
        let Ok(response) = response else {
            self.reject("it is not a ClassifyResponse", "");
            return false;
        };
        match judge(&self.job_id, pending, &self.answered, &response) {
            Verdict::Answer(Unanswered { index, sent_at, .. }) => {
                self.answer(&files[index], index, response, sent_at.elapsed(), progress);
                true
            }
            Verdict::Duplicate => {
                self.duplicates += 1;
                false
            }
            Verdict::Rejected(why) => {
                self.reject(why, &response.request_id);
                false
            }
        }
    }

    /// Records the answer to file `index`.
    fn answer(
        &mut self,
        input: &InputFile,
        index: usize,
        response: ClassifyResponse,
        latency: Duration,
        progress: &dyn Progress,
    ) {
        // A server's id is copied once, not once per reply.
        match self.answered_by.get_mut(&response.server_id) {
            Some(count) => *count += 1,
            None => drop(self.answered_by.insert(response.server_id.clone(), 1)),
        }
        self.answered.insert(response.request_id.clone());
        self.record(index, file_result(input, response, latency), progress);
    }

    /// Records the client's own error for file `index` (never sent).
    fn local_failure(
        &mut self,
        input: &InputFile,
        index: usize,
        code: &str,
        reason: String,
        progress: &dyn Progress,
    ) {
        let result = FileResult {
            input: input.clone(),
            request_id: String::new(),
            outcome: FileOutcome::Failed {
                code: code.to_string(),
                reason,
            },
            server_id: String::new(),
            latency: None,
        };
        self.record(index, result, progress);
    }

    fn record(&mut self, index: usize, result: FileResult, progress: &dyn Progress) {
        progress.file_done(&result);
        self.results[index] = Some(result);
        self.finished += 1;
    }

    /// Counts a reply that is not this job's; the first few are logged (escaped and
    /// cut: the id is a peer's).
    fn reject(&mut self, why: &str, request_id: &str) {
        self.rejected += 1;
        if self.rejected > REJECTED_LOGGED {
            return;
        }
        let shown: String = request_id.chars().take(LOGGED_ID_CHARS).collect();
        tracing::warn!(
            request_id = %crate::report::printable(&shown),
            "rejected a reply that is not this job's: {why}"
        );
        if self.rejected == REJECTED_LOGGED {
            tracing::warn!("further rejected replies are counted in the summary, not logged");
        }
    }

    /// The report: files without a result are unanswered (with the id they were sent
    /// with, if any).
    fn into_report(self, files: &[InputFile], pending: &Pending, elapsed: Duration) -> JobReport {
        let sent_as: HashMap<usize, String> = lock(pending)
            .iter()
            .map(|(id, unanswered)| (unanswered.index, id.clone()))
            .collect();
        let results = self
            .results
            .into_iter()
            .enumerate()
            .map(|(index, result)| {
                result.unwrap_or_else(|| FileResult {
                    input: files[index].clone(),
                    request_id: sent_as.get(&index).cloned().unwrap_or_default(),
                    outcome: FileOutcome::Unanswered,
                    server_id: String::new(),
                    latency: None,
                })
            })
            .collect();
        JobReport {
            job_id: self.job_id,
            results,
            duplicate_replies: self.duplicates,
            rejected_replies: self.rejected,
            elapsed,
            answered_by: self.answered_by,
        }
    }
}

fn file_result(input: &InputFile, response: ClassifyResponse, latency: Duration) -> FileResult {
    let outcome = match response.outcome {
        Some(Outcome::Predictions(predictions)) => FileOutcome::Classified {
            top_k: predictions
                .top_k
                .into_iter()
                .map(|p| ClassScore {
                    class_name: p.class_name,
                    class_index: p.class_index,
                    probability: p.probability,
                })
                .collect(),
            model: predictions.model_name,
            model_version: predictions.model_version,
        },
        Some(Outcome::Error(error)) => FileOutcome::Failed {
            code: ErrorCode::try_from(error.code)
                .map(|c| c.as_str_name().to_string())
                .unwrap_or_else(|_| format!("ERROR_{}", error.code)),
            reason: error.reason,
        },
        None => FileOutcome::Failed {
            code: "MALFORMED_RESPONSE".into(),
            reason: "the server's reply carried neither predictions nor an error".into(),
        },
    };
    FileResult {
        input: input.clone(),
        request_id: response.request_id,
        outcome,
        server_id: response.server_id,
        latency: Some(latency),
    }
}

/// Most requests published in one `publish_batch`.
const SEND_BATCH: usize = 32;

/// Longest wait for a few window slots at once before taking a single one (see
/// [`Outbox::window_slot`]): a few replies' time on a slow broker.
const REFILL_WAIT: Duration = Duration::from_millis(20);

#[allow(clippy::too_many_arguments)]
async fn send_all(
    pending: Pending,
    broker: Arc<dyn Broker>,
    files: Vec<InputFile>,
    options: JobOptions,
    job_id: String,
    reply_topic: String,
    window: Arc<Semaphore>,
    sent: mpsc::UnboundedSender<Sent>,
    max_request_bytes: usize,
) {
    // Files are read whole only if they can be sent, or downscaled to be.
    let read_limit = match options.resize_to {
        Some(_) => options.max_file_bytes,
        None => options.max_file_bytes.min(max_request_bytes),
    };
    let local_failure = |index: usize, (code, reason): (&'static str, String)| {
        let _ = sent.send(Sent::LocalFailure {
            index,
            code,
            reason,
        });
    };
    let mut outbox = Outbox {
        broker: &*broker,
        options: &options,
        pending: &pending,
        window: &window,
        local_failure: &local_failure,
        batch: Vec::new(),
    };
    let mut read_ahead: std::collections::VecDeque<FileRead> = std::collections::VecDeque::new();
    // Window slots taken but not yet used by a file.
    let mut slots = None;
    for (index, file) in files.iter().enumerate() {
        let refill = (options.window / 4)
            .clamp(1, SEND_BATCH)
            .min(files.len() - index);
        let Some(permit) = outbox.window_slot(&window, &mut slots, refill).await else {
            return;
        };
        if read_ahead.is_empty() {
            read_ahead.extend(read_chunk(&files[index..], read_limit).await);
        }
        let bytes = match read_ahead
            .pop_front()
            .unwrap_or_else(|| Err(("UNREADABLE_FILE", "the file was not read".to_string())))
        {
            Ok(bytes) => bytes,
            Err(failure) => {
                local_failure(index, failure);
                continue; // the permit is dropped: the slot is free again
            }
        };
        let request_id = new_request_id();
        let request = ClassifyRequest {
            schema_version: SCHEMA_VERSION,
            request_id: request_id.clone(),
            job_id: job_id.clone(),
            image: bytes,
            file_name: file.display_name.clone(),
            content_type: content_type(&file.path).to_string(),
            reply_topic: reply_topic.clone(),
            sent_at_unix_micros: unix_micros_now(),
            attributes: HashMap::new(),
            top_k: options.top_k,
            model_name: options.model_name.clone(),
        };
        let message = match fit_request(request, max_request_bytes, options.resize_to).await {
            Ok(message) => message,
            Err(failure) => {
                local_failure(index, failure);
                continue;
            }
        };
        // From here the slot is returned when the reply arrives.
        permit.forget();
        outbox.batch.push((index, request_id, message));
        if outbox.batch.len() >= SEND_BATCH {
            outbox.flush().await;
        }
    }
    outbox.flush().await;
    let _ = sent.send(Sent::Done);
}

/// A new request id: 128 random bits (from `rand`'s thread-local generator, a CSPRNG
/// seeded by the operating system), as 32 hex digits. A reply is accepted only for an id the job sent,
/// so ids must not be guessable: a peer that sees the job's reply topic could otherwise
/// answer for the servers (issue 28).
fn new_request_id() -> String {
    // Not a UUIDv4: that carries only 122 random bits.
    format!("{:032x}", rand::random::<u128>())
}

/// The error code and reason reported for a file that was not sent.
type Failure = (&'static str, String);

/// The largest request this job sends: what the broker takes on the request topic, or
/// less if `--max-bytes` says so.
async fn request_size_limit(broker: &dyn Broker, options: &JobOptions) -> usize {
    let broker_limit = match broker.max_message_bytes(&options.request_topic).await {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "asking the broker for the request topic's size limit failed; using the client's own");
            broker.features().max_message_bytes
        }
    };
    options
        .max_request_bytes
        .map_or(broker_limit, |ours| ours.min(broker_limit))
}

/// The broker message that carries `request`.
fn request_message(request: &ClassifyRequest) -> Message {
    let request_id = request.request_id.clone();
    Message::new(request.encode_to_vec())
        .with_key(request_id.clone())
        .with_attribute(attributes::REQUEST_ID, request_id)
        .with_attribute(attributes::REPLY_TOPIC, request.reply_topic.clone())
        .with_attribute(attributes::JOB_ID, request.job_id.clone())
        .with_attribute(attributes::CONTENT_TYPE, CONTENT_TYPE_REQUEST)
}

/// The message for `request` if it fits in `limit` bytes: as it is, or (with
/// `resize_to`) with its image downscaled to fit `resize_to` pixels a side and
/// re-encoded as PNG. Otherwise `FILE_TOO_LARGE`, naming the limit.
async fn fit_request(
    mut request: ClassifyRequest,
    limit: usize,
    resize_to: Option<u32>,
) -> Result<Message, Failure> {
    let message = request_message(&request);
    if message.size() <= limit {
        return Ok(message);
    }
    let too_large = |size: usize, what: &str| {
        (
            "FILE_TOO_LARGE",
            format!("the request {what} is {size} bytes; the broker accepts at most {limit}"),
        )
    };
    let Some(side) = resize_to else {
        let (code, reason) = too_large(message.size(), "for this file");
        return Err((
            code,
            format!("{reason} (--resize-to downscales large images)"),
        ));
    };
    drop(message);
    let original = std::mem::take(&mut request.image);
    let downscaled = tokio::task::spawn_blocking(move || crate::downscale::to_png(&original, side))
        .await
        .map_err(|error| ("FILE_TOO_LARGE", format!("downscaling failed: {error}")))?
        .map_err(|error| {
            (
                "FILE_TOO_LARGE",
                format!("the file is too large to send and cannot be downscaled: {error:#}"),
            )
        })?;
    request.image = downscaled;
    request.content_type = "image/png".to_string();
    let message = request_message(&request);
    if message.size() <= limit {
        Ok(message)
    } else {
        let (code, reason) = too_large(message.size(), &format!("downscaled to {side} px"));
        Err((code, format!("{reason} (try a smaller --resize-to)")))
    }
}

/// Requests read and built but not yet published, with what publishing them needs.
struct Outbox<'a> {
    broker: &'a dyn Broker,
    options: &'a JobOptions,
    pending: &'a Pending,
    window: &'a Semaphore,
    local_failure: &'a (dyn Fn(usize, Failure) + Sync),
    /// (file index, request id, message) of each request waiting to be published.
    batch: Vec<(usize, String, Message)>,
}

impl Outbox<'_> {
    /// One window slot: one taken earlier (`slots`), else one free right now, else,
    /// after sending what is batched, one of `refill` taken once that many are free
    /// (the rest kept in `slots`; after [`REFILL_WAIT`], one alone). Waiting for a few
    /// rather than one: a full window refilled one reply at a time would send requests
    /// one at a time, each waking the servers. `None` once the window is closed.
    async fn window_slot(
        &mut self,
        window: &Arc<Semaphore>,
        slots: &mut Option<OwnedSemaphorePermit>,
        refill: usize,
    ) -> Option<OwnedSemaphorePermit> {
        loop {
            if let Some(permit) = slots.as_mut().and_then(|slots| slots.split(1)) {
                return Some(permit);
            }
            if let Ok(permit) = Arc::clone(window).try_acquire_owned() {
                return Some(permit);
            }
            self.flush().await;
            let refill = u32::try_from(refill.max(1)).unwrap_or(u32::MAX);
            let many = Arc::clone(window).acquire_many_owned(refill);
            *slots = Some(match tokio::time::timeout(REFILL_WAIT, many).await {
                Ok(many) => many.ok()?,
                // Slots can be lost for good (a request that will never be answered):
                // waiting for `refill` of them must not stop the sending while one is free.
                Err(_) => Arc::clone(window).acquire_owned().await.ok()?,
            });
        }
    }

    /// Publishes the batch and empties it, retrying with backoff until the broker
    /// confirms it. (A batch that was partly published before an error is sent again;
    /// the server may then answer twice, which the receiver counts as duplicates.)
    ///
    /// Should the broker refuse the batch for its size (a limit lower than it said), each
    /// request is published alone, and those refused again are reported as
    /// `FILE_TOO_LARGE` through `local_failure`, their window slots given back.
    async fn flush(&mut self) {
        let (broker, options, pending, window, local_failure) = (
            self.broker,
            self.options,
            self.pending,
            self.window,
            self.local_failure,
        );
        let batch = &mut self.batch;
        if batch.is_empty() {
            return;
        }
        let at = Instant::now();
        // Register the requests before publishing so a fast reply always finds them;
        // the registry keeps each message (to send it again), the broker gets a copy.
        let mut messages = Vec::with_capacity(batch.len());
        let mut sent = Vec::with_capacity(batch.len());
        {
            let mut pending = lock(pending);
            for (index, request_id, message) in batch.drain(..) {
                messages.push(message.clone());
                pending.insert(
                    request_id.clone(),
                    Unanswered {
                        index,
                        sent_at: at,
                        message,
                    },
                );
                sent.push((index, request_id));
            }
        }
        if let Err(BrokerError::MessageTooLarge { .. }) =
            publish_until_confirmed(broker, options, messages).await
        {
            for (index, request_id) in sent {
                let Some(message) = lock(pending)
                    .get(&request_id)
                    .map(|unanswered| unanswered.message.clone())
                else {
                    continue; // answered meanwhile
                };
                let published = publish_until_confirmed(broker, options, vec![message]).await;
                if let Err(error @ BrokerError::MessageTooLarge { .. }) = published {
                    // A reply that came meanwhile already freed the slot and counted.
                    if lock(pending).remove(&request_id).is_none() {
                        continue;
                    }
                    window.add_permits(1);
                    local_failure(
                        index,
                        (
                            "FILE_TOO_LARGE",
                            format!("the broker refused the request: {error}"),
                        ),
                    );
                }
            }
        }
    }
}

/// Delays between attempts to publish requests: 100 ms doubling to 5 s.
const REQUEST_PUBLISH_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), 2, Duration::from_secs(5));

/// Publishes requests, retrying with backoff until the broker confirms them. A restarted
/// broker that lost the request topic gets it (and the servers' subscription) again.
/// Returns the final error if retrying cannot help.
async fn publish_until_confirmed(
    broker: &dyn Broker,
    options: &JobOptions,
    messages: Vec<Message>,
) -> unified_broker::Result<()> {
    let publish = || async {
        let result = broker
            .publish_batch(&options.request_topic, messages.clone())
            .await;
        if let Err(BrokerError::TopicNotFound(_)) = result {
            if let Err(error) = ensure_request_topic(broker, options).await {
                tracing::warn!(%error, "re-creating the request topic failed");
            }
        }
        result
    };
    let published = retry(REQUEST_PUBLISH_BACKOFF, publish, |error, delay| {
        let missing_topic = matches!(error, BrokerError::TopicNotFound(_));
        let retrying = missing_topic || error.is_retryable();
        if retrying {
            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "publishing requests failed; retrying");
        }
        retrying
    })
    .await;
    if let Err(error) = &published {
        // Closed client, bad configuration, too large...: retrying cannot help. Unless
        // the caller reports them otherwise, the requests stay registered and are
        // reported unanswered after the timeout.
        tracing::error!(%error, count = messages.len(), "publishing requests failed for good");
    }
    published
}

/// Creates the request topic and the servers' subscription if they do not exist, so
/// requests are kept for the servers even before they (re)subscribe.
async fn ensure_request_topic(
    broker: &dyn Broker,
    options: &JobOptions,
) -> unified_broker::Result<()> {
    broker
        .ensure_topic_and_subscription(&options.request_topic, &options.server_group)
        .await
}

/// Sends every unanswered request again. Called when the reply subscription had to be
/// re-created: the broker was lost, and may have lost its state with it (a restart of a
/// memory-only broker), in which case the requests it held are gone and waiting for
/// them would only end in the timeout. After a mere outage of a broker that kept its
/// state, this costs duplicate work: replies to both copies are de-duplicated by
/// request id (counted as duplicates).
///
/// Which requests count as unanswered is read only once the request topic and the
/// servers' subscription exist again. A request is registered before it is published,
/// so one registered later is published to a subscription that exists; one registered
/// earlier may have reached the topic in the moment between its re-creation and the
/// subscription's (a broker that drops messages no subscription holds, as Pub/Sub does
/// and a Redis group created at the stream's end does), and is sent again here.
fn resend_unanswered(
    broker: &Arc<dyn Broker>,
    options: &JobOptions,
    pending: &Pending,
    resends: &mut tokio::task::JoinSet<()>,
) {
    if lock(pending).is_empty() {
        return;
    }
    let broker = Arc::clone(broker);
    let options = options.clone();
    let pending = Arc::clone(pending);
    resends.spawn(async move {
        if let Err(error) = ensure_request_topic(&*broker, &options).await {
            tracing::warn!(%error, "re-creating the request topic failed");
        }
        let messages: Vec<Message> = lock(&pending)
            .values()
            .map(|unanswered| unanswered.message.clone())
            .collect();
        tracing::warn!(
            count = messages.len(),
            "the reply subscription had to be re-created (the broker may have lost its state); sending the unanswered requests again"
        );
        for chunk in messages.chunks(SEND_BATCH) {
            // A final failure was logged; those requests end unanswered.
            let _ = publish_until_confirmed(&*broker, &options, chunk.to_vec()).await;
        }
    });
}

/// One file's bytes, or the error code and reason to report for it.
type FileRead = Result<Vec<u8>, (&'static str, String)>;

/// Files read ahead at most: this many, or until this many bytes were read.
const READ_AHEAD_FILES: usize = SEND_BATCH;
const READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;

/// Reads the next few of `files` (at least one, if any) in one trip to the blocking
/// thread pool: a round trip per file costs more than reading a small image.
async fn read_chunk(files: &[InputFile], max_bytes: usize) -> Vec<FileRead> {
    let paths: Vec<std::path::PathBuf> = files
        .iter()
        .take(READ_AHEAD_FILES)
        .map(|file| file.path.clone())
        .collect();
    let reading = tokio::task::spawn_blocking(move || {
        let mut read = Vec::with_capacity(paths.len());
        let mut bytes = 0;
        for path in &paths {
            let result = read_file(path, max_bytes);
            bytes += result.as_ref().map_or(0, Vec::len);
            read.push(result);
            if bytes >= READ_AHEAD_BYTES {
                break;
            }
        }
        read
    });
    match reading.await {
        Ok(read) => read,
        Err(error) => vec![Err((
            "UNREADABLE_FILE",
            format!("reading the file failed: {error}"),
        ))],
    }
}

/// Reads one file (blocking), refusing files larger than `max_bytes` before reading,
/// and anything but a regular file. One open and one `fstat` (not a lookup of the path
/// for its size, then another to read it): for small images the syscalls are most of
/// the cost.
fn read_file(path: &std::path::Path, max_bytes: usize) -> FileRead {
    use std::io::Read;
    let unreadable = |e: std::io::Error| ("UNREADABLE_FILE", format!("cannot read the file: {e}"));
    let too_large = |size: String| {
        (
            "FILE_TOO_LARGE",
            format!(
                "the file is {size} bytes; the client sends at most {max_bytes} \
                 (--resize-to downscales large images)"
            ),
        )
    };
    let file = open_without_blocking(path).map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        // The walk sends regular files only; this one was replaced since.
        let kind = crate::inputs::kind_name(&metadata.file_type());
        let reason = format!("not a regular file ({kind}); not read");
        return Err(("UNREADABLE_FILE", reason));
    }
    let len = metadata.len();
    if len > max_bytes as u64 {
        return Err(too_large(len.to_string()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // At most one byte more than allowed: a file that grew since, or one whose size
    // says nothing (`/proc`), is not read without end.
    let cap = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    file.take(cap).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() > max_bytes {
        return Err(too_large(format!("more than {max_bytes}")));
    }
    Ok(bytes)
}

/// `O_NONBLOCK` where its value is known without the `libc` crate (Linux on the common
/// architectures); elsewhere files are opened plainly and only the walk keeps FIFOs out.
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "s390x",
        target_arch = "powerpc64"
    )
))]
const O_NONBLOCK: Option<i32> = Some(0o4000);
#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "s390x",
        target_arch = "powerpc64"
    )
)))]
const O_NONBLOCK: Option<i32> = None;

/// Opens `path` for reading without waiting: a FIFO put where a file was (after the
/// walk) would block the open until a writer came, holding a blocking-pool thread and
/// the process's exit. Reads of regular files do not care about the flag.
fn open_without_blocking(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    if let Some(flag) = O_NONBLOCK {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(flag);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::read_file;

    #[test]
    fn a_file_is_read_whole_up_to_the_limit_and_refused_beyond_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.png");
        std::fs::write(&path, [7u8; 100]).expect("write");
        assert_eq!(read_file(&path, 100).expect("read"), vec![7u8; 100]);
        let (code, _) = read_file(&path, 99).expect_err("one byte too many");
        assert_eq!(code, "FILE_TOO_LARGE");
    }

    /// A file whose size says nothing (`/proc`: size 0, contents longer) is read no
    /// further than one byte past the limit.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_file_without_a_size_is_not_read_without_end() {
        let (code, reason) =
            read_file(std::path::Path::new("/proc/self/maps"), 10).expect_err("refused");
        assert_eq!(code, "FILE_TOO_LARGE");
        assert!(reason.contains("more than 10 bytes"), "{reason}");
    }

    /// A device or a FIFO (one that replaced a file after the walk) is refused without
    /// being read, and opening the FIFO does not wait for a writer.
    #[cfg(target_os = "linux")]
    #[test]
    fn only_regular_files_are_read() {
        let (code, reason) =
            read_file(std::path::Path::new("/dev/zero"), 1000).expect_err("refused");
        assert_eq!(code, "UNREADABLE_FILE");
        assert!(reason.contains("a character device"), "{reason}");
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("pipe.png");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (code, reason) = read_file(&fifo, 1000).expect_err("refused");
        assert_eq!(code, "UNREADABLE_FILE");
        assert!(reason.contains("a FIFO"), "{reason}");
    }

    /// Request ids are 32 hex digits, different every time.
    #[test]
    fn request_ids_are_random() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| super::new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())));
    }

    /// A reply is the job's only with its job id and a request id it sent; one with the
    /// job's id for a request already answered is a duplicate.
    #[test]
    fn replies_are_judged_by_job_id_and_request_id() {
        use super::{judge, Pending, Unanswered, Verdict};
        use classifier_proto::ClassifyResponse;
        let pending: Pending = Default::default();
        let unanswered = |index| Unanswered {
            index,
            sent_at: std::time::Instant::now(),
            message: unified_broker::Message::new(Vec::new()),
        };
        super::lock(&pending).insert("r1".into(), unanswered(0));
        let answered: std::collections::HashSet<String> = ["r0".to_string()].into();
        let reply = |request_id: &str, job_id: &str| ClassifyResponse {
            request_id: request_id.into(),
            job_id: job_id.into(),
            ..Default::default()
        };
        let verdict = |response| judge("job", &pending, &answered, &response);
        assert!(matches!(
            verdict(reply("r1", "other")),
            Verdict::Rejected(_)
        ));
        assert!(matches!(verdict(reply("r1", "")), Verdict::Rejected(_)));
        assert!(matches!(
            verdict(reply("guess", "job")),
            Verdict::Rejected(_)
        ));
        assert!(matches!(verdict(reply("r0", "job")), Verdict::Duplicate));
        assert!(matches!(
            verdict(reply("r1", "job")),
            Verdict::Answer(Unanswered { index: 0, .. })
        ));
        assert!(
            super::lock(&pending).is_empty(),
            "answered: no longer pending"
        );
    }
}
