//! The decode pool: untrusted bytes become a model input or a rejection
//! ([`crate::request::prepare`]: size check, protobuf, sniffing, bounded decode,
//! preprocessing) on a small dedicated thread pool, never on the async executor.
//!
//! Not to be confused with [`crate::decode`], the safe image decoding it calls.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;

use super::intake::{Work, TRACE_TARGET};
use crate::decode::DecodeLimits;
use crate::models::{ModelSet, ServedModel};
use crate::request::{prepare_for, PreparedInput, Rejected, RoutePolicy};
use classifier_app::ServerConfig;

/// Output of the decode stage: an input for the model, or why there is none.
pub(super) enum Prepared {
    /// Decoded and preprocessed for the model that is to run it.
    Ready(Work, PreparedInput, Arc<ServedModel>),
    /// Can never be classified (answered with an error reply).
    Rejected(Work, Rejected),
}

/// Decoding and preprocessing on dedicated worker threads.
pub(super) struct DecodePool {
    pool: Arc<rayon::ThreadPool>,
    models: Arc<ModelSet>,
    limits: Arc<DecodeLimits>,
    routes: Arc<RoutePolicy>,
}

impl DecodePool {
    /// One decode thread per core, preprocessing for the model each request names, as
    /// `models` serves it when the request is decoded; requests whose reply route
    /// `routes` refuses are rejected before their image is decoded.
    pub fn new(
        models: &Arc<ModelSet>,
        config: &ServerConfig,
        routes: RoutePolicy,
    ) -> anyhow::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .context("starting the decode threads")?;
        Ok(DecodePool {
            pool: Arc::new(pool),
            models: Arc::clone(models),
            limits: Arc::new(config.limits.clone()),
            routes: Arc::new(routes),
        })
    }

    /// Decodes `chunk` on one decode thread, in order, and sends the results on `out`
    /// together: one hand-over (and one wake-up of the batcher) per chunk.
    pub fn submit(&self, chunk: Vec<Work>, out: mpsc::Sender<Vec<Prepared>>) {
        let models = Arc::clone(&self.models);
        let limits = Arc::clone(&self.limits);
        let routes = Arc::clone(&self.routes);
        self.pool.spawn(move || {
            let prepared = chunk
                .into_iter()
                .map(|mut work| {
                    work.start_span();
                    let _decode =
                        tracing::trace_span!(target: TRACE_TARGET, parent: &work.span, "decode")
                            .entered();
                    let message = work.delivery.message();
                    match prepare_for(message, &limits, &routes, |name| models.resolve(name)) {
                        Ok((input, model)) => Prepared::Ready(work, input, model),
                        Err(rejected) => Prepared::Rejected(work, *rejected),
                    }
                })
                .collect();
            // Fails only while shutting down; the chunk is then dropped (nacked).
            let _ = out.blocking_send(prepared);
        });
    }

    /// Lets the threads go once their current jobs are done.
    pub fn shutdown(self) {
        drop(self.pool);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use classifier_proto::{attributes, ClassifyRequest, ErrorCode, ProstMessage};
    use unified_broker::Message;

    use super::*;
    use crate::pipeline::test_support::{shipped_classifier, work};

    fn request(id: &str, image: Vec<u8>) -> Message {
        let request = ClassifyRequest {
            request_id: id.into(),
            reply_topic: "replies".into(),
            image,
            ..ClassifyRequest::default()
        };
        Message::new(request.encode_to_vec())
    }

    #[tokio::test]
    async fn a_chunk_is_decoded_in_order_into_inputs_and_rejections() {
        let classifier = shipped_classifier();
        let models = Arc::new(ModelSet::single(Arc::clone(&classifier)));
        let pool = DecodePool::new(&models, &ServerConfig::default(), RoutePolicy::any())
            .expect("threads");
        let png = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/bag/00018.png"
        ))
        .expect("an example image");
        let garbage =
            Message::new(vec![0xff, 0xff, 0xff]).with_attribute(attributes::REQUEST_ID, "junk");
        let chunk = vec![
            work(request("good", png)).0,
            work(garbage).0,
            work(request("not-an-image", b"hello".to_vec())).0,
        ];
        let (out, mut results) = mpsc::channel(8);
        pool.submit(chunk, out);
        let mut seen = Vec::new();
        let chunk = tokio::time::timeout(Duration::from_secs(10), results.recv())
            .await
            .expect("decoded in time")
            .expect("one chunk of results");
        for prepared in chunk {
            seen.push(match prepared {
                Prepared::Ready(_, input, _) => {
                    assert_eq!(input.input.len(), classifier.input_len());
                    (input.route.request_id, None)
                }
                Prepared::Rejected(_, rejected) => {
                    (rejected.route.request_id, Some(rejected.error.code))
                }
            });
        }
        assert_eq!(
            seen,
            [
                ("good".to_string(), None),
                // No reply topic at all: nobody can be answered.
                ("junk".to_string(), Some(ErrorCode::Unroutable as i32)),
                (
                    "not-an-image".to_string(),
                    Some(ErrorCode::UnsupportedFormat as i32)
                ),
            ]
        );
        pool.shutdown();
    }
}
