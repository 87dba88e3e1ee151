//! librdkafka's statistics, tallied for the whole process: how many requests of each
//! type this process's Kafka clients sent, and how many messages they produced and
//! consumed. Benchmarks read the tally before and after a run to show where the
//! broker's work goes (requests per image by type, messages per produce request and
//! per fetch).
//!
//! librdkafka emits statistics only when `statistics.interval.ms` is set (it is off by
//! default; [`crate::BrokerConfig::enable_transport_statistics`] sets it), and only
//! from clients whose main queue is polled: the producer and the group members. The
//! admin client and the backlog readers never poll it, so they are created with
//! statistics off ([`super::config::KafkaConfig::admin`]), or their statistics would
//! pile up in memory.

use std::collections::BTreeMap;
use std::sync::Mutex;

use rdkafka::statistics::Statistics;

use crate::sync::lock;

/// Most clients remembered. Every client a process creates keeps its entry (its counts
/// are cumulative, and a closed client's requests still happened), so a process that
/// creates clients for ever, with statistics on, stops counting new ones here.
const MAX_CLIENTS: usize = 4_096;

/// The latest cumulative counts of each client, by librdkafka's client name.
static CLIENTS: Mutex<BTreeMap<String, TransportCounts>> = Mutex::new(BTreeMap::new());

/// Requests and messages of Kafka clients, cumulative since they were created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportCounts {
    /// Requests sent to brokers, by Kafka request type (`Produce`, `Fetch`,
    /// `OffsetCommit`, `Heartbeat`, `Metadata`, ...); types never sent are left out.
    pub requests: BTreeMap<String, u64>,
    /// Messages produced (sent to brokers).
    pub messages_produced: u64,
    /// Messages consumed (received from brokers).
    pub messages_consumed: u64,
}

impl TransportCounts {
    /// What happened between `earlier` and `self` (counts never go down; a client that
    /// appeared meanwhile counts from zero).
    pub fn since(&self, earlier: &TransportCounts) -> TransportCounts {
        let requests = self
            .requests
            .iter()
            .map(|(kind, count)| {
                let before = earlier.requests.get(kind).copied().unwrap_or(0);
                (kind.clone(), count.saturating_sub(before))
            })
            .filter(|(_, count)| *count > 0)
            .collect();
        TransportCounts {
            requests,
            messages_produced: self
                .messages_produced
                .saturating_sub(earlier.messages_produced),
            messages_consumed: self
                .messages_consumed
                .saturating_sub(earlier.messages_consumed),
        }
    }

    /// Requests of `kind` (0 when none were sent).
    pub fn requests_of(&self, kind: &str) -> u64 {
        self.requests.get(kind).copied().unwrap_or(0)
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &TransportCounts) {
        for (kind, count) in &other.requests {
            *self.requests.entry(kind.clone()).or_default() += count;
        }
        self.messages_produced += other.messages_produced;
        self.messages_consumed += other.messages_consumed;
    }
}

/// One client's counts from one statistics report.
fn counts_of(statistics: &Statistics) -> TransportCounts {
    let mut counts = TransportCounts {
        messages_produced: non_negative(statistics.txmsgs),
        messages_consumed: non_negative(statistics.rxmsgs),
        ..TransportCounts::default()
    };
    // Every broker connection, the logical ones (the group coordinator's) included:
    // each is a connection of its own with its own requests.
    for broker in statistics.brokers.values() {
        for (kind, count) in &broker.req {
            let count = non_negative(*count);
            if count > 0 {
                *counts.requests.entry(kind.clone()).or_default() += count;
            }
        }
    }
    counts
}

fn non_negative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Records one client's statistics report (called from the clients' contexts).
pub(crate) fn record(statistics: &Statistics) {
    let counts = counts_of(statistics);
    let mut clients = lock(&CLIENTS);
    if clients.len() < MAX_CLIENTS || clients.contains_key(&statistics.name) {
        clients.insert(statistics.name.clone(), counts);
    }
}

/// The counts of every Kafka client of this process so far, as of their latest
/// statistics reports; `None` before any client reported (statistics off).
pub fn transport_counts() -> Option<TransportCounts> {
    let clients = lock(&CLIENTS);
    if clients.is_empty() {
        return None;
    }
    let mut total = TransportCounts::default();
    for counts in clients.values() {
        total.add(counts);
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics report as librdkafka 2.12 writes it, trimmed to what is read here
    /// plus the fields `Statistics` requires.
    fn report(name: &str, produce: i64, fetch: i64, txmsgs: i64, rxmsgs: i64) -> Statistics {
        let broker = |nodeid: i32, source: &str, req: serde_json::Value| {
            serde_json::json!({
                "name": format!("127.0.0.1:9092/{nodeid}"), "nodeid": nodeid,
                "nodename": "127.0.0.1:9092", "source": source, "state": "UP",
                "stateage": 1, "outbuf_cnt": 0, "outbuf_msg_cnt": 0, "waitresp_cnt": 0,
                "waitresp_msg_cnt": 0, "tx": 1, "txbytes": 1, "txerrs": 0, "txretries": 0,
                "txidle": 0, "req_timeouts": 0, "rx": 1, "rxbytes": 1, "rxerrs": 0,
                "rxcorriderrs": 0, "rxpartial": 0, "rxidle": 0, "zbuf_grow": 0,
                "buf_grow": 0, "wakeups": 0, "connects": 1, "disconnects": 0,
                "req": req, "toppars": {}
            })
        };
        serde_json::from_value(serde_json::json!({
            "name": name, "client_id": "c", "type": "producer", "ts": 1, "time": 1,
            "age": 1, "replyq": 0, "msg_cnt": 0, "msg_size": 0, "msg_max": 1,
            "msg_size_max": 1, "tx": 1, "tx_bytes": 1, "rx": 1, "rx_bytes": 1,
            "txmsgs": txmsgs, "txmsg_bytes": 1, "rxmsgs": rxmsgs, "rxmsg_bytes": 1,
            "simple_cnt": 0, "metadata_cache_cnt": 1,
            "brokers": {
                "a": broker(1, "configured", serde_json::json!({"Produce": produce, "Fetch": fetch, "Metadata": 2, "Heartbeat": 0})),
                "b": broker(-1, "logical", serde_json::json!({"Heartbeat": 3, "Fetch": 0})),
            },
            "topics": {}
        }))
        .expect("a valid statistics report")
    }

    /// The tally is process-wide; this test alone records into it, under names no
    /// real client has.
    #[test]
    fn requests_are_summed_over_brokers_and_clients_and_differenced() {
        record(&report("test#producer-a", 10, 0, 300, 0));
        record(&report("test#consumer-b", 0, 40, 0, 250));
        let first = transport_counts().expect("counts once a client reported");
        assert!(first.requests_of("Produce") >= 10);
        assert!(first.requests_of("Fetch") >= 40);
        assert!(
            first.requests_of("Heartbeat") >= 6,
            "the logical broker's count"
        );

        // A later report replaces a client's counts (they are cumulative).
        record(&report("test#producer-a", 15, 0, 420, 0));
        let second = transport_counts().expect("counts");
        let run = second.since(&first);
        assert_eq!(run.requests_of("Produce"), 5);
        assert_eq!(run.requests_of("Fetch"), 0);
        assert!(
            !run.requests.contains_key("Heartbeat"),
            "zero counts are left out"
        );
        assert_eq!(run.messages_produced, 120);
        assert_eq!(run.messages_consumed, 0);
    }
}
