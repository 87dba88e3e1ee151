//! Operating a server: its metrics endpoint scraped during a real run, checked against
//! what the client saw.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::{stop, CaseRun};
use crate::{copy_examples, write_bad_inputs};

/// A server with `CLASSIFIER_METRICS_ADDR` answers `/healthz` and `/readyz`, and after a
/// client run of good and bad files its `/metrics` add up to the client's results:
/// replies by outcome, errors by code, requests received, requests through the model,
/// latencies observed, nothing left in flight.
pub fn metrics_add_up_to_the_replies(backend_env: &[(String, String)]) {
    let mut run = CaseRun::new(backend_env, "metrics");
    let addr = free_loopback_port();
    run.set_env("CLASSIFIER_METRICS_ADDR", &addr.to_string());
    let folder = run.path("mixed");
    copy_examples(&folder, 2);
    write_bad_inputs(&folder);
    let server = run.start_server("server-metrics");
    let log = || std::fs::read_to_string(run.server_log("server-metrics")).unwrap_or_default();
    wait_for_status(addr, "/healthz", 200, &log);
    wait_for_status(addr, "/readyz", 200, &log);

    let results = run.path("results.jsonl");
    let (_, stdout, summary) = run.classify_into(&folder, &results);
    assert_eq!(summary.unanswered, 0, "{stdout}");
    assert_eq!(
        summary.duplicates, 0,
        "a plain run has no duplicates: {stdout}"
    );

    // What the server answered, per the client: error rows carrying a server id came
    // from the server (the client reports some failures itself).
    let mut server_errors: BTreeMap<String, f64> = BTreeMap::new();
    for line in std::fs::read_to_string(&results).expect("results").lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("json line");
        let from_server = row["server_id"].as_str().is_some_and(|s| !s.is_empty());
        if let (true, Some(code)) = (from_server, row["error_code"].as_str()) {
            *server_errors.entry(code.to_string()).or_default() += 1.0;
        }
    }
    assert!(
        !server_errors.is_empty(),
        "no server error replies:\n{stdout}"
    );
    let classified = summary.classified as f64;
    let errors: f64 = server_errors.values().sum();

    // The client is done once the last reply is in; the server acks it just after.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (status, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        if metric(&text, "classifier_requests_in_flight") == Some(0.0) {
            // One scrape reads the metrics one by one: read them all again, after.
            break http_get(addr, "/metrics").1;
        }
        assert!(
            Instant::now() < deadline,
            "requests still in flight:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let value = |series: &str| -> f64 {
        metric(&text, series).unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
    };
    let published = "classifier_replies_published_total";
    assert_eq!(
        value(&format!("{published}{{outcome=\"classified\"}}")),
        classified
    );
    assert_eq!(value(&format!("{published}{{outcome=\"error\"}}")), errors);
    for (code, count) in &server_errors {
        let series = format!("classifier_requests_rejected_total{{code=\"{code}\"}}");
        assert_eq!(value(&series), *count, "{code}\n{text}");
    }
    assert_eq!(value("classifier_requests_classified_total"), classified);
    assert_eq!(
        value("classifier_requests_received_total"),
        classified + errors
    );
    // Only classified requests go through the model; every request was timed to its ack.
    assert_eq!(value("classifier_batch_size_sum"), classified);
    assert_eq!(
        value("classifier_request_duration_seconds_count"),
        classified + errors
    );
    assert_eq!(value("classifier_ready"), 1.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("classifier_model_info{model=") && l.ends_with(" 1")),
        "{text}"
    );
    stop(server);
}

/// The value of `series` (name and labels, as printed) in a Prometheus text page.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/metrics` at `addr` every 200 ms until `done` holds for the page, and returns
/// it; fails after `timeout`, saying `what` it waited for, with the last page and `log`.
pub(super) fn wait_for_metrics(
    addr: SocketAddr,
    (timeout, what): (Duration, &str),
    done: impl Fn(&str) -> bool,
    log: &dyn Fn() -> String,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, text) = http_get(addr, "/metrics");
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}:\n{text}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A loopback address with a port nobody listens on right now.
pub(super) fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// Polls `path` until it answers `status` (fails after 60 s, showing the server log).
pub(super) fn wait_for_status(addr: SocketAddr, path: &str, status: u16, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            let answer = http_get(addr, path);
            if answer.0 == status {
                return;
            }
            last = Some(answer);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{path} did not answer {status} within 60 s (last: {last:?})\n{}",
        log()
    );
}

/// One plain HTTP/1.1 GET: status code and body.
pub(super) fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    (status, body)
}
