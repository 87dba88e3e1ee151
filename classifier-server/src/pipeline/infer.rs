//! The model thread: runs the CNN on one batch at a time, on its own thread (so decoding
//! the next batch and publishing the last overlap with it), and builds the replies.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use classifier_inference::Classifier;
use classifier_proto::{ClassifyError, ErrorCode};
use tokio::sync::mpsc;

use super::batch::Batch;
use super::reply::Outgoing;
use super::stats::ServerStats;
use crate::request::{error_response, response_message, success_response, Rejected, ReplyContext};

/// What the model thread needs besides its channels.
pub(super) struct Model {
    /// The CNN.
    pub classifier: Arc<Classifier>,
    /// Predictions per reply when the request does not say.
    pub default_top_k: usize,
    /// Identity stamped on the replies.
    pub context: ReplyContext,
    /// Where batches, classifications and failures are counted.
    pub stats: Arc<ServerStats>,
}

/// Starts the model thread; it ends when `batches` closes or `outgoing` is gone.
pub(super) fn spawn_model_thread(
    model: Model,
    mut batches: mpsc::Receiver<Batch>,
    outgoing: mpsc::Sender<Vec<Outgoing>>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || {
            while let Some(batch) = batches.blocking_recv() {
                let replies = model.run_batch(batch);
                if outgoing.blocking_send(replies).is_err() {
                    return;
                }
            }
        })
        .context("starting the model thread")
}

impl Model {
    /// One reply per request of `batch`, in order: predictions, or an internal error
    /// for every request if the model failed (never dead-lettered: the fault is the
    /// server's, not the request's).
    fn run_batch(&self, batch: Batch) -> Vec<Outgoing> {
        let Model {
            classifier,
            default_top_k,
            context,
            stats,
        } = self;
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
                            *default_top_k,
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
                    dead_letter: None,
                    work,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use classifier_proto::{ClassifyResponse, Outcome, ProstMessage};
    use unified_broker::Message;

    use super::*;
    use crate::pipeline::test_support::{shipped_classifier, work};
    use crate::request::{PreparedInput, ReplyRoute};

    fn model() -> Model {
        Model {
            classifier: shipped_classifier(),
            default_top_k: 2,
            context: ReplyContext {
                server_id: "server-t".into(),
                ..ReplyContext::default()
            },
            stats: Arc::default(),
        }
    }

    fn item(id: &str, input: Vec<f32>) -> (crate::pipeline::intake::Work, PreparedInput) {
        let route = ReplyRoute {
            request_id: id.into(),
            reply_topic: format!("replies-{id}"),
            ..ReplyRoute::default()
        };
        (
            work(Message::new(id.to_string())).0,
            PreparedInput { route, input },
        )
    }

    fn decode(outgoing: &Outgoing) -> ClassifyResponse {
        ClassifyResponse::decode(outgoing.message.payload.as_ref()).expect("a response")
    }

    #[test]
    fn a_batch_gets_one_prediction_reply_per_request_in_order() {
        let model = model();
        let len = model.classifier.input_len();
        let replies = model.run_batch(vec![item("a", vec![0.0; len]), item("b", vec![1.0; len])]);
        assert_eq!(replies.len(), 2);
        for (reply, id) in replies.iter().zip(["a", "b"]) {
            assert_eq!(reply.reply_topic, format!("replies-{id}"));
            assert!(reply.dead_letter.is_none());
            let response = decode(reply);
            assert_eq!(response.request_id, id);
            assert_eq!(response.server_id, "server-t");
            assert_eq!(response.batch_size, 2);
            match response.outcome {
                Some(Outcome::Predictions(predictions)) => {
                    assert_eq!(predictions.top_k.len(), 2)
                }
                other => panic!("expected predictions, got {other:?}"),
            }
        }
        let stats = model.stats.snapshot();
        assert_eq!((stats.batches, stats.classified, stats.rejected), (1, 2, 0));
    }

    #[test]
    fn a_model_failure_is_an_internal_error_reply_not_a_dead_letter() {
        let model = model();
        // A wrong input length makes `predict` fail for the whole batch.
        let replies = model.run_batch(vec![item("a", vec![0.0; 3])]);
        assert_eq!(replies.len(), 1);
        assert!(replies[0].dead_letter.is_none());
        match decode(&replies[0]).outcome {
            Some(Outcome::Error(error)) => assert_eq!(error.code, ErrorCode::Internal as i32),
            other => panic!("expected an error, got {other:?}"),
        }
        assert_eq!(model.stats.snapshot().rejected, 1);
    }
}
