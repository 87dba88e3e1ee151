//! Deadlines (issue 30): after an outage, a backlog of requests whose clients gave up
//! long ago must not cost inference, nor keep the live requests behind it waiting for
//! the model.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use classifier_proto::{
    unix_micros_now, ClassifyRequest, ClassifyResponse, ErrorCode, Outcome, ProstMessage,
};
use unified_broker::{Broker, Message, SubscribeOptions};

use super::hostile::wait_until_nothing_in_flight;
use super::metrics::{http_get, metric, wait_for_status};
use super::{connect_and_publish, stop, CaseRun, OwnTopics};

/// Requests left behind by clients that gave up during the outage.
const EXPIRED: usize = 2_000;
/// Requests of a client still waiting, published after the backlog.
const LIVE: usize = 20;

/// With no server running, 2,000 requests whose deadline passed 10 s ago are published,
/// then 20 with a deadline two minutes ahead. A server started then answers the 2,000
/// `DEADLINE_EXCEEDED` and the 20 with predictions; the model runs for the 20 only
/// (`classifier_batch_size_sum`), the expired ones are counted by code and none is
/// dead-lettered.
pub fn expired_requests_cost_no_inference(backend_env: &[(String, String)]) {
    let mut run = CaseRun::new(backend_env, "deadlines");
    let OwnTopics {
        request_topic,
        group,
        dead_letter_topic,
        reply_topic,
        metrics: addr,
    } = run.own_topics();
    let image = std::fs::read(crate::workspace_root().join("examples/sneaker/00009.png"))
        .expect("example image");
    let request = |id: String, deadline_unix_micros: i64| {
        let request = ClassifyRequest {
            request_id: id.clone(),
            job_id: "deadline-job".into(),
            reply_topic: reply_topic.clone(),
            image: image.clone(),
            deadline_unix_micros,
            ..ClassifyRequest::default()
        };
        Message::new(request.encode_to_vec()).with_key(id)
    };

    let now = unix_micros_now();
    let expired = (0..EXPIRED).map(|i| request(format!("expired-{i}"), now - 10_000_000));
    let live = (0..LIVE).map(|i| request(format!("live-{i}"), now + 120_000_000));
    let backlog: Vec<Message> = expired.chain(live).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let broker = runtime.block_on(connect_and_publish(
        &run.env,
        &[(&request_topic, &group), (&reply_topic, "deadline-reader")],
        (&request_topic, backlog, 100),
    ));

    let server = run.start_server("server-deadlines");
    let log = || std::fs::read_to_string(run.server_log("server-deadlines")).unwrap_or_default();
    wait_for_status(addr, "/readyz", 200, &log);
    let started = Instant::now();
    let replies = runtime.block_on(read_replies(&*broker, &reply_topic, EXPIRED + LIVE));
    eprintln!(
        "deadlines: {} replies {:.2} s after the server was ready",
        replies.len(),
        started.elapsed().as_secs_f64()
    );
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, reply) in &replies {
        let outcome = match &reply.outcome {
            Some(Outcome::Predictions(_)) => "predictions",
            Some(Outcome::Error(e)) if e.code == ErrorCode::DeadlineExceeded as i32 => "expired",
            other => panic!("{id}: unexpected reply {other:?}"),
        };
        let expected = if id.starts_with("live-") {
            "predictions"
        } else {
            "expired"
        };
        assert_eq!(outcome, expected, "{id}: {reply:?}");
        *outcomes.entry(outcome).or_default() += 1;
    }
    assert_eq!(
        outcomes,
        BTreeMap::from([("expired", EXPIRED), ("predictions", LIVE)]),
        "every request answered once\n{}",
        log()
    );

    wait_until_nothing_in_flight(addr, &log);
    let (_, text) = http_get(addr, "/metrics");
    let value = |series: &str| metric(&text, series).unwrap_or(0.0);
    assert_eq!(
        value("classifier_batch_size_sum"),
        LIVE as f64,
        "only the live requests went through the model:\n{text}"
    );
    assert_eq!(
        value("classifier_requests_rejected_total{code=\"DEADLINE_EXCEEDED\"}"),
        EXPIRED as f64,
        "{text}"
    );
    assert_eq!(
        value("classifier_dead_lettered_total"),
        0.0,
        "expired requests are not dead-lettered:\n{text}"
    );
    stop(server);
    runtime.block_on(async {
        for topic in [&reply_topic, &request_topic, &dead_letter_topic] {
            let _ = broker.delete_topic(topic).await;
        }
    });
}

/// Request id → the first reply to it on `topic`, until `expected` ids are answered
/// (or 120 s pass).
async fn read_replies(
    broker: &dyn Broker,
    topic: &str,
    expected: usize,
) -> BTreeMap<String, ClassifyResponse> {
    let mut reader = broker
        .subscribe(topic, "deadline-reader", SubscribeOptions::default())
        .await
        .expect("subscribe to replies");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut replies = BTreeMap::new();
    while replies.len() < expected {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(delivery))) => {
                let reply = ClassifyResponse::decode(delivery.message().payload.as_ref())
                    .expect("reply decodes");
                replies.entry(reply.request_id.clone()).or_insert(reply);
                delivery.ack().expect("ack");
            }
            Ok(Some(Err(error))) => eprintln!("deadlines: receive error {error}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = reader.close().await;
    replies
}
