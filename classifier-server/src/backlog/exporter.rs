//! `classifier-server backlog-exporter`: the request group's backlog gauges served with
//! no server running, for scaling the servers from zero.
//!
//! An autoscaler that has taken the servers down to zero replicas has no server left to
//! report the backlog that should bring one back. The exporter is that reporter: it
//! connects to the broker, makes sure the request topic and the servers' group exist (as
//! a server does, so requests published from now on are kept for the servers), and polls
//! the group's backlog ([`super::BacklogPoller`]) without ever subscribing, so it takes
//! no request and joins no group. Its HTTP endpoint (the server's, [`crate::telemetry`])
//! serves `/metrics` with only the backlog gauges, `/healthz`, and `/readyz`: ready while
//! the broker answered the last poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use classifier_app::{connect_with_retry, AppConfig};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use unified_broker::{retry_while_unavailable, Broker};

use super::{BacklogGauges, BacklogPoller};
use crate::bearer::BearerTokens;
use crate::pipeline::render;
use crate::telemetry::{self, MetricsSource};

/// What the exporter's endpoint shows: the backlog gauges, in a registry of their own.
pub struct BacklogExporter {
    registry: Registry,
    gauges: BacklogGauges,
    /// Whether the broker answered the last poll (false before the first).
    answered: Arc<AtomicBool>,
}

impl Default for BacklogExporter {
    fn default() -> Self {
        Self::new()
    }
}

impl BacklogExporter {
    /// Gauges with no series yet: nothing polled.
    pub fn new() -> BacklogExporter {
        let registry = Registry::new();
        let gauges = BacklogGauges::register(&registry);
        BacklogExporter {
            registry,
            gauges,
            answered: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Makes sure `topic` and `group` exist (waiting while the broker is unavailable),
    /// then polls the group's backlog every `every` into the gauges until `shutdown`.
    /// Never subscribes. An error only if the topic or group cannot be made for good.
    pub async fn export(
        &self,
        broker: Arc<dyn Broker>,
        (topic, group): (&str, &str),
        every: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let made = retry_while_unavailable("the request topic", shutdown.cancelled(), || {
            broker.ensure_topic_and_subscription(topic, group)
        })
        .await;
        let Some(made) = made else {
            return Ok(());
        };
        made.context("making the request topic and the servers' group")?;
        let poller = BacklogPoller::new(broker, (topic, group), every, self.gauges.clone())
            .reporting_answers_to(Arc::clone(&self.answered));
        tracing::info!(
            topic,
            group,
            every_secs = every.as_secs_f64(),
            "exporting the backlog; not consuming"
        );
        let polling = poller.spawn();
        shutdown.cancelled().await;
        drop(polling);
        Ok(())
    }
}

impl MetricsSource for BacklogExporter {
    fn metrics_text(&self) -> String {
        render(&self.registry)
    }

    fn ready(&self) -> Result<(), String> {
        if self.answered.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the broker did not answer the last backlog poll (or none was made yet)".into())
        }
    }
}

/// The exporter as the binary runs it from `config`: its endpoint on
/// `server.metrics_addr` (required), the broker connected (waiting while it is
/// unavailable), the request topic and group of `[server]` polled every
/// `server.backlog_poll_secs` until `shutdown`.
pub async fn run(config: &AppConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let server = &config.server;
    anyhow::ensure!(
        !config.broker.in_process_only(),
        "the {} broker lives inside one process: an exporter in another process sees none \
         of its messages (use kafka, pubsub or redis)",
        config.broker.backend()
    );
    let every = server
        .backlog_poll()
        .context("server.backlog_poll_secs is 0: the exporter would never ask the broker")?;
    let addr = server.metrics_addr.context(
        "the exporter serves its gauges over HTTP: set --metrics-addr, \
         CLASSIFIER_METRICS_ADDR or server.metrics_addr",
    )?;
    let tokens = BearerTokens::from_hex_digests(
        "server.metrics_token_sha256",
        &server.metrics_token_sha256,
    )?;
    let exporter = Arc::new(BacklogExporter::new());
    let stop_http = CancellationToken::new();
    let (_, http) = telemetry::serve(addr, exporter.clone(), tokens, stop_http.clone()).await?;
    let exported = match connect_with_retry(&config.broker, &shutdown).await {
        Ok(broker) => {
            let group = (server.request_topic.as_str(), server.group.as_str());
            exporter.export(broker, group, every, &shutdown).await
        }
        Err(_) if shutdown.is_cancelled() => Ok(()),
        Err(error) => Err(error),
    };
    stop_http.cancel();
    let _ = http.await;
    exported
}
