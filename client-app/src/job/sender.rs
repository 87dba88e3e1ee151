//! Publishing a job's requests: one per file, within the window, in batches, retried
//! until the broker confirms them; and publishing the unanswered ones again after the
//! broker may have lost them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use classifier_app::trace::TraceContext;
use classifier_proto::{
    attributes, deadline_after, unix_micros_now, ClassifyRequest, ProstMessage,
    CONTENT_TYPE_REQUEST, SCHEMA_VERSION,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use unified_broker::retry::retry;
use unified_broker::{Backoff, Broker, BrokerError, Message};

use super::budget::ByteBudget;
use super::files::{read_chunk, FileRead};
use super::pending::{Pending, Unanswered};
use super::{Failure, JobOptions, Sent};
use crate::inputs::{content_type, InputFile};

/// Most requests published in one `publish_batch`.
pub(super) const SEND_BATCH: usize = 32;

/// Most `publish_batch` calls awaiting the broker's confirmation at once. Publishing
/// one batch at a time would pace the whole job by the broker's produce round trip
/// (on Kafka `linger.ms` plus the broker's acknowledgement: 32 requests per ~10 ms),
/// far below what the servers answer; librdkafka merges concurrent batches into its
/// own produce requests anyway.
const PUBLISHES_IN_FLIGHT: usize = 8;

/// Longest wait for a few window slots at once before taking a single one (see
/// [`Outbox::window_slot`]): a few replies' time on a slow broker.
const REFILL_WAIT: Duration = Duration::from_millis(20);

/// Delays between attempts to publish requests: 100 ms doubling to 5 s.
const REQUEST_PUBLISH_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), 2, Duration::from_secs(5));

/// Everything the sending task needs: the job's files and names, where to publish, the
/// window it shares with the waiting job, and where to tell it of files not sent.
pub(super) struct Sender {
    pub broker: Arc<dyn Broker>,
    pub options: JobOptions,
    pub files: Vec<InputFile>,
    pub job_id: String,
    /// Where the servers answer (a field of every request).
    pub reply_topic: String,
    /// Every request is registered here before it is published.
    pub pending: Pending,
    /// One slot per request unanswered; the waiting job gives them back.
    pub window: Arc<Semaphore>,
    /// The bytes of requests unanswered; the waiting job gives them back.
    pub budget: ByteBudget,
    /// Files not sent, and the end of sending.
    pub sent: mpsc::UnboundedSender<Sent>,
    /// The largest request the broker takes (see [`request_size_limit`]).
    pub max_request_bytes: usize,
    /// The trace context every request carries (the job's span), if traced.
    pub trace: Option<TraceContext>,
}

impl Sender {
    /// Sends every file (or reports why not), each taking a window slot first, then
    /// says [`Sent::Done`]. Ends early if the window is closed.
    pub async fn send_all(self) {
        // Files are read whole only if they can be sent, or downscaled to be.
        let read_limit = match self.options.resize_to {
            Some(_) => self.options.max_file_bytes,
            None => self.options.max_file_bytes.min(self.max_request_bytes),
        };
        let sender = Arc::new(self);
        let this = &*sender;
        let mut outbox = Outbox {
            sender: Arc::clone(&sender),
            batch: Vec::new(),
            publishing: JoinSet::new(),
        };
        let mut read_ahead: VecDeque<FileRead> = VecDeque::new();
        // Window slots taken but not yet used by a file.
        let mut slots = None;
        for (index, file) in this.files.iter().enumerate() {
            let refill = (this.options.window / 4)
                .clamp(1, SEND_BATCH)
                .min(this.files.len() - index);
            let Some(permit) = outbox.window_slot(&mut slots, refill).await else {
                return;
            };
            if read_ahead.is_empty() {
                read_ahead.extend(read_chunk(&this.files[index..], read_limit).await);
            }
            let read = read_ahead
                .pop_front()
                .unwrap_or_else(|| Err(Failure::unreadable("the file was not read")));
            match this.request_message(file, read).await {
                Ok((request_id, message)) => {
                    let Some(bytes) = outbox.byte_room(message.size()).await else {
                        return;
                    };
                    // From here the slot and the bytes are returned when the reply
                    // arrives.
                    permit.forget();
                    bytes.forget();
                    outbox.push(index, request_id, message).await;
                }
                // The permit is dropped: the slot is free again.
                Err(failure) => this.local_failure(index, failure),
            }
        }
        outbox.flush().await;
        outbox.published().await;
        let _ = this.sent.send(Sent::Done);
    }

    /// The request id and the broker message for `file`, from its bytes as read: the
    /// request as it is, or downscaled to fit (see [`fit_request`]).
    async fn request_message(
        &self,
        file: &InputFile,
        read: FileRead,
    ) -> Result<(String, Message), Failure> {
        let image = read?;
        let request_id = new_request_id();
        let sent_at = unix_micros_now();
        let request = ClassifyRequest {
            schema_version: SCHEMA_VERSION,
            request_id: request_id.clone(),
            job_id: self.job_id.clone(),
            image,
            file_name: file.display_name.clone(),
            content_type: content_type(&file.path).to_string(),
            reply_topic: self.reply_topic.clone(),
            sent_at_unix_micros: sent_at,
            attributes: HashMap::new(),
            top_k: self.options.top_k,
            model_name: self.options.model_name.clone(),
            // After the reply timeout the job may have given up: a server that takes the
            // request later skips the model (a backlog left by clients long gone costs no
            // inference).
            deadline_unix_micros: deadline_after(sent_at, self.options.reply_timeout),
        };
        let limit = self.max_request_bytes;
        let message =
            fit_request(request, limit, self.options.resize_to, self.trace.as_ref()).await?;
        Ok((request_id, message))
    }

    /// Tells the waiting job that file `index` was not sent, and why.
    fn local_failure(&self, index: usize, failure: Failure) {
        let _ = self.sent.send(Sent::LocalFailure { index, failure });
    }
}

/// A new request id: 128 random bits (from `rand`'s thread-local generator, a CSPRNG
/// seeded by the operating system), as 32 hex digits. A reply is accepted only for an id the job sent,
/// so ids must not be guessable: a peer that sees the job's reply topic could otherwise
/// answer for the servers (issue 28). The HTTP gateway uses it too.
pub fn new_request_id() -> String {
    // Not a UUIDv4: that carries only 122 random bits.
    format!("{:032x}", rand::random::<u128>())
}

/// `message` (a request this job encoded) with a deadline `reply_timeout` from now: a
/// request sent again gets a full timeout again, as the job gives it.
fn with_new_deadline(message: Message, reply_timeout: Duration) -> Message {
    let Ok(mut request) = ClassifyRequest::decode(message.payload.as_ref()) else {
        return message;
    };
    request.deadline_unix_micros = deadline_after(unix_micros_now(), reply_timeout);
    Message {
        payload: request.encode_to_vec().into(),
        ..message
    }
}

/// The largest request this job sends: what the broker takes on the request topic, or
/// less if `--max-bytes` says so.
pub(super) async fn request_size_limit(broker: &dyn Broker, options: &JobOptions) -> usize {
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

/// The broker message that carries `request`: its encoding, with the routing attributes
/// of the wire contract and the W3C `trace` context if any, and no key (see
/// [`with_request_routing`]). The HTTP gateway frames its requests with it too.
pub fn request_message(request: &ClassifyRequest, trace: Option<&TraceContext>) -> Message {
    let mut message = with_request_routing(
        Message::new(request.encode_to_vec()),
        &request.request_id,
        &request.reply_topic,
        &request.job_id,
    );
    if let Some(trace) = trace {
        trace.write_to(&mut message.attributes);
    }
    message
}

/// `payload` (an encoded request) framed as a request: the routing attributes, and no
/// key. Requests need no order among themselves, and an unkeyed batch is one Kafka
/// produce request: librdkafka's sticky partitioner puts unkeyed records into one
/// partition at a time, switching every `2 × linger.ms`, so batches still spread over
/// the partitions (and the servers). Keyed by request id, each batch was split over
/// every partition: 2.4× the produce requests and 25% fewer images/s end to end
/// (`docs/benchmarks.md`, 2026-12-08). The benchmark's transport floor frames
/// pre-encoded requests with it, so they look exactly like ours.
pub(crate) fn with_request_routing(
    payload: Message,
    request_id: &str,
    reply_topic: &str,
    job_id: &str,
) -> Message {
    payload
        .with_attribute(attributes::REQUEST_ID, request_id)
        .with_attribute(attributes::REPLY_TOPIC, reply_topic)
        .with_attribute(attributes::JOB_ID, job_id)
        .with_attribute(attributes::CONTENT_TYPE, CONTENT_TYPE_REQUEST)
}

/// The message for `request` if it fits in `limit` bytes: as it is, or (with
/// `resize_to`) with its image downscaled to fit `resize_to` pixels a side and
/// re-encoded as PNG. Otherwise `FILE_TOO_LARGE`, naming the limit.
async fn fit_request(
    mut request: ClassifyRequest,
    limit: usize,
    resize_to: Option<u32>,
    trace: Option<&TraceContext>,
) -> Result<Message, Failure> {
    let message = request_message(&request, trace);
    if message.size() <= limit {
        return Ok(message);
    }
    let too_large = |size: usize, what: &str, hint: &str| {
        Failure::too_large(format!(
            "the request {what} is {size} bytes; the broker accepts at most {limit} ({hint})"
        ))
    };
    let Some(side) = resize_to else {
        let hint = "--resize-to downscales large images";
        return Err(too_large(message.size(), "for this file", hint));
    };
    drop(message);
    let original = std::mem::take(&mut request.image);
    let downscaled = tokio::task::spawn_blocking(move || crate::downscale::to_png(&original, side))
        .await
        .map_err(|error| Failure::too_large(format!("downscaling failed: {error}")))?
        .map_err(|error| {
            Failure::too_large(format!(
                "the file is too large to send and cannot be downscaled: {error:#}"
            ))
        })?;
    request.image = downscaled;
    request.content_type = "image/png".to_string();
    let message = request_message(&request, trace);
    if message.size() <= limit {
        Ok(message)
    } else {
        let what = format!("downscaled to {side} px");
        Err(too_large(
            message.size(),
            &what,
            "try a smaller --resize-to",
        ))
    }
}

/// Requests read and built but not yet published, with the sender they belong to, and
/// the batches being published.
struct Outbox {
    sender: Arc<Sender>,
    /// (file index, request id, message) of each request waiting to be published.
    batch: Vec<(usize, String, Message)>,
    /// One task per batch awaiting the broker's confirmation (at most
    /// [`PUBLISHES_IN_FLIGHT`]).
    publishing: JoinSet<()>,
}

impl Outbox {
    /// One window slot: one taken earlier (`slots`), else one free right now, else,
    /// after sending what is batched, one of `refill` taken once that many are free
    /// (the rest kept in `slots`; after [`REFILL_WAIT`], one alone). Waiting for a few
    /// rather than one: a full window refilled one reply at a time would send requests
    /// one at a time, each waking the servers. `None` once the window is closed.
    async fn window_slot(
        &mut self,
        slots: &mut Option<OwnedSemaphorePermit>,
        refill: usize,
    ) -> Option<OwnedSemaphorePermit> {
        let window = Arc::clone(&self.sender.window);
        loop {
            if let Some(permit) = slots.as_mut().and_then(|slots| slots.split(1)) {
                return Some(permit);
            }
            if let Ok(permit) = Arc::clone(&window).try_acquire_owned() {
                return Some(permit);
            }
            self.flush().await;
            let refill = u32::try_from(refill.max(1)).unwrap_or(u32::MAX);
            let many = Arc::clone(&window).acquire_many_owned(refill);
            *slots = Some(match tokio::time::timeout(REFILL_WAIT, many).await {
                Ok(many) => many.ok()?,
                // Slots can be lost for good (a request that will never be answered):
                // waiting for `refill` of them must not stop the sending while one is free.
                Err(_) => Arc::clone(&window).acquire_owned().await.ok()?,
            });
        }
    }

    /// Room in the byte budget for a request of `size` bytes: now, else after sending
    /// what is batched (whose answers are what frees room), once answers freed it.
    /// `None` once the budget is closed.
    async fn byte_room(&mut self, size: usize) -> Option<OwnedSemaphorePermit> {
        if let Some(room) = self.sender.budget.try_take(size) {
            return Some(room);
        }
        self.flush().await;
        self.sender.budget.take(size).await
    }

    /// Adds a request to the batch, and publishes the batch once it is full.
    async fn push(&mut self, index: usize, request_id: String, message: Message) {
        self.batch.push((index, request_id, message));
        if self.batch.len() >= SEND_BATCH {
            self.flush().await;
        }
    }

    /// Empties the batch into a task that publishes it, retrying with backoff until the
    /// broker confirms it, once fewer than [`PUBLISHES_IN_FLIGHT`] are publishing. (A
    /// batch that was partly published before an error is sent again; the server may
    /// then answer twice, which the receiver counts as duplicates.)
    ///
    /// Should the broker refuse the batch for its size (a limit lower than it said), each
    /// request is published alone, and those refused again are reported as
    /// `FILE_TOO_LARGE`, their window slots given back.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        while self.publishing.len() >= PUBLISHES_IN_FLIGHT {
            self.publishing.join_next().await;
        }
        let sender = Arc::clone(&self.sender);
        let at = Instant::now();
        // Register the requests before publishing so a fast reply always finds them;
        // the registry keeps each message (to send it again), the broker gets a copy.
        let mut messages = Vec::with_capacity(self.batch.len());
        let mut sent = Vec::with_capacity(self.batch.len());
        let mut registered = Vec::with_capacity(self.batch.len());
        for (index, request_id, message) in self.batch.drain(..) {
            messages.push(message.clone());
            sent.push((index, request_id.clone()));
            let unanswered = Unanswered {
                index,
                sent_at: at,
                message,
            };
            registered.push((request_id, unanswered));
        }
        sender.pending.register(registered);
        self.publishing.spawn(async move {
            if let Err(BrokerError::MessageTooLarge { .. }) =
                publish_until_confirmed(&*sender.broker, &sender.options, messages).await
            {
                for (index, request_id) in sent {
                    sender.publish_alone(index, &request_id).await;
                }
            }
        });
    }

    /// Waits until every batch handed to a task was published (or failed for good).
    async fn published(&mut self) {
        while self.publishing.join_next().await.is_some() {}
    }
}

impl Sender {
    /// Publishes the registered request `request_id` (of file `index`) alone, after its
    /// batch was refused for its size; reports it `FILE_TOO_LARGE` if the broker refuses
    /// it too.
    async fn publish_alone(&self, index: usize, request_id: &str) {
        let Some(message) = self.pending.message(request_id) else {
            return; // answered meanwhile
        };
        let published = publish_until_confirmed(&*self.broker, &self.options, vec![message]).await;
        if let Err(error @ BrokerError::MessageTooLarge { .. }) = published {
            // A reply that came meanwhile already freed the slot and counted.
            let Some(refused) = self.pending.take(request_id) else {
                return;
            };
            self.window.add_permits(1);
            self.budget.give_back(refused.message.size());
            let reason = format!("the broker refused the request: {error}");
            self.local_failure(index, Failure::too_large(reason));
        }
    }
}

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
pub(super) async fn ensure_request_topic(
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
pub(super) fn resend_unanswered(
    broker: &Arc<dyn Broker>,
    options: &JobOptions,
    pending: &Pending,
    resends: &mut JoinSet<()>,
) {
    if pending.is_empty() {
        return;
    }
    let broker = Arc::clone(broker);
    let options = options.clone();
    let pending = pending.clone();
    resends.spawn(async move {
        if let Err(error) = ensure_request_topic(&*broker, &options).await {
            tracing::warn!(%error, "re-creating the request topic failed");
        }
        let messages: Vec<Message> = pending
            .messages()
            .into_iter()
            .map(|message| with_new_deadline(message, options.reply_timeout))
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

#[cfg(test)]
mod tests {
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
}
