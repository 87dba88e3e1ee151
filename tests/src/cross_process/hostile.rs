//! Hostile or buggy peers on the request topic (issue 28): requests whose reply routes
//! the broker can never publish to, or that are not the server's to answer, must not
//! hold the server's in-flight window. Before the fix, a few dozen of them stalled a
//! server for good (each retried every 5 s, never acked) while `/readyz` said ready.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use classifier_proto::dead_letter_attributes as dead;
use classifier_proto::{attributes, ClassifyRequest, ClassifyResponse, Outcome, ProstMessage};
use unified_broker::{Broker, Message, SubscribeOptions};

use super::metrics::{http_get, wait_for_metrics, wait_for_status};
use super::{connect_and_publish, stop, CaseRun, OwnTopics};

/// The server's in-flight window in this case: fewer than the poisoned requests, so a
/// server that held one slot per poisoned request would stall.
const WINDOW: usize = 16;

/// Reply topics of distinct topics that do not exist (a Kafka producer once held each
/// for `message.timeout.ms`).
const MISSING_TOPICS: usize = 200;

/// A server with a window of 16 gets, before one good request, poisoned requests naming
/// reply topics the broker can never publish to (a NUL byte, a newline that would forge
/// a log line, 300 and 100,000 characters), a topic without the `classify-replies-`
/// prefix, no route, 200 reply topics that do not exist and, on Redis, a key that is
/// not a stream. The good request is answered
/// within seconds; every poisoned request is acked, the unroutable ones dead-lettered as
/// `UNROUTABLE`; nothing stays in flight and `/readyz` stays ready.
pub fn poisoned_reply_routes_never_stall_the_server(backend_env: &[(String, String)]) {
    let mut run = CaseRun::new(backend_env, "hostile");
    let OwnTopics {
        request_topic,
        group,
        dead_letter_topic,
        reply_topic,
        metrics: addr,
    } = run.own_topics();
    let inspection = "dead-letter-inspection";
    let image = std::fs::read(crate::workspace_root().join("examples/trouser/00002.png"))
        .expect("example image");
    let request = |id: &str, route: &str| {
        let request = ClassifyRequest {
            request_id: id.to_string(),
            job_id: "hostile-job".into(),
            reply_topic: route.to_string(),
            image: image.clone(),
            ..ClassifyRequest::default()
        };
        // The route as an attribute too where brokers allow it (Pub/Sub caps attribute
        // values at 1,024 bytes): the server must cope with either.
        let message = Message::new(request.encode_to_vec()).with_key(id.to_string());
        if route.len() <= 1_024 && !route.contains(['\0', '\n']) {
            message.with_attribute(attributes::REPLY_TOPIC, route.to_string())
        } else {
            message
        }
    };

    let (unroutable, missing) = poisoned_routes(&run, &request_topic);
    let mut poison: Vec<Message> = unroutable
        .iter()
        .map(|(id, route)| request(id, route))
        .collect();
    poison.extend(
        missing
            .iter()
            .enumerate()
            .map(|(i, route)| request(&format!("missing-{i}"), route)),
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let broker = runtime.block_on(connect_and_publish(
        &run.env,
        &[
            (&request_topic, &group),
            (&reply_topic, "hostile-reader"),
            (&dead_letter_topic, inspection),
        ],
        (&request_topic, poison, 50),
    ));

    let server = run.start_server_with("server-hostile", &["--max-in-flight", "16"]);
    let log = || std::fs::read_to_string(run.server_log("server-hostile")).unwrap_or_default();
    wait_for_status(addr, "/readyz", 200, &log);
    let started = Instant::now();
    let answered_in = runtime.block_on(async {
        broker
            .publish(&request_topic, request("good", &reply_topic))
            .await
            .expect("publish the good request");
        wait_for_reply(&*broker, &reply_topic, "good").await
    });
    let answered_in = answered_in.unwrap_or_else(|| {
        panic!(
            "the good request behind {} poisoned ones (window {WINDOW}) got no reply within 60 s\n{}",
            unroutable.len() + missing.len(),
            log()
        )
    });
    eprintln!(
        "hostile: the good request was answered {:.2} s after it was sent ({:.2} s after start)",
        answered_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    let codes = runtime.block_on(read_dead_letters(
        &*broker,
        &dead_letter_topic,
        inspection,
        unroutable.len(),
    ));
    let expected: BTreeMap<String, String> = unroutable
        .keys()
        .map(|id| (id.clone(), "UNROUTABLE".to_string()))
        .collect();
    assert_eq!(
        codes,
        expected,
        "every unroutable request dead-lettered once; server log:\n{}",
        log()
    );
    wait_until_nothing_in_flight(addr, &log);
    assert_eq!(http_get(addr, "/readyz").0, 200, "ready after the flood");
    stop(server);
    let log = log();
    assert!(
        !log.lines()
            .any(|line| line.starts_with("ERROR classifier_server: FORGED")),
        "a newline in a peer's string forged a log line:\n{log}"
    );
    runtime.block_on(async {
        for topic in [&reply_topic, &request_topic, &dead_letter_topic] {
            let _ = broker.delete_topic(topic).await;
        }
    });
}

/// Request id → a reply route the server must never publish to, and the routes of
/// topics that do not exist (answered as gone: acked, no dead letter). A NUL byte, a
/// newline and 300 characters break Kafka's and Pub/Sub's naming rules but are a legal
/// Redis key: there, those are just topics that do not exist.
fn poisoned_routes(run: &CaseRun, request_topic: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let redis = run.env_value("CLASSIFIER_BROKER") == "redis";
    let mut unroutable = BTreeMap::from([
        (
            "long-100k".to_string(),
            format!("classify-replies-{}", "y".repeat(100_000)),
        ),
        ("wrong-prefix".to_string(), format!("{request_topic}-other")),
        ("no-route".to_string(), String::new()),
    ]);
    let mut missing: Vec<String> = (0..MISSING_TOPICS)
        .map(|i| format!("classify-replies-missing-{request_topic}-{i}"))
        .collect();
    let illegal_names = [
        ("nul-byte", "classify-replies-a\0b".to_string()),
        (
            "newline",
            "classify-replies-\nERROR classifier_server: FORGED".to_string(),
        ),
        ("long-300", format!("classify-replies-{}", "x".repeat(300))),
    ];
    for (id, route) in illegal_names {
        if redis {
            missing.push(route);
        } else {
            unroutable.insert(id.to_string(), route);
        }
    }
    if redis {
        let key = format!("classify-replies-string-{request_topic}");
        set_redis_string(&run.env_value("REDIS_URL"), &key);
        unroutable.insert("not-a-stream".to_string(), key);
    }
    (unroutable, missing)
}

/// Sets `key` to a plain string on the Redis server at `url` (with `redis-cli`, which
/// comes with redis-server), so that publishing to it fails with `WRONGTYPE`.
fn set_redis_string(url: &str, key: &str) {
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or("6379")
        .trim_end_matches('/');
    let status = std::process::Command::new("redis-cli")
        .args(["-p", port, "SET", key, "not a stream"])
        .status()
        .expect("redis-cli runs");
    assert!(status.success(), "redis-cli SET {key}");
}

/// How long after now the reply to `request_id` arrived on `topic` (`None` after 60 s).
async fn wait_for_reply(broker: &dyn Broker, topic: &str, request_id: &str) -> Option<Duration> {
    let sent = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut reader = broker
        .subscribe(topic, "hostile-reader", SubscribeOptions::default())
        .await
        .expect("subscribe to replies");
    let mut answered = None;
    while answered.is_none() {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(delivery))) => {
                let response = ClassifyResponse::decode(delivery.message().payload.as_ref())
                    .expect("reply decodes");
                if response.request_id == request_id {
                    assert!(
                        matches!(response.outcome, Some(Outcome::Predictions(_))),
                        "{response:?}"
                    );
                    answered = Some(sent.elapsed());
                }
                delivery.ack().expect("ack");
            }
            Ok(Some(Err(error))) => eprintln!("hostile: receive error {error}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = reader.close().await;
    answered
}

/// Request id → dead-letter code of the first `expected` copies on `topic` (waits up to
/// 60 s for them, then 2 s more for any extra).
async fn read_dead_letters(
    broker: &dyn Broker,
    topic: &str,
    group: &str,
    expected: usize,
) -> BTreeMap<String, String> {
    let mut inspector = broker
        .subscribe(topic, group, SubscribeOptions::default())
        .await
        .expect("subscribe to dead letters");
    let mut codes = BTreeMap::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, inspector.next()).await {
            Ok(Some(Ok(delivery))) => {
                let copy = ClassifyRequest::decode(delivery.message().payload.as_ref())
                    .expect("the copy holds the original request");
                let code = delivery.message().attribute(dead::CODE).unwrap_or("");
                let earlier = codes.insert(copy.request_id.clone(), code.to_string());
                assert!(earlier.is_none(), "{} dead-lettered twice", copy.request_id);
                delivery.ack().expect("ack");
                if codes.len() == expected {
                    deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                }
            }
            Ok(Some(Err(error))) => eprintln!("hostile: receive error {error}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = inspector.close().await;
    codes
}

/// Polls `/metrics` until no request is in flight (fails after 60 s).
pub(super) fn wait_until_nothing_in_flight(addr: std::net::SocketAddr, log: &dyn Fn() -> String) {
    let idle = |text: &str| text.contains("\nclassifier_requests_in_flight 0\n");
    let what = (Duration::from_secs(60), "idle server after the flood");
    wait_for_metrics(addr, what, idle, log);
}
