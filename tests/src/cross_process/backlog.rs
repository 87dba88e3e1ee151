//! Scaling from zero: `classifier-server backlog-exporter` reports the requests that wait
//! while no server runs (what an autoscaler starts the first server on), and the servers
//! started then drain the gauge to 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::metrics::{free_loopback_port, http_get, metric, wait_for_metrics, wait_for_status};
use super::{connect_and_publish, stop, CaseRun, OwnTopics};
use crate::example_requests;

/// Requests in the burst.
const BURST: usize = 30;

/// What the exporter's drain time says while nothing drains the backlog (a day, see
/// `classifier_server::backlog::NOT_DRAINING_SECONDS`).
const NOT_DRAINING: f64 = classifier_server::backlog::NOT_DRAINING_SECONDS;

/// The exporter runs, no server does; a burst of requests is published (one by one: see
/// `unified-broker/src/kafka/backlog.rs` on Tansu's high watermark). The exporter's
/// `classifier_backlog_messages` rises to the burst and its drain time says "not
/// draining"; two servers started then answer every request, and the gauge falls to 0
/// with a drain time of 0, on the exporter and on a server. Where the broker cannot tell
/// a backlog (Pub/Sub) the exporter is ready and shows no backlog series.
pub fn the_exporter_reports_the_backlog_servers_drain(backend_env: &[(String, String)]) {
    let mut run = CaseRun::new(backend_env, "backlog");
    run.set_env("CLASSIFIER_BACKLOG_POLL_SECS", "1");
    let topics = run.own_topics();
    let exporter_addr = free_loopback_port();
    let exporter = run.start_server_with(
        "exporter",
        &[
            "--metrics-addr",
            &exporter_addr.to_string(),
            "backlog-exporter",
        ],
    );
    let exporter_log = || std::fs::read_to_string(run.server_log("exporter")).unwrap_or_default();
    wait_for_status(exporter_addr, "/readyz", 200, &exporter_log);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let broker = runtime.block_on(connect_and_publish(
        &run.env,
        &[
            (&topics.request_topic, &topics.group),
            (&topics.reply_topic, "backlog-reader"),
        ],
        (
            &topics.request_topic,
            example_requests("backlog", BURST, &topics.reply_topic),
            1,
        ),
    ));
    let told = runtime.block_on(broker.backlog(&topics.request_topic, &topics.group));
    let series = Series::of(&topics);
    if told.expect("the broker answers").is_none() {
        let (status, text) = http_get(exporter_addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        assert!(!text.contains("classifier_backlog_"), "{text}");
        stop(exporter);
        delete_topics(&runtime, &*broker, &topics);
        return;
    }
    let started = Instant::now();
    series.wait_for(exporter_addr, (BURST as f64, NOT_DRAINING), &exporter_log);
    eprintln!(
        "backlog: the exporter showed {BURST} waiting {:.1} s after the burst",
        started.elapsed().as_secs_f64()
    );

    let first = run.start_server("server-backlog-1");
    let second_addr = free_loopback_port().to_string();
    let second = run.start_server_with("server-backlog-2", &["--metrics-addr", &second_addr]);
    let started = Instant::now();
    series.wait_for(exporter_addr, (0.0, 0.0), &exporter_log);
    eprintln!(
        "backlog: drained to 0 {:.1} s after the servers started",
        started.elapsed().as_secs_f64()
    );
    let first_log =
        || std::fs::read_to_string(run.server_log("server-backlog-1")).unwrap_or_default();
    series.wait_for(topics.metrics, (0.0, 0.0), &first_log);
    stop(first);
    stop(second);
    stop(exporter);
    delete_topics(&runtime, &*broker, &topics);
}

/// Deletes the case's topics (and with them its subscriptions), best effort.
fn delete_topics(
    runtime: &tokio::runtime::Runtime,
    broker: &dyn unified_broker::Broker,
    topics: &OwnTopics,
) {
    runtime.block_on(async {
        let _ = broker.delete_topic(&topics.reply_topic).await;
        let _ = broker.delete_topic(&topics.request_topic).await;
    });
}

/// The backlog series of a case's request topic and group, as `/metrics` prints them.
struct Series {
    messages: String,
    drain_seconds: String,
}

impl Series {
    fn of(topics: &OwnTopics) -> Series {
        let labels = format!(
            "{{group=\"{}\",topic=\"{}\"}}",
            topics.group, topics.request_topic
        );
        Series {
            messages: format!("classifier_backlog_messages{labels}"),
            drain_seconds: format!("classifier_backlog_drain_seconds{labels}"),
        }
    }

    /// Polls `/metrics` at `addr` until the backlog and its drain time are `expected`
    /// (fails after 90 s, showing the last page and `log`).
    fn wait_for(&self, addr: SocketAddr, (messages, drain): (f64, f64), log: &dyn Fn() -> String) {
        let expected = (Some(messages), Some(drain));
        let shown = |text: &str| {
            let value = |series: &str| metric(text, series);
            (value(&self.messages), value(&self.drain_seconds))
        };
        let what = format!("backlog and drain seconds {expected:?} at {addr}");
        let timeout = Duration::from_secs(90);
        wait_for_metrics(addr, (timeout, &what), |text| shown(text) == expected, log);
    }
}
