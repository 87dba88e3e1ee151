//! The transport floor: what end to end could be at best through this broker.
//!
//! A classification is four hops through the broker: the client publishes a request,
//! a server consumes it, the server publishes the reply, the client consumes it. The
//! floor makes the same four hops with the same messages (real `ClassifyRequest`s of the
//! input files, reply-sized answers, the same keys and attributes), the same broker
//! client and settings, the same window and the same acks (a request is acked only after
//! its answer was published), but with nothing done in between: no protobuf decoding,
//! image decoding or model. An echo task plays the server on a topic of its own, so the
//! real servers never see these messages.
//!
//! The figure answers "how much of what the broker allows do we reach?": end to end as
//! a share of the floor is our overhead, the floor as a share of model-only is the
//! broker's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use classifier_proto::{
    attributes, ClassifyRequest, ClassifyResponse, Prediction, Predictions, ProstMessage as _,
    SCHEMA_VERSION,
};
use classifier_server::request::response_message;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use unified_broker::{Broker, Delivery, Message, SubscribeOptions, Subscriber};

use crate::inputs::InputFile;
use crate::job::with_request_routing;

/// Most requests the echo answers with one `publish_batch` (the server's batches are
/// of the same order).
const ECHO_BATCH: usize = 256;

/// How long a floor run may wait for its last answers before it gives up.
const FLOOR_TIMEOUT: Duration = Duration::from_secs(120);

/// The messages of one floor run: the requests to send and the answer the echo gives.
pub(super) struct FloorMessages {
    /// Encoded `ClassifyRequest`s of the input files, in order (cycled to the run's size).
    requests: Vec<Message>,
    /// A server's answer as it frames it, the size of a real one (top-k predictions).
    reply: Message,
}

impl FloorMessages {
    /// The requests for `files` (read once) and a reply with `top_k` predictions.
    pub(super) fn new(files: &[InputFile], top_k: u32) -> anyhow::Result<Self> {
        let requests = files
            .iter()
            .map(|file| {
                let image = std::fs::read(&file.path)?;
                Ok(Message::new(
                    floor_request(image, &file.display_name).encode_to_vec(),
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let reply = response_message(&reply_like(top_k.max(1)));
        Ok(FloorMessages { requests, reply })
    }
}

/// A request as the client sends it (ids, names and times of real length).
fn floor_request(image: Vec<u8>, file_name: &str) -> ClassifyRequest {
    ClassifyRequest {
        schema_version: SCHEMA_VERSION,
        request_id: format!("{:032x}", rand::random::<u128>()),
        job_id: uuid::Uuid::new_v4().to_string(),
        image,
        file_name: file_name.to_string(),
        content_type: "image/png".to_string(),
        reply_topic: format!("classify-replies-{}", uuid::Uuid::new_v4()),
        sent_at_unix_micros: 1_765_000_000_000_000,
        attributes: HashMap::new(),
        top_k: 0,
        model_name: String::new(),
        deadline_unix_micros: 1_765_000_060_000_000,
    }
}

/// A reply as a server sends it: `top_k` predictions with class names and timings.
fn reply_like(top_k: u32) -> ClassifyResponse {
    let top_k = (0..top_k)
        .map(|index| Prediction {
            class_name: format!("class name {index}"),
            class_index: index,
            probability: 0.1,
        })
        .collect();
    ClassifyResponse {
        schema_version: SCHEMA_VERSION,
        request_id: format!("{:032x}", rand::random::<u128>()),
        job_id: uuid::Uuid::new_v4().to_string(),
        outcome: Some(classifier_proto::Outcome::Predictions(Predictions {
            top_k,
            model_name: "fashion-mnist".to_string(),
            model_version: "2026-12-06T00:00:00Z".to_string(),
        })),
        server_id: format!("server-{}", uuid::Uuid::new_v4()),
        queue_time_micros: 1_234,
        inference_time_micros: 5_678,
        file_name: "examples/some-class/0001.png".to_string(),
        sent_at_unix_micros: 1_765_000_000_000_000,
        attributes: HashMap::new(),
        batch_size: 32,
    }
}

/// One floor run's figures.
pub(super) struct FloorRun {
    /// Answers per second, first send to last answer.
    pub images_per_second: f64,
    /// Median send → answer time, ms.
    pub p50_ms: f64,
}

/// A transport floor ready to run: its topics, the echo playing the server, and the
/// client's reply subscription, set up once (a Kafka group join alone can take seconds)
/// and warmed up, so that runs time only the hops.
pub(super) struct Floor {
    broker: Arc<dyn Broker>,
    messages: FloorMessages,
    request_topic: String,
    reply_topic: String,
    replies: Box<dyn Subscriber>,
    echo: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Floor {
    /// Creates fresh topics, starts the echo (subscribed with `echo_options`, the
    /// server's flow control) and sends a warm-up round.
    pub(super) async fn start(
        broker: &Arc<dyn Broker>,
        messages: FloorMessages,
        echo_options: SubscribeOptions,
    ) -> anyhow::Result<Floor> {
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let request_topic = format!("bench-floor-requests-{run_id}");
        let reply_topic = format!("bench-floor-replies-{run_id}");
        broker.ensure_topic(&request_topic).await?;
        broker.ensure_subscription(&request_topic, "echo").await?;
        broker.ensure_private_topic(&reply_topic).await?;
        broker.ensure_subscription(&reply_topic, "client").await?;
        let echo_subscriber = broker
            .subscribe(&request_topic, "echo", echo_options)
            .await?;
        let replies = broker
            .subscribe(
                &reply_topic,
                "client",
                SubscribeOptions {
                    sole_member: true,
                    ..SubscribeOptions::default()
                },
            )
            .await?;
        let stop = CancellationToken::new();
        let echo = tokio::spawn(echo(
            Arc::clone(broker),
            echo_subscriber,
            messages.reply.clone(),
            stop.clone(),
        ));
        let mut floor = Floor {
            broker: Arc::clone(broker),
            messages,
            request_topic,
            reply_topic,
            replies,
            echo,
            stop,
        };
        floor.run(64, 64).await?;
        Ok(floor)
    }

    /// One run: `images` requests with at most `window` unanswered.
    pub(super) async fn run(&mut self, images: usize, window: usize) -> anyhow::Result<FloorRun> {
        match tokio::time::timeout(FLOOR_TIMEOUT, self.send_and_await(images, window)).await {
            Ok(run) => run,
            Err(_) => anyhow::bail!("the transport floor run got no answer for {FLOOR_TIMEOUT:?}"),
        }
    }

    /// Closes both subscriptions, then deletes the topics: librdkafka was seen to crash
    /// (in its metadata cache) when a topic was deleted under a live group member.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        if self.echo.await.is_err() {
            tracing::debug!("the floor's echo task failed");
        }
        if let Err(error) = self.replies.close().await {
            tracing::debug!(%error, "closing the floor's reply subscription failed");
        }
        for topic in [&self.request_topic, &self.reply_topic] {
            if let Err(error) = self.broker.delete_topic(topic).await {
                tracing::debug!(topic, %error, "deleting a floor topic failed");
            }
        }
    }

    /// The client's half: publishes the requests within the window and takes the
    /// answers (answers to earlier runs' duplicates are acked and ignored). As in the
    /// real client, publishing never waits for the broker's confirmation before more
    /// answers are read: each batch is published by a task of its own.
    async fn send_and_await(&mut self, images: usize, window: usize) -> anyhow::Result<FloorRun> {
        let window = window.max(1);
        let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(window);
        let mut latencies_ms = Vec::with_capacity(images);
        let mut publishing = JoinSet::new();
        let mut next = 0usize;
        let start = Instant::now();
        while latencies_ms.len() < images {
            let room = window.saturating_sub(sent_at.len()).min(images - next);
            if room > 0 {
                let batch: Vec<Message> = (next..next + room)
                    .map(|i| floor_message(&self.messages, i, &self.reply_topic))
                    .collect();
                let now = Instant::now();
                for message in &batch {
                    sent_at.insert(request_id(message).to_string(), now);
                }
                let (broker, topic) = (Arc::clone(&self.broker), self.request_topic.clone());
                publishing.spawn(async move { broker.publish_batch(&topic, batch).await });
                next += room;
            }
            let mut delivery = self
                .replies
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("the floor's reply subscription ended"))??;
            loop {
                if let Some(sent) = sent_at.remove(request_id(delivery.message())) {
                    latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                }
                delivery.ack()?;
                match ready_now(&mut self.replies).await {
                    Some(ready) => delivery = ready,
                    None => break,
                }
            }
            while let Some(published) = publishing.try_join_next() {
                published??;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok(FloorRun {
            images_per_second: latencies_ms.len() as f64 / elapsed,
            p50_ms: super::median(&latencies_ms),
        })
    }
}

/// Request `i` of a run: the `i`-th input's encoded request under a fresh request id,
/// framed as the client frames its requests (key and routing attributes). The payload
/// is not re-encoded per message.
fn floor_message(messages: &FloorMessages, i: usize, reply_topic: &str) -> Message {
    let payload = messages.requests[i % messages.requests.len()].clone();
    let request_id = format!("{:032x}", rand::random::<u128>());
    with_request_routing(payload, &request_id, reply_topic, reply_topic)
}

/// A delivery that is ready now, without waiting (a zero timeout polls `next` once);
/// `None` if nothing is, or on an error or the subscription's end, which the next
/// waiting `next` reports.
async fn ready_now(subscriber: &mut Box<dyn Subscriber>) -> Option<Delivery> {
    match tokio::time::timeout(Duration::ZERO, subscriber.next()).await {
        Ok(Some(Ok(delivery))) => Some(delivery),
        _ => None,
    }
}

/// The server's half: answers every request on the reply topic its attribute names,
/// and acks it once the answer was published. Batches of what is ready are published
/// concurrently, as the server's reply stage does.
async fn echo(
    broker: Arc<dyn Broker>,
    mut requests: Box<dyn Subscriber>,
    reply: Message,
    stop: CancellationToken,
) {
    let mut publishing = JoinSet::new();
    'serving: loop {
        let first = tokio::select! {
            next = requests.next() => next,
            _ = stop.cancelled() => break,
        };
        let Some(Ok(first)) = first else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < ECHO_BATCH {
            let Some(delivery) = ready_now(&mut requests).await else {
                break;
            };
            batch.push(delivery);
        }
        publishing.spawn(answer(Arc::clone(&broker), batch, reply.clone()));
        while let Some(answered) = publishing.try_join_next() {
            if let Ok(Err(error)) = answered {
                tracing::warn!(%error, "the floor's echo could not publish; stopping it");
                break 'serving;
            }
        }
    }
    publishing.shutdown().await;
    if let Err(error) = requests.close().await {
        tracing::debug!(%error, "closing the floor's echo subscription failed");
    }
}

/// The request id a request or reply carries (its routing attribute: requests have no
/// key).
fn request_id(message: &Message) -> &str {
    message
        .attribute(attributes::REQUEST_ID)
        .unwrap_or_default()
}

/// Publishes one answer per delivery (the reply template keyed by the request's id, as a
/// server's reply is), then acks them.
async fn answer(
    broker: Arc<dyn Broker>,
    batch: Vec<Delivery>,
    reply: Message,
) -> unified_broker::Result<()> {
    let Some(topic) = batch
        .first()
        .and_then(|d| d.message().attribute(attributes::REPLY_TOPIC))
        .map(str::to_string)
    else {
        return Ok(());
    };
    let answers = batch
        .iter()
        .map(|delivery| {
            let id = request_id(delivery.message()).to_string();
            reply
                .clone()
                .with_key(id.clone())
                .with_attribute(attributes::REQUEST_ID, id)
        })
        .collect();
    broker.publish_batch(&topic, answers).await?;
    for delivery in batch {
        let _ = delivery.ack();
    }
    Ok(())
}
