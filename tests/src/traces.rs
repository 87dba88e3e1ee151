//! W3C trace context across the broker (issue 30, item 1), on one backend: a server and
//! a job in this test process, its spans recorded by OpenTelemetry's in-memory exporter.
//!
//! Checked: every request of a job carries the job span as `traceparent`; the server's
//! `classify request` span of each joins it (same trace, the job span as parent), with
//! `decode` and `reply` below it; the `inference` span of a batch links to the requests
//! it ran; and a reply carries the context back, naming the server's span as parent.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use classifier_app::trace::{TraceContext, TRACEPARENT};
use classifier_proto::{ClassifyRequest, ClassifyResponse, Outcome, ProstMessage};
use classifier_server::{ModelServer, ServerConfig};
use client_app::job::{run_job, JobOptions, NoProgress};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use unified_broker::{Broker, Message, SubscribeOptions};

use crate::{copy_examples, workspace_root};

/// A request's context as a foreign client would write it (the W3C spec's example).
const FOREIGN_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The exporter every span of this test process goes to: installed once, as the global
/// `tracing` subscriber, recording only our trace targets.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = classifier_app::trace::layer(&provider);
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("the only global subscriber of this test binary");
        exporter
    })
}

/// Runs the case on the backend of `backend_env` (`CLASSIFIER_BROKER` and its address).
pub fn trace_context_crosses_the_broker(backend_env: &[(String, String)]) {
    let exporter = exporter();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let env = crate::cross_process::case_env(backend_env, "traces");
        let config = crate::cross_process::config_for(&env);
        let broker = unified_broker::connect(&config.broker)
            .await
            .expect("connect");
        let topic = config.server.request_topic.clone();
        let options = JobOptions {
            reply_timeout: Duration::from_secs(60),
            ..JobOptions::from_config(&config)
        };
        let config = ServerConfig {
            model_dir: Some(workspace_root().join("models/fashion-mnist")),
            ..config.server
        };
        let models = classifier_server::load_models(&config).expect("the shipped model");
        let server = ModelServer::with_models(Arc::clone(&broker), config, models);
        server.prepare_topics().await.expect("topics");
        let stop = CancellationToken::new();
        let running = tokio::spawn(server.run(stop.clone()));

        let job_trace = job_spans_join_the_servers(&broker, &options, exporter).await;
        let foreign = a_foreign_context_comes_back(&broker, &topic, exporter).await;
        eprintln!("traces: job trace {job_trace}, foreign trace {foreign}");
        stop.cancel();
        running.await.expect("task").expect("server ran");
        let _ = broker.delete_topic(&topic).await;
    });
}

/// Five examples classified by a job: its spans and the server's form one trace.
async fn job_spans_join_the_servers(
    broker: &Arc<dyn Broker>,
    options: &JobOptions,
    exporter: &InMemorySpanExporter,
) -> String {
    let folder = tempfile::tempdir().expect("tempdir");
    let files = copy_examples(folder.path(), 1).min(5);
    let inputs = client_app::inputs::collect_inputs(&[folder.path().to_path_buf()])
        .expect("inputs")
        .into_iter()
        .take(files)
        .collect::<Vec<_>>();
    let report = run_job(Arc::clone(broker), inputs, options, &NoProgress)
        .await
        .expect("the job runs");
    assert!(
        report
            .results
            .iter()
            .all(|r| matches!(r.outcome, client_app::job::FileOutcome::Classified { .. })),
        "every request classified: {:?}",
        report.results
    );

    let job = wait_for_spans(exporter, |spans| {
        let job = spans.iter().find(|s| s.name == "classify job")?;
        let requests = children(spans, job, "classify request");
        (requests.len() == files
            && requests.iter().all(|r| {
                !children(spans, r, "decode").is_empty() && !children(spans, r, "reply").is_empty()
            }))
        .then(|| job.clone())
    })
    .await;
    let spans = exporter.get_finished_spans().expect("spans");
    let requests = children(&spans, &job, "classify request");
    // Every request ran in some batch whose `inference` span links to it.
    for request in &requests {
        let linked = spans.iter().any(|s| {
            s.name == "inference"
                && s.links
                    .links
                    .iter()
                    .any(|l| l.span_context.span_id() == request.span_context.span_id())
        });
        assert!(
            linked,
            "no inference span links to request span {request:?}"
        );
    }
    job.span_context.trace_id().to_string()
}

/// A request carrying a foreign `traceparent`: the server's span joins that trace and
/// the reply carries the trace back, naming the server's span as its parent.
async fn a_foreign_context_comes_back(
    broker: &Arc<dyn Broker>,
    topic: &str,
    exporter: &InMemorySpanExporter,
) -> String {
    let reply_topic = format!("classify-replies-{topic}");
    broker
        .ensure_topic_and_subscription(&reply_topic, "trace-reader")
        .await
        .expect("reply topic");
    let mut replies = broker
        .subscribe(&reply_topic, "trace-reader", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let image = std::fs::read(workspace_root().join("examples/bag/00018.png")).expect("png");
    let request = ClassifyRequest {
        request_id: "traced".into(),
        reply_topic: reply_topic.clone(),
        image,
        ..ClassifyRequest::default()
    };
    let message = Message::new(request.encode_to_vec())
        .with_key("traced")
        .with_attribute(TRACEPARENT, FOREIGN_PARENT)
        .with_attribute("tracestate", "congo=t61rcWkgMzE");
    broker.publish(topic, message).await.expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(60), replies.next())
        .await
        .expect("a reply within 60 s")
        .expect("open")
        .expect("a delivery");
    let reply = ClassifyResponse::decode(delivery.message().payload.as_ref()).expect("reply");
    assert!(matches!(reply.outcome, Some(Outcome::Predictions(_))));
    let attributes = &delivery.message().attributes;
    let back = TraceContext::from_attributes(|name| attributes.get(name).map(String::as_str))
        .unwrap_or_else(|| panic!("the reply carries no trace context: {attributes:?}"));
    delivery.ack().expect("ack");
    let _ = replies.close().await;
    let _ = broker.delete_topic(&reply_topic).await;

    let foreign =
        TraceContext::from_attributes(|name| (name == TRACEPARENT).then_some(FOREIGN_PARENT))
            .expect("the spec's example is valid");
    assert_eq!(back.trace_id(), foreign.trace_id(), "same trace");
    assert_eq!(
        back.tracestate(),
        "congo=t61rcWkgMzE",
        "tracestate passed on"
    );
    let server_span = wait_for_spans(exporter, |spans| {
        spans
            .iter()
            .find(|s| {
                s.name == "classify request"
                    && s.span_context.trace_id().to_string() == foreign.trace_id()
            })
            .cloned()
    })
    .await;
    assert_eq!(server_span.parent_span_id.to_string(), foreign.parent_id());
    assert!(server_span.parent_span_is_remote);
    assert_eq!(
        back.parent_id(),
        server_span.span_context.span_id().to_string(),
        "the reply names the server's span as parent"
    );
    back.trace_id()
}

/// The spans named `name` whose parent is `parent`, in `parent`'s trace.
fn children<'a>(spans: &'a [SpanData], parent: &SpanData, name: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| {
            s.name == name
                && s.parent_span_id == parent.span_context.span_id()
                && s.span_context.trace_id() == parent.span_context.trace_id()
        })
        .collect()
}

/// Polls the finished spans until `found` finds what it looks for (spans end after
/// the acks, a moment after the replies): fails after 30 s, listing the spans.
async fn wait_for_spans<T>(
    exporter: &InMemorySpanExporter,
    found: impl Fn(&[SpanData]) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let spans = exporter.get_finished_spans().expect("spans");
        if let Some(value) = found(&spans) {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            let names: BTreeMap<String, usize> = spans.iter().fold(BTreeMap::new(), |mut m, s| {
                *m.entry(s.name.to_string()).or_default() += 1;
                m
            });
            panic!("the expected spans did not end within 30 s; finished: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
