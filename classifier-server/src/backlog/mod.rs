//! The request group's backlog as the broker counts it ([`Broker::backlog`]), exported
//! for an autoscaler (KEDA's Prometheus scaler, an HPA on external metrics):
//!
//! - `classifier_backlog_messages{topic,group}`: the requests the group has not answered
//!   yet, waiting and delivered-but-unacked together (what to scale on);
//! - `classifier_backlog_delivered_messages{topic,group}`: the part of it handed to a
//!   server and not yet acked, where the broker tells it apart (Redis, embedded; not
//!   Kafka, where it is inside the first);
//! - `classifier_backlog_drain_seconds{topic,group}`: that backlog over the group's
//!   recent throughput ([`rate`]): 0 with nothing waiting, [`NOT_DRAINING_SECONDS`] when
//!   nothing drains it.
//!
//! A [`BacklogPoller`] asks the broker every `server.backlog_poll_secs` on a task of its
//! own (never in the message path) and sets the gauges. While the broker cannot tell
//! (Pub/Sub always, Redis when it cannot compute a lag) or does not answer, the series
//! are absent rather than stale; errors are logged at debug, and as rate-limited
//! warnings. The throughput is the change of the group's consumed count over
//! [`rate::RATE_WINDOW`], every replica's work; where the broker gives no count, this
//! replica's own answered requests stand in. A server polls beside its pipeline
//! (`ModelServer::run`); [`exporter`] polls without serving, for scaling from zero.

pub mod exporter;
pub mod rate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use tokio::task::JoinHandle;
use unified_broker::{Backlog, Broker};

pub use rate::NOT_DRAINING_SECONDS;

use crate::log_safe::LogLimiter;
use crate::pipeline::{register, ServerStats};
use crate::warn_limited;
use rate::Rate;

/// The longest one backlog question may take before the poll counts as failed.
const POLL_TIMEOUT: Duration = Duration::from_secs(15);

/// The shortest period between polls, whatever the poller is given.
const MIN_PERIOD: Duration = Duration::from_millis(100);

static POLL_FAILED: LogLimiter = LogLimiter::new(1, Duration::from_secs(60));

/// The backlog gauges, registered in a registry (the server's, or the exporter's own).
#[derive(Clone, Debug)]
pub struct BacklogGauges {
    messages: IntGaugeVec,
    delivered: IntGaugeVec,
    drain_seconds: GaugeVec,
}

/// The labels of every backlog series.
const LABELS: [&str; 2] = ["topic", "group"];

impl BacklogGauges {
    /// The gauges, registered in `registry` (their names are fixed and distinct).
    pub fn register(registry: &Registry) -> BacklogGauges {
        let int_gauge = |name: &str, help: &str| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), &LABELS).expect("a valid gauge");
            register(registry, gauge)
        };
        let drain = GaugeVec::new(
            Opts::new(
                "classifier_backlog_drain_seconds",
                "Seconds the group's backlog takes to drain at its throughput of the last \
                 minute; 86400 when nothing drains it.",
            ),
            &LABELS,
        )
        .expect("a valid gauge");
        BacklogGauges {
            messages: int_gauge(
                "classifier_backlog_messages",
                "Requests the group has not answered yet (waiting plus delivered and not \
                 acked), as the broker counts them.",
            ),
            delivered: int_gauge(
                "classifier_backlog_delivered_messages",
                "Of those, delivered to a server and not yet acked (where the broker \
                 tells them apart).",
            ),
            drain_seconds: register(registry, drain),
        }
    }

    /// Shows `backlog` and its drain time for `labels` (topic, group).
    fn set(&self, labels: &[&str; 2], backlog: &Backlog, drain_seconds: Option<f64>) {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let messages = self.messages.with_label_values(labels);
        messages.set(count(backlog.unanswered()));
        match backlog.in_flight {
            Some(delivered) => self
                .delivered
                .with_label_values(labels)
                .set(count(delivered)),
            None => {
                // An error only says the series was not there.
                let _ = self.delivered.remove_label_values(labels);
            }
        }
        match drain_seconds {
            Some(seconds) => self.drain_seconds.with_label_values(labels).set(seconds),
            None => {
                // An error only says the series was not there.
                let _ = self.drain_seconds.remove_label_values(labels);
            }
        }
    }

    /// Removes the series of `labels`: the backlog is not known now.
    fn forget(&self, labels: &[&str; 2]) {
        // An error only says the series was not there.
        let _ = self.messages.remove_label_values(labels);
        let _ = self.delivered.remove_label_values(labels);
        let _ = self.drain_seconds.remove_label_values(labels);
    }
}

/// A running [`BacklogPoller`]. Dropping it stops the polls and removes the group's
/// series: a draining or stopped server (or one whose start failed) shows no backlog
/// frozen at its last poll, which an autoscaler taking the `max` over replicas would
/// keep acting on.
pub struct BacklogTask {
    task: JoinHandle<()>,
    gauges: BacklogGauges,
    labels: [String; 2],
}

impl Drop for BacklogTask {
    fn drop(&mut self) {
        self.task.abort();
        let [topic, group] = &self.labels;
        self.gauges.forget(&[topic.as_str(), group.as_str()]);
    }
}

/// Asks the broker for one group's backlog every so often and shows it in
/// [`BacklogGauges`] (see the module docs).
pub struct BacklogPoller {
    broker: Arc<dyn Broker>,
    topic: String,
    group: String,
    every: Duration,
    gauges: BacklogGauges,
    /// This replica's stats, whose answered requests stand in for the group's
    /// throughput where the broker counts none (`None` in the exporter: no requests).
    own: Option<Arc<ServerStats>>,
    group_rate: Rate,
    own_rate: Rate,
    /// Whether the broker answered the last poll (the exporter's readiness).
    answered: Arc<AtomicBool>,
    /// Whether the backlog was known at the last poll that got an answer.
    known: Option<bool>,
}

impl BacklogPoller {
    /// A poller of `group` on `topic`, every `every`, into `gauges`; nothing is asked
    /// until [`BacklogPoller::spawn`].
    pub fn new(
        broker: Arc<dyn Broker>,
        (topic, group): (&str, &str),
        every: Duration,
        gauges: BacklogGauges,
    ) -> BacklogPoller {
        BacklogPoller {
            broker,
            topic: topic.to_string(),
            group: group.to_string(),
            every,
            gauges,
            own: None,
            group_rate: Rate::new(rate::RATE_WINDOW),
            own_rate: Rate::new(rate::RATE_WINDOW),
            answered: Arc::new(AtomicBool::new(false)),
            known: None,
        }
    }

    /// The same poller, with `stats`' answered requests as the throughput where the
    /// broker counts none.
    pub fn with_own_stats(self, stats: Arc<ServerStats>) -> BacklogPoller {
        BacklogPoller {
            own: Some(stats),
            ..self
        }
    }

    /// The same poller, setting `answered` after each poll to whether the broker
    /// answered it (the exporter's readiness).
    pub fn reporting_answers_to(self, answered: Arc<AtomicBool>) -> BacklogPoller {
        BacklogPoller { answered, ..self }
    }

    /// Polls on a task of its own, the first time at once, until the returned
    /// [`BacklogTask`] is dropped.
    pub fn spawn(self) -> BacklogTask {
        let gauges = self.gauges.clone();
        let labels = [self.topic.clone(), self.group.clone()];
        BacklogTask {
            task: tokio::spawn(self.run()),
            gauges,
            labels,
        }
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.every.max(MIN_PERIOD));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let asked = self.broker.backlog(&self.topic, &self.group);
            let answer = match tokio::time::timeout(POLL_TIMEOUT, asked).await {
                Ok(answer) => answer.map_err(|error| error.to_string()),
                Err(_) => Err(format!("no answer within {POLL_TIMEOUT:?}")),
            };
            self.record(answer);
        }
    }

    /// Sets the gauges from one poll's answer.
    fn record(&mut self, answer: Result<Option<Backlog>, String>) {
        let (topic, group) = (self.topic.clone(), self.group.clone());
        let labels = [topic.as_str(), group.as_str()];
        self.answered.store(answer.is_ok(), Ordering::Relaxed);
        let now = Instant::now();
        if let Some(stats) = &self.own {
            self.own_rate.observe(now, stats.requests_finished());
        }
        match answer {
            Ok(Some(backlog)) => {
                self.note_known(true);
                let per_second = self.throughput(now, backlog.consumed);
                let drain = self.drain_seconds(backlog.unanswered(), per_second);
                self.gauges.set(&labels, &backlog, drain);
            }
            Ok(None) => {
                self.note_known(false);
                self.group_rate.clear();
                self.gauges.forget(&labels);
            }
            Err(error) => {
                // The pace resumes after the outage, not across it.
                self.group_rate.clear();
                self.gauges.forget(&labels);
                tracing::debug!(%topic, %group, %error, "backlog poll failed");
                warn_limited!(POLL_FAILED, %topic, %group, %error, "cannot read the group's backlog from the broker; its gauges are absent until it answers");
            }
        }
    }

    /// The group's consumed messages per second over the window (`consumed` now), or
    /// this replica's answered requests per second where the broker counts none.
    fn throughput(&mut self, now: Instant, consumed: Option<u64>) -> Option<f64> {
        match consumed {
            Some(consumed) => {
                self.group_rate.observe(now, consumed);
                self.group_rate.per_second()
            }
            None => {
                self.group_rate.clear();
                self.own.as_ref().and(self.own_rate.per_second())
            }
        }
    }

    /// The drain time to show, `None` for none: a server shows none while messages
    /// wait and it has not measured a pace yet (one poll so far), since a replica that
    /// just started would otherwise report [`NOT_DRAINING_SECONDS`] and, under an
    /// autoscaler's `max` over replicas, ask for more replicas on every scale-up. The
    /// exporter, which serves no requests, shows it: nothing consumes while it is all
    /// that runs.
    fn drain_seconds(&self, unanswered: u64, per_second: Option<f64>) -> Option<f64> {
        if unanswered > 0 && per_second.is_none() && self.own.is_some() {
            return None;
        }
        Some(rate::drain_seconds(unanswered, per_second))
    }

    /// Logs when the broker starts or stops telling the backlog.
    fn note_known(&mut self, known: bool) {
        if self.known.replace(known) == Some(known) {
            return;
        }
        let (topic, group, backend) = (&self.topic, &self.group, self.broker.backend());
        if known {
            tracing::info!(%topic, %group, backend, "exporting the group's backlog");
        } else {
            tracing::info!(%topic, %group, backend, "the broker cannot tell the group's backlog now (Pub/Sub never does: read Cloud Monitoring's subscription/num_undelivered_messages); the backlog gauges are absent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poller() -> (BacklogPoller, Registry) {
        let registry = Registry::new();
        let gauges = BacklogGauges::register(&registry);
        let broker = Arc::new(unified_broker::embedded::EmbeddedBroker::new(
            Default::default(),
        ));
        let poller = BacklogPoller::new(broker, ("requests", "servers"), Duration::ZERO, gauges);
        (poller, registry)
    }

    fn text(registry: &Registry) -> String {
        crate::pipeline::render(registry)
    }

    const SERIES: &str = "{group=\"servers\",topic=\"requests\"}";

    #[test]
    fn gauges_show_the_last_answer_and_vanish_when_it_is_unknown() {
        let (poller, registry) = poller();
        let answered = Arc::new(AtomicBool::new(false));
        let mut poller = poller.reporting_answers_to(Arc::clone(&answered));
        let waiting = Backlog {
            waiting: 7,
            in_flight: Some(3),
            consumed: Some(100),
        };
        poller.record(Ok(Some(waiting)));
        let shown = text(&registry);
        for line in [
            format!("classifier_backlog_messages{SERIES} 10"),
            format!("classifier_backlog_delivered_messages{SERIES} 3"),
            format!("classifier_backlog_drain_seconds{SERIES} {NOT_DRAINING_SECONDS}"),
        ] {
            assert!(shown.lines().any(|l| l == line), "{line} in\n{shown}");
        }
        assert!(answered.load(Ordering::Relaxed));
        poller.record(Ok(None));
        assert!(!text(&registry).contains("classifier_backlog_messages{"));
        poller.record(Ok(Some(Backlog::default())));
        assert!(text(&registry).contains(&format!("classifier_backlog_drain_seconds{SERIES} 0")));
        poller.record(Err("down".into()));
        assert!(!text(&registry).contains("classifier_backlog_drain_seconds{"));
        assert!(!answered.load(Ordering::Relaxed));
    }

    #[test]
    fn a_server_shows_no_drain_time_before_it_has_measured_a_pace() {
        let (poller, registry) = poller();
        let mut poller = poller.with_own_stats(Arc::new(ServerStats::default()));
        let waiting = |consumed| Backlog {
            waiting: 5,
            in_flight: None,
            consumed: Some(consumed),
        };
        poller.record(Ok(Some(waiting(10))));
        let shown = text(&registry);
        assert!(shown.contains(&format!("classifier_backlog_messages{SERIES} 5")));
        assert!(
            !shown.contains("classifier_backlog_drain_seconds{"),
            "{shown}"
        );
        poller.record(Ok(Some(waiting(10))));
        assert!(text(&registry).contains(&format!(
            "classifier_backlog_drain_seconds{SERIES} {NOT_DRAINING_SECONDS}"
        )));
        poller.record(Err("down".into()));
        poller.record(Ok(Some(waiting(10))));
        assert!(
            !text(&registry).contains("classifier_backlog_drain_seconds{"),
            "the pace starts over after an outage"
        );
    }

    #[tokio::test]
    async fn a_stopped_poller_leaves_no_series_behind() {
        let (poller, registry) = poller();
        poller
            .broker
            .ensure_topic_and_subscription("requests", "servers")
            .await
            .expect("made");
        let polling = poller.spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !text(&registry).contains("classifier_backlog_messages{") {
            assert!(
                Instant::now() < deadline,
                "the poller never showed the backlog"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(polling);
        assert!(
            !text(&registry).contains("classifier_backlog_"),
            "{}",
            text(&registry)
        );
    }

    #[test]
    fn kafka_shows_no_delivered_series() {
        let (mut poller, registry) = poller();
        let kafka_like = Backlog {
            waiting: 4,
            in_flight: None,
            consumed: Some(0),
        };
        poller.record(Ok(Some(kafka_like)));
        let shown = text(&registry);
        assert!(shown.contains(&format!("classifier_backlog_messages{SERIES} 4")));
        assert!(!shown.contains("classifier_backlog_delivered_messages{"));
    }

    #[test]
    fn the_group_count_gives_the_throughput_else_this_replicas_own() {
        let (poller, _registry) = poller();
        let stats = Arc::new(ServerStats::default());
        let mut poller = poller.with_own_stats(Arc::clone(&stats));
        let start = Instant::now();
        poller.own_rate.observe(start, 0);
        poller.own_rate.observe(start + Duration::from_secs(10), 50);
        assert_eq!(poller.throughput(start, None), Some(5.0));
        assert_eq!(poller.throughput(start, Some(1_000)), None, "one sample");
        let later = start + Duration::from_secs(4);
        assert_eq!(poller.throughput(later, Some(1_400)), Some(100.0));
    }
}
