//! The batcher: groups decoded inputs into batches of up to `max_batch_size`, waiting at
//! most `max_batch_wait` after the first one for more, but only while other requests are
//! in flight (decoding, in the model or being answered): a lone request at low load
//! goes to the model at once instead of waiting for company that is not coming, while a
//! busy server keeps batching as before. Rejected requests skip the model and go
//! straight to the publisher as error replies.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::decode_pool::Prepared;
use super::intake::Work;
use super::reply::{ErrorReplies, Outgoing};
use crate::models::ServedModel;
use crate::request::PreparedInput;

/// One batch for the model thread: each request with its input and the model it was
/// prepared for (all the same model, except across a reload or on a multi-model server).
pub(super) type Batch = Vec<(Work, PreparedInput, Arc<ServedModel>)>;

/// How big batches get and how long a partial batch waits.
#[derive(Clone, Copy, Debug)]
pub(super) struct BatchLimits {
    /// Most inputs in one batch (at least 1).
    pub max_batch: usize,
    /// Longest wait after the first input of a batch.
    pub max_wait: Duration,
}

/// Runs until `prepared` closes (sending what it holds) or a later stage is gone.
///
/// The decode pool sends its results a chunk at a time (one wake-up of this task per
/// chunk, not per request); what a chunk holds beyond a full batch waits for the next.
pub(super) async fn run(
    mut prepared: mpsc::Receiver<Vec<Prepared>>,
    batches: mpsc::Sender<Batch>,
    outgoing: mpsc::Sender<Vec<Outgoing>>,
    limits: BatchLimits,
    error_replies: ErrorReplies,
) {
    let BatchLimits {
        max_batch,
        max_wait,
    } = limits;
    let mut waiting = VecDeque::new();
    let mut open = true;
    // Whether requests other than the `held` ones are in flight (taken from the broker
    // and not yet acked): only then may more come soon. Waiting only for what is still
    // decoding was tried and made batches smaller under load on Kafka, whose fetches
    // come in bursts (docs/benchmarks.md).
    let in_flight = error_replies.stats.in_flight_gauge();
    let others_in_flight = |held: usize| in_flight.get() > i64::try_from(held).unwrap_or(i64::MAX);
    while open || !waiting.is_empty() {
        let mut batch = Vec::with_capacity(max_batch);
        let mut deadline = None;
        loop {
            let room = max_batch - batch.len();
            batch.extend(waiting.drain(..room.min(waiting.len())));
            let alone = !batch.is_empty() && !others_in_flight(batch.len() + waiting.len());
            if batch.len() >= max_batch || !open || alone {
                break;
            }
            if !batch.is_empty() && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + max_wait);
            }
            let chunk = match deadline {
                None => prepared.recv().await,
                Some(deadline) => tokio::select! {
                    chunk = prepared.recv() => chunk,
                    _ = tokio::time::sleep_until(deadline) => break,
                },
            };
            let Some(chunk) = chunk else {
                open = false;
                continue;
            };
            let mut rejections = Vec::new();
            for item in chunk {
                match item {
                    Prepared::Ready(work, input, model) => waiting.push_back((work, input, model)),
                    Prepared::Rejected(work, rejected) => {
                        rejections.push(error_replies.reply(work, rejected))
                    }
                }
            }
            if !rejections.is_empty() && outgoing.send(rejections).await.is_err() {
                return;
            }
        }
        if !batch.is_empty() && batches.send(batch).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use classifier_proto::{ClassifyError, ErrorCode};
    use unified_broker::Message;

    use super::*;
    use crate::models::ModelSet;
    use crate::pipeline::dead_letter::DeadLetters;
    use crate::pipeline::stats::ServerStats;
    use crate::pipeline::test_support::{shipped_classifier, work};
    use crate::request::{Rejected, ReplyRoute};

    struct Stage {
        prepared: mpsc::Sender<Vec<Prepared>>,
        batches: mpsc::Receiver<Batch>,
        outgoing: mpsc::Receiver<Vec<Outgoing>>,
        stats: Arc<ServerStats>,
    }

    /// The stage, with many more requests in flight than the tests send: others are
    /// always in flight, so partial batches wait.
    fn start(max_batch: usize, max_wait: Duration) -> Stage {
        start_with_in_flight(max_batch, max_wait, 1_000_000)
    }

    /// The stage, with `in_flight` requests taken from the broker and not yet acked.
    fn start_with_in_flight(max_batch: usize, max_wait: Duration, in_flight: i64) -> Stage {
        let (prepared, prepared_rx) = mpsc::channel(64);
        let (batches_tx, batches) = mpsc::channel(64);
        let (outgoing_tx, outgoing) = mpsc::channel(64);
        let stats = Arc::new(ServerStats::default());
        stats.in_flight_gauge().set(in_flight);
        tokio::spawn(run(
            prepared_rx,
            batches_tx,
            outgoing_tx,
            BatchLimits {
                max_batch,
                max_wait,
            },
            ErrorReplies {
                context: Default::default(),
                dead_letters: DeadLetters::default(),
                stats: Arc::clone(&stats),
            },
        ));
        Stage {
            prepared,
            batches,
            outgoing,
            stats,
        }
    }

    fn ready(id: &str) -> Prepared {
        let route = ReplyRoute {
            request_id: id.into(),
            ..ReplyRoute::default()
        };
        Prepared::Ready(
            work(Message::new(id.to_string())).0,
            PreparedInput {
                route,
                input: Vec::new(),
            },
            ModelSet::single(shipped_classifier()).default_model(),
        )
    }

    /// The stage's next batch, which must come within 5 s (`why` says why it should).
    async fn batch_within_5s(stage: &mut Stage, why: &str) -> Batch {
        tokio::time::timeout(Duration::from_secs(5), stage.batches.recv())
            .await
            .expect(why)
            .expect("a batch")
    }

    fn ids(batch: &Batch) -> Vec<&str> {
        batch
            .iter()
            .map(|(_, input, _)| input.route.request_id.as_str())
            .collect()
    }

    #[tokio::test]
    async fn a_full_batch_goes_at_once() {
        let mut stage = start(3, Duration::from_secs(3600));
        for id in ["a", "b", "c", "d"] {
            stage.prepared.send(vec![ready(id)]).await.expect("open");
        }
        let first = batch_within_5s(&mut stage, "no waiting for a full batch").await;
        assert_eq!(ids(&first), ["a", "b", "c"]);
        // "d" waits for more (the wait is an hour); closing the input sends it.
        drop(stage.prepared);
        let rest = stage.batches.recv().await.expect("the partial batch");
        assert_eq!(ids(&rest), ["d"]);
        assert!(stage.batches.recv().await.is_none(), "the stage ended");
    }

    #[tokio::test]
    async fn a_partial_batch_goes_after_the_wait() {
        let mut stage = start(64, Duration::from_millis(30));
        let started = std::time::Instant::now();
        stage.prepared.send(vec![ready("a")]).await.expect("open");
        stage.prepared.send(vec![ready("b")]).await.expect("open");
        let batch = batch_within_5s(
            &mut stage,
            "sent after the wait, while the input stays open",
        )
        .await;
        assert_eq!(ids(&batch), ["a", "b"]);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_lone_request_does_not_wait_for_company_that_is_not_coming() {
        // One request in flight: this one.
        let mut stage = start_with_in_flight(64, Duration::from_secs(3600), 1);
        stage.prepared.send(vec![ready("a")]).await.expect("open");
        let first = batch_within_5s(&mut stage, "no waiting: nothing else was in flight").await;
        assert_eq!(ids(&first), ["a"]);
        // Later a second one, alone too (the first was answered meanwhile).
        stage.prepared.send(vec![ready("b")]).await.expect("open");
        let second = batch_within_5s(&mut stage, "no waiting for the second either").await;
        assert_eq!(ids(&second), ["b"]);
    }

    #[tokio::test]
    async fn a_partial_batch_waits_while_others_are_in_flight() {
        // Three in flight; the first two come out of decoding together, the third
        // later: the batch waits for it.
        let mut stage = start_with_in_flight(64, Duration::from_secs(3600), 3);
        stage
            .prepared
            .send(vec![ready("a"), ready("b")])
            .await
            .expect("open");
        let early = tokio::time::timeout(Duration::from_millis(100), stage.batches.recv()).await;
        assert!(
            early.is_err(),
            "the batch must wait while another request is in flight"
        );
        stage.prepared.send(vec![ready("c")]).await.expect("open");
        let batch = batch_within_5s(&mut stage, "sent once it holds everything in flight").await;
        assert_eq!(ids(&batch), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn rejections_skip_the_batch() {
        let mut stage = start(64, Duration::from_secs(3600));
        stage.prepared.send(vec![ready("a")]).await.expect("open");
        let rejected = Rejected {
            route: ReplyRoute {
                request_id: "bad".into(),
                reply_topic: "replies".into(),
                ..ReplyRoute::default()
            },
            error: ClassifyError {
                code: ErrorCode::CorruptImage as i32,
                reason: "truncated".into(),
            },
        };
        stage
            .prepared
            .send(vec![Prepared::Rejected(
                work(Message::new("bad")).0,
                rejected,
            )])
            .await
            .expect("open");
        let replies = tokio::time::timeout(Duration::from_secs(5), stage.outgoing.recv())
            .await
            .expect("the error reply does not wait for the batch")
            .expect("a reply");
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].reply_topic, "replies");
        assert!(replies[0].dead_letter.is_none(), "dead letters are off");
        assert_eq!(stage.stats.snapshot().rejected, 1);
        assert!(stage.batches.try_recv().is_err(), "\"a\" still waits");
    }
}
