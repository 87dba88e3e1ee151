//! The gateway's Prometheus metrics (`GET /metrics`): HTTP requests by route and status,
//! their latency, images answered and refused, images waiting for the servers, replies
//! nobody waited for, and jobs by state.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets, in seconds: from a cached metadata answer to a long batch.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric of the gateway, registered once.
pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    durations: HistogramVec,
    images: IntCounterVec,
    /// Images waiting for replies (set when scraped).
    pub pending: IntGauge,
    /// Replies dropped because nobody waited for them (late, duplicate or forged).
    pub rejected_replies: IntCounter,
    /// Jobs by state (set when scraped, from the database).
    pub jobs: IntGaugeVec,
    /// Serialises [`GatewayMetrics::catch_up_rejected_replies`] between scrapes.
    catching_up: std::sync::Mutex<()>,
}

impl GatewayMetrics {
    /// The metrics, registered.
    pub fn new() -> anyhow::Result<GatewayMetrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_http_requests_total",
                "HTTP requests by route and status code.",
            ),
            &["route", "code"],
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "gateway_http_request_duration_seconds",
                "Time from a request's arrival to its response, by route.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["route"],
        )?;
        let images = IntCounterVec::new(
            Opts::new(
                "gateway_images_total",
                "Images of inference requests by outcome: answered, or the error code.",
            ),
            &["outcome"],
        )?;
        let pending = IntGauge::new(
            "gateway_pending_images",
            "Images sent to the servers and waiting for their replies.",
        )?;
        let rejected_replies = IntCounter::new(
            "gateway_rejected_replies_total",
            "Replies on the gateway's reply topic that nobody waited for (late, duplicate or forged).",
        )?;
        let jobs = IntGaugeVec::new(
            Opts::new(
                "gateway_jobs",
                "Jobs in the database by state (running, done, canceled).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        registry.register(Box::new(images.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(rejected_replies.clone()))?;
        Ok(GatewayMetrics {
            registry,
            requests,
            durations,
            images,
            pending,
            rejected_replies,
            jobs,
            catching_up: std::sync::Mutex::new(()),
        })
    }

    /// Brings the rejected-replies counter up to the dispatcher's `count` (two scrapes
    /// at once add the difference once).
    pub fn catch_up_rejected_replies(&self, count: u64) {
        let _one_at_a_time = classifier_app::lock(&self.catching_up);
        let counted = self.rejected_replies.get();
        self.rejected_replies.inc_by(count.saturating_sub(counted));
    }

    /// Counts one HTTP request of `route` (the route's pattern, so the label set stays
    /// bounded) answered with `code` after `seconds`.
    pub fn observe_request(&self, route: &str, code: u16, seconds: f64) {
        self.requests
            .with_label_values(&[route, &code.to_string()])
            .inc();
        self.durations.with_label_values(&[route]).observe(seconds);
    }

    /// Counts `count` images with `outcome` (`answered` or an error code's name).
    pub fn count_images(&self, outcome: &str, count: u64) {
        self.images.with_label_values(&[outcome]).inc_by(count);
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "encoding the metrics failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
