//! What a running server counts ([`ServerStats`]): the counters the stages add to, their
//! [`StatsSnapshot`] for logs and tests, and the same numbers as Prometheus metrics with
//! the readiness the HTTP endpoints report (see [`crate::telemetry`]).
//!
//! Every number lives once, in a Prometheus metric: the snapshot reads those.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use unified_broker::SubscriptionState;

use crate::backlog::BacklogGauges;
use crate::models::ServedModel;
use classifier_app::lock;

/// Counters, histograms and readiness of one server process, shared by its stages and
/// its metrics endpoint.
#[derive(Debug)]
pub struct ServerStats {
    registry: Registry,
    /// Deliveries taken from the broker.
    pub(crate) received: IntCounter,
    /// Requests answered with predictions (reply built).
    pub(crate) classified: IntCounter,
    /// Requests answered with an error reply (reply built), by error code.
    rejected_by_code: IntCounterVec,
    /// Replies the broker confirmed, by outcome (`classified` or `error`).
    replies_published: IntCounterVec,
    /// Requests acked without any reply (no reply topic, or the reply topic is gone).
    pub(crate) unanswerable: IntCounter,
    /// Reply publishes that failed and were retried.
    pub(crate) publish_retries: IntCounter,
    /// Requests copied to the dead-letter topic.
    pub(crate) dead_lettered: IntCounter,
    /// Replies the broker refused for good (a reply topic it can never publish to);
    /// their requests were dead-lettered and acked.
    pub(crate) replies_refused: IntCounter,
    /// Requests per batch run through the model (its count is the number of batches).
    batch_size: Histogram,
    /// Seconds the model took per batch.
    inference_seconds: Histogram,
    /// Seconds from taking a request off the broker to acking it.
    request_seconds: Histogram,
    /// Requests taken and not yet acked or given up (see `intake::Work`).
    in_flight: IntGauge,
    /// Times the request subscription was opened again after a failure.
    resubscriptions: IntCounter,
    /// 1 for the loaded model's name and version.
    model_info: IntGaugeVec,
    /// 1 while `/readyz` says ready.
    ready: IntGauge,
    /// The request group's backlog, as the broker counts it (see [`crate::backlog`]).
    backlog: BacklogGauges,
    live: Mutex<Option<LiveSources>>,
    model_loaded: AtomicBool,
    draining: AtomicBool,
    /// False after the broker failed to answer the last probe ([`ServerStats::probed`]).
    broker_unanswered: AtomicBool,
    /// When the stats were made: the origin of `last_progress_ms`.
    started: Instant,
    /// Milliseconds after `started` of the last sign of progress: a request finished,
    /// or one was taken while none was in flight.
    last_progress_ms: AtomicU64,
}

/// What a serving pipeline lends the stats so they can be read at scrape time.
#[derive(Debug)]
struct LiveSources {
    subscription: SubscriptionState,
    /// No progress for this long with requests in flight is a stall.
    stall_after: Duration,
}

/// A snapshot of the counters of [`ServerStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Deliveries taken from the broker.
    pub received: u64,
    /// Requests answered with predictions.
    pub classified: u64,
    /// Requests answered with an error reply.
    pub rejected: u64,
    /// Requests acked without any reply (no reply topic, or the reply topic is gone).
    pub unanswerable: u64,
    /// Batches run through the model.
    pub batches: u64,
    /// Reply publishes that failed and were retried.
    pub publish_retries: u64,
    /// Requests copied to the dead-letter topic.
    pub dead_lettered: u64,
    /// Replies the broker confirmed (classified and error replies).
    pub replies_published: u64,
}

/// Why the server is not ready to take requests, as `/readyz` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// No model loaded yet.
    ModelNotLoaded,
    /// Not subscribed to the request topic (starting, or the broker is away).
    BrokerNotConnected,
    /// Shutting down: intake has stopped.
    Draining,
    /// Requests are in flight but none has finished for longer than
    /// `stall_after_secs` (e.g. their replies cannot be published).
    Stalled,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotReady::ModelNotLoaded => "model not loaded",
            NotReady::BrokerNotConnected => "not subscribed to the request topic",
            NotReady::Draining => "draining: intake stopped",
            NotReady::Stalled => "stalled: requests in flight and none finished lately",
        })
    }
}

/// Batch-size buckets: powers of two up to the largest sensible batch.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Latency buckets in seconds, 1 ms to 30 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

impl Default for ServerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerStats {
    /// Fresh metrics in their own registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("a valid metric definition");
            register(&registry, metric)
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntCounterVec::new(Opts::new(name, help), labels).expect("a valid definition");
            register(&registry, metric)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            register(
                &registry,
                Histogram::with_opts(opts).expect("valid buckets"),
            )
        };
        let gauge = |name: &str, help: &str| {
            register(
                &registry,
                IntGauge::new(name, help).expect("a valid definition"),
            )
        };
        ServerStats {
            received: counter(
                "classifier_requests_received_total",
                "Requests taken from the broker.",
            ),
            classified: counter(
                "classifier_requests_classified_total",
                "Requests the model classified (reply built).",
            ),
            rejected_by_code: counter_vec(
                "classifier_requests_rejected_total",
                "Requests answered with an error reply, by error code.",
                &["code"],
            ),
            replies_published: counter_vec(
                "classifier_replies_published_total",
                "Replies the broker confirmed, by outcome (classified or error).",
                &["outcome"],
            ),
            unanswerable: counter(
                "classifier_requests_unanswerable_total",
                "Requests acked without a reply (no reply topic, or it is gone).",
            ),
            publish_retries: counter(
                "classifier_publish_retries_total",
                "Reply publishes that failed and were retried.",
            ),
            replies_refused: counter(
                "classifier_replies_refused_total",
                "Replies the broker refused for good (a reply topic it can never publish to); their requests were dead-lettered and acked.",
            ),
            dead_lettered: counter(
                "classifier_dead_lettered_total",
                "Requests copied to the dead-letter topic.",
            ),
            batch_size: histogram(
                "classifier_batch_size",
                "Requests per batch run through the model.",
                &BATCH_BUCKETS,
            ),
            inference_seconds: histogram(
                "classifier_inference_seconds",
                "Seconds the model took per batch.",
                &SECONDS_BUCKETS,
            ),
            request_seconds: histogram(
                "classifier_request_duration_seconds",
                "Seconds from taking a request off the broker to acking it.",
                &SECONDS_BUCKETS,
            ),
            in_flight: gauge(
                "classifier_requests_in_flight",
                "Requests taken from the broker and not yet acked.",
            ),
            resubscriptions: counter(
                "classifier_broker_resubscriptions_total",
                "Times the request subscription was opened again after the broker failed.",
            ),
            model_info: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("classifier_model_info", "1 for the model being served."),
                    &["model", "version"],
                )
                .expect("a valid definition"),
            ),
            ready: gauge(
                "classifier_ready",
                "1 when the server takes requests (as /readyz).",
            ),
            backlog: BacklogGauges::register(&registry),
            registry,
            live: Mutex::new(None),
            model_loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            broker_unanswered: AtomicBool::new(false),
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
        }
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let published = |outcome: &str| self.replies_published.with_label_values(&[outcome]).get();
        StatsSnapshot {
            received: self.received.get(),
            classified: self.classified.get(),
            rejected: self.rejected_total(),
            unanswerable: self.unanswerable.get(),
            batches: self.batch_size.get_sample_count(),
            publish_retries: self.publish_retries.get(),
            dead_lettered: self.dead_lettered.get(),
            replies_published: published("classified") + published("error"),
        }
    }

    /// Adds `n` to one of the plain counters.
    pub(super) fn add(counter: &IntCounter, n: u64) {
        counter.inc_by(n);
    }

    /// Counts a request answered with error `code` (its protobuf name).
    pub(super) fn reject(&self, code: &str) {
        self.rejected_by_code.with_label_values(&[code]).inc();
    }

    /// Error replies built, over every code.
    fn rejected_total(&self) -> u64 {
        use prometheus::core::Collector;
        let families = self.rejected_by_code.collect();
        let series = families.iter().flat_map(|family| family.get_metric());
        series.map(|m| m.get_counter().get_value() as u64).sum()
    }

    /// Counts a batch of `size` requests the model ran in `seconds`.
    pub(super) fn batch(&self, size: usize, seconds: f64) {
        self.batch_size.observe(size as f64);
        self.inference_seconds.observe(seconds);
    }

    /// Counts `n` replies the broker confirmed, `errors` of them error replies.
    pub(super) fn published(&self, n: usize, errors: usize) {
        let vec = &self.replies_published;
        vec.with_label_values(&["classified"])
            .inc_by(n.saturating_sub(errors) as u64);
        vec.with_label_values(&["error"]).inc_by(errors as u64);
    }

    /// The backlog gauges, for the server's [`crate::backlog::BacklogPoller`].
    pub(crate) fn backlog_gauges(&self) -> BacklogGauges {
        self.backlog.clone()
    }

    /// Requests acked since the start: this replica's own pace,
    /// for the backlog's drain time where the broker counts no group throughput.
    pub(crate) fn requests_finished(&self) -> u64 {
        self.request_seconds.get_sample_count()
    }

    /// Records how long a request took from intake to its ack.
    pub(super) fn finished(&self, seconds: f64) {
        self.request_seconds.observe(seconds);
        self.progressed();
    }

    /// Counts a request taken into flight (its slot gives it back with
    /// `in_flight_gauge().dec()`); taking one while none was in flight is progress too,
    /// so an idle server is not taken for a stalled one.
    pub(super) fn slot_taken(&self) {
        if self.in_flight.get() == 0 {
            self.progressed();
        }
        self.in_flight.inc();
    }

    fn progressed(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_progress_ms.store(now, Ordering::Relaxed);
    }

    /// Whether requests are in flight and none finished for `stall_after`.
    fn stalled(&self, stall_after: Duration) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let quiet = now.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed));
        self.in_flight.get() > 0 && quiet > stall_after.as_millis() as u64
    }

    /// Marks `models` (name, version) as the models being served.
    pub fn models_loaded(&self, models: &[Arc<ServedModel>]) {
        self.model_info.reset();
        for model in models {
            let labels = [model.name.as_str(), model.version()];
            self.model_info.with_label_values(&labels).set(1);
        }
        self.model_loaded
            .store(!models.is_empty(), Ordering::Relaxed);
    }

    /// Lends the serving pipeline's subscription state, read when the metrics are
    /// scraped and readiness is asked.
    pub(super) fn serving(&self, subscription: SubscriptionState, stall_after: Duration) {
        *lock(&self.live) = Some(LiveSources {
            subscription,
            stall_after,
        });
        self.draining.store(false, Ordering::Relaxed);
    }

    /// The gauge of requests in flight, which each request's slot counts itself in.
    pub(super) fn in_flight_gauge(&self) -> IntGauge {
        self.in_flight.clone()
    }

    /// Records whether the broker answered the latest probe (see `Broker::ping`);
    /// returns whether that changed.
    pub(super) fn probed(&self, answered: bool) -> bool {
        self.broker_unanswered.swap(!answered, Ordering::Relaxed) == answered
    }

    /// Intake has stopped for good: the server is shutting down.
    pub(super) fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// `Ok` if the server takes requests, else the first reason it does not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if !self.model_loaded.load(Ordering::Relaxed) {
            return Err(NotReady::ModelNotLoaded);
        }
        if self.draining.load(Ordering::Relaxed) {
            return Err(NotReady::Draining);
        }
        match &*lock(&self.live) {
            Some(live)
                if !live.subscription.is_subscribed()
                    || self.broker_unanswered.load(Ordering::Relaxed) =>
            {
                Err(NotReady::BrokerNotConnected)
            }
            Some(live) if self.stalled(live.stall_after) => Err(NotReady::Stalled),
            Some(_) => Ok(()),
            None => Err(NotReady::BrokerNotConnected),
        }
    }

    /// Every metric in Prometheus' text exposition format, read now.
    pub fn render_prometheus(&self) -> String {
        if let Some(live) = &*lock(&self.live) {
            let seen = live.subscription.resubscriptions();
            let counted = self.resubscriptions.get();
            self.resubscriptions.inc_by(seen.saturating_sub(counted));
        }
        self.ready.set(i64::from(self.readiness().is_ok()));
        render(&self.registry)
    }
}

/// Every metric of `registry` in Prometheus' text exposition format, read now (the
/// server's and the backlog exporter's endpoints both serve it).
pub(crate) fn render(registry: &Registry) -> String {
    let mut text = Vec::new();
    // Encoding into a Vec fails only on metric families the registry itself built.
    if let Err(error) = TextEncoder::new().encode(&registry.gather(), &mut text) {
        tracing::error!(%error, "encoding the metrics failed");
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Registers `metric` (names are fixed and distinct, so this cannot fail at run time;
/// the unit tests build one).
pub(crate) fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("fixed, distinct metric names");
    metric
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelSet;
    use crate::pipeline::test_support::shipped_classifier;

    #[test]
    fn snapshot_reads_every_counter() {
        let stats = ServerStats::default();
        ServerStats::add(&stats.received, 1);
        ServerStats::add(&stats.classified, 2);
        stats.reject("CORRUPT_IMAGE");
        stats.reject("CORRUPT_IMAGE");
        stats.reject("UNSUPPORTED_FORMAT");
        ServerStats::add(&stats.unanswerable, 4);
        for size in [1, 2, 3, 4, 5] {
            stats.batch(size, 0.01);
        }
        ServerStats::add(&stats.publish_retries, 6);
        ServerStats::add(&stats.dead_lettered, 7);
        stats.published(8, 3);
        assert_eq!(
            stats.snapshot(),
            StatsSnapshot {
                received: 1,
                classified: 2,
                rejected: 3,
                unanswerable: 4,
                batches: 5,
                publish_retries: 6,
                dead_lettered: 7,
                replies_published: 8,
            }
        );
        let text = stats.render_prometheus();
        for line in [
            "classifier_requests_received_total 1",
            "classifier_requests_rejected_total{code=\"CORRUPT_IMAGE\"} 2",
            "classifier_requests_rejected_total{code=\"UNSUPPORTED_FORMAT\"} 1",
            "classifier_replies_published_total{outcome=\"classified\"} 5",
            "classifier_replies_published_total{outcome=\"error\"} 3",
            "classifier_batch_size_count 5",
            "classifier_batch_size_sum 15",
            "classifier_ready 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn ready_only_with_a_model_a_subscription_and_no_drain() {
        let stats = ServerStats::default();
        assert_eq!(stats.readiness(), Err(NotReady::ModelNotLoaded));
        let served = ModelSet::single(shipped_classifier()).served();
        stats.models_loaded(&served);
        assert_eq!(stats.readiness(), Err(NotReady::BrokerNotConnected));
        let info = format!(
            "classifier_model_info{{model=\"{}\",version=\"{}\"}} 1",
            served[0].name,
            served[0].version()
        );
        assert!(stats.render_prometheus().contains(&info));
        // A state nobody subscribed with reads as not subscribed.
        stats.serving(SubscriptionState::default(), Duration::from_secs(60));
        assert_eq!(stats.readiness(), Err(NotReady::BrokerNotConnected));
        stats.draining();
        assert_eq!(stats.readiness(), Err(NotReady::Draining));
    }

    #[test]
    fn requests_in_flight_without_progress_are_a_stall() {
        let stats = ServerStats::default();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            !stats.stalled(Duration::ZERO),
            "nothing in flight is no stall"
        );
        stats.slot_taken();
        assert!(
            !stats.stalled(Duration::from_millis(2)),
            "taking work after a quiet spell is progress"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(stats.stalled(Duration::from_millis(2)));
        assert!(!stats.stalled(Duration::from_secs(60)));
        stats.finished(0.005);
        assert!(!stats.stalled(Duration::from_millis(2)));
    }
}
