//! Kafka requests per image, by type, from librdkafka's own statistics of this
//! process's clients (the client, the in-process server, the floor's echo): where the
//! broker's work goes. `bench` turns the statistics on for Kafka
//! ([`unified_broker::BrokerConfig::enable_transport_statistics`]); other backends
//! have no such counts and print nothing.

use std::time::Duration;

use unified_broker::kafka::{transport_counts, TransportCounts};

/// How often the clients report their statistics during a benchmark.
pub(super) const INTERVAL: Duration = Duration::from_millis(200);

/// How long after a run its last requests are sure to be in a report: two intervals
/// and a margin. The idle fetches of this wait are counted with the run.
const SETTLE: Duration = Duration::from_millis(500);

/// The request types shown one per row; the rest are summed as "other".
const SHOWN: [&str; 5] = ["Produce", "Fetch", "OffsetCommit", "Heartbeat", "Metadata"];

/// Requests and messages over some runs, and the images those runs answered.
#[derive(Default)]
pub(super) struct RequestTally {
    counts: Option<TransportCounts>,
    images: usize,
}

/// The counts now, when the clients report statistics.
pub(super) fn snapshot() -> Option<TransportCounts> {
    transport_counts()
}

impl RequestTally {
    /// Adds what happened since `before` (a [`snapshot`]) to the tally, once the
    /// clients have reported the run's last requests.
    pub(super) async fn add_since(&mut self, before: Option<TransportCounts>, images: usize) {
        let Some(before) = before else {
            return;
        };
        tokio::time::sleep(SETTLE).await;
        let Some(after) = snapshot() else {
            return;
        };
        self.counts
            .get_or_insert_with(TransportCounts::default)
            .add(&after.since(&before));
        self.images += images;
    }

    /// Per 1,000 images, of `count`.
    fn per_thousand(&self, count: u64) -> f64 {
        1_000.0 * count as f64 / self.images.max(1) as f64
    }
}

/// Prints the requests table of the throughput runs, end to end beside the floor;
/// nothing when no client reported statistics (not Kafka).
pub(super) fn print(end_to_end: &RequestTally, floor: &RequestTally, external_server: bool) {
    let Some(counts) = &end_to_end.counts else {
        return;
    };
    let floor_counts = floor.counts.as_ref();
    println!();
    println!(
        "## Kafka requests per 1,000 images (librdkafka statistics of this process's clients{}; throughput runs, each with {} ms of idle polling after it)",
        if external_server {
            ": the client only, not the external servers"
        } else {
            ": client and in-process server"
        },
        SETTLE.as_millis()
    );
    println!();
    println!("| requests | end to end | transport floor |");
    println!("|---|---|---|");
    let floor_cell = |value: Option<f64>| value.map_or("–".into(), |v| format!("{v:.0}"));
    let other = |c: &TransportCounts| {
        c.requests
            .iter()
            .filter(|(kind, _)| !SHOWN.contains(&kind.as_str()))
            .map(|(_, count)| count)
            .sum::<u64>()
    };
    for kind in SHOWN {
        println!(
            "| {kind} | {:.0} | {} |",
            end_to_end.per_thousand(counts.requests_of(kind)),
            floor_cell(floor_counts.map(|c| floor.per_thousand(c.requests_of(kind))))
        );
    }
    println!(
        "| other | {:.0} | {} |",
        end_to_end.per_thousand(other(counts)),
        floor_cell(floor_counts.map(|c| floor.per_thousand(other(c))))
    );
    let ratio = |numerator: u64, denominator: u64| {
        if denominator == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", numerator as f64 / denominator as f64)
        }
    };
    let produced = |c: &TransportCounts| ratio(c.messages_produced, c.requests_of("Produce"));
    let fetched = |c: &TransportCounts| ratio(c.messages_consumed, c.requests_of("Fetch"));
    println!(
        "| messages per Produce request | {} | {} |",
        produced(counts),
        floor_counts.map_or("–".into(), produced)
    );
    println!(
        "| messages per Fetch | {} | {} |",
        fetched(counts),
        floor_counts.map_or("–".into(), fetched)
    );
}
