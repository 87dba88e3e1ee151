//! The model thread: runs the CNN on one batch at a time, on its own thread (so decoding
//! the next batch and publishing the last overlap with it), and builds the replies.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use classifier_proto::{ClassifyError, ErrorCode, Outcome};
use tokio::sync::mpsc;

use classifier_app::trace::TraceContext;

use super::batch::Batch;
use super::intake::TRACE_TARGET;
use super::reply::Outgoing;
use super::stats::ServerStats;
use crate::models::ServedModel;
use crate::request::{error_response, response_message, success_response, Rejected, ReplyContext};

/// What the model thread needs besides its channels and the models (which come with
/// each request, see [`Batch`]).
pub(super) struct Model {
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
            // Batches then fork and join on this thread rather than being handed to a
            // pool thread and back (see `adopt_calling_thread`).
            classifier_inference::threads::adopt_calling_thread();
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
    /// One reply per request of `batch`, grouped by model: the requests prepared for each
    /// model go through that model at once (a batch holds more than one model only
    /// across a model reload or on a server of several models).
    fn run_batch(&self, mut batch: Batch) -> Vec<Outgoing> {
        // Requests for the same model together (stable: their order is kept), so that
        // interleaved traffic for several models still runs in batches, not one by one.
        batch.sort_by_key(|(_, _, model)| Arc::as_ptr(model) as usize);
        let mut replies = Vec::with_capacity(batch.len());
        while !batch.is_empty() {
            let model = Arc::clone(&batch[0].2);
            let same = batch
                .iter()
                .take_while(|(_, _, m)| Arc::ptr_eq(m, &model))
                .count();
            let rest = batch.split_off(same);
            replies.extend(self.run_one_model(&model, batch));
            batch = rest;
        }
        replies
    }

    /// Replies to requests all prepared for `model`: predictions, or an internal error
    /// for every request if the model failed (never dead-lettered: the fault is the
    /// server's, not the request's).
    fn run_one_model(&self, model: &ServedModel, batch: Batch) -> Vec<Outgoing> {
        let Model {
            default_top_k,
            context,
            stats,
        } = self;
        let classifier = &model.classifier;
        let started = Instant::now();
        let n = batch.len();
        let mut inputs = Vec::with_capacity(n * classifier.input_len());
        for (_, prepared, _) in &batch {
            inputs.extend_from_slice(&prepared.input);
        }
        let span = tracing::trace_span!(target: TRACE_TARGET, "inference", batch_size = n);
        let contexts: Vec<TraceContext> = batch
            .iter()
            .filter_map(|(work, _, _)| TraceContext::of_span(&work.span))
            .collect();
        classifier_app::trace::link(&span, &contexts);
        let result = span.in_scope(|| classifier.predict(&inputs, n));
        let inference_time = started.elapsed();
        let inference_micros = inference_time.as_micros() as u64;
        stats.batch(n, inference_time.as_secs_f64());
        let metadata = classifier.metadata();
        batch
            .into_iter()
            .enumerate()
            .map(|(i, (work, prepared, _))| {
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
                            (&model.name, metadata),
                            *default_top_k,
                            &context,
                        )
                    }
                    Ok(None) | Err(_) => {
                        stats.reject(ErrorCode::Internal.as_str_name());
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
                let mut message = response_message(&response);
                work.stamp_trace(&mut message);
                Outgoing {
                    reply_topic: prepared.route.reply_topic.clone(),
                    message,
                    is_error: matches!(response.outcome, Some(Outcome::Error(_))),
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
    use crate::models::ModelSet;
    use crate::pipeline::test_support::{shipped_classifier, work};
    use crate::request::{PreparedInput, ReplyRoute};

    fn model() -> Model {
        Model {
            default_top_k: 2,
            context: ReplyContext {
                server_id: "server-t".into(),
                ..ReplyContext::default()
            },
            stats: Arc::default(),
        }
    }

    fn served() -> Arc<ServedModel> {
        ModelSet::single(shipped_classifier()).default_model()
    }

    fn item(
        id: &str,
        input: Vec<f32>,
        model: &Arc<ServedModel>,
    ) -> (
        crate::pipeline::intake::Work,
        PreparedInput,
        Arc<ServedModel>,
    ) {
        let route = ReplyRoute {
            request_id: id.into(),
            reply_topic: format!("replies-{id}"),
            ..ReplyRoute::default()
        };
        (
            work(Message::new(id.to_string())).0,
            PreparedInput { route, input },
            Arc::clone(model),
        )
    }

    fn decode(outgoing: &Outgoing) -> ClassifyResponse {
        ClassifyResponse::decode(outgoing.message.payload.as_ref()).expect("a response")
    }

    #[test]
    fn a_batch_gets_one_prediction_reply_per_request_in_order() {
        let model = model();
        let served = served();
        let len = served.classifier.input_len();
        let replies = model.run_batch(vec![
            item("a", vec![0.0; len], &served),
            item("b", vec![1.0; len], &served),
        ]);
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
        let replies = model.run_batch(vec![item("a", vec![0.0; 3], &served())]);
        assert_eq!(replies.len(), 1);
        assert!(replies[0].dead_letter.is_none());
        match decode(&replies[0]).outcome {
            Some(Outcome::Error(error)) => assert_eq!(error.code, ErrorCode::Internal as i32),
            other => panic!("expected an error, got {other:?}"),
        }
        assert_eq!(model.stats.snapshot().rejected, 1);
    }

    #[test]
    fn each_request_is_run_by_the_model_it_was_prepared_for() {
        let model = model();
        let classifier = shipped_classifier();
        let models = ModelSet::new(vec![
            ("first".into(), None, Arc::clone(&classifier)),
            ("second".into(), None, classifier),
        ])
        .expect("two models");
        let (first, second) = (models.resolve("first"), models.resolve("second"));
        let (first, second) = (first.expect("known"), second.expect("known"));
        let len = first.classifier.input_len();
        let replies = model.run_batch(vec![
            item("a", vec![0.0; len], &first),
            item("b", vec![0.0; len], &second),
            item("c", vec![0.0; len], &second),
            item("d", vec![0.0; len], &first),
        ]);
        let mut answered: Vec<(String, String)> = replies
            .iter()
            .map(|reply| {
                let response = decode(reply);
                match response.outcome {
                    Some(Outcome::Predictions(p)) => (response.request_id, p.model_name),
                    other => panic!("expected predictions, got {other:?}"),
                }
            })
            .collect();
        answered.sort();
        let expected = [
            ("a", "first"),
            ("b", "second"),
            ("c", "second"),
            ("d", "first"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(id, name)| (id.to_string(), name.to_string()))
            .collect();
        assert_eq!(answered, expected);
        assert_eq!(model.stats.snapshot().batches, 2, "one run per model");
    }
}
