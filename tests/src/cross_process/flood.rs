//! A flood: a backlog far larger than a server should hold, worked through with bounded
//! memory.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{connect_as_configured, stop, CaseRun};

/// Flood: 20,000 requests wait on the broker while no server runs; then one server
/// starts and works through all of them with bounded memory (its peak RSS is printed
/// and must stay under 1 GiB, far below what holding the backlog would need).
pub fn flood_is_worked_through_with_bounded_memory(backend_env: &[(String, String)]) {
    use classifier_proto::{attributes, ClassifyRequest, ClassifyResponse, ProstMessage};
    use unified_broker::{Message, SubscribeOptions};

    const REQUESTS: usize = 20_000;
    let run = CaseRun::new(backend_env, "flood");
    let request_topic = run.env_value("CLASSIFIER_REQUEST_TOPIC");
    let group = run.env_value("CLASSIFIER_GROUP");
    let reply_topic = format!("classify-replies-{request_topic}");
    let image = std::fs::read(crate::workspace_root().join("examples/bag/00018.png"))
        .expect("example image");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let broker = runtime.block_on(async {
        let broker = connect_as_configured(&run.env).await;
        for (topic, group) in [
            (&request_topic, &group),
            (&reply_topic, &"flood-reader".to_string()),
        ] {
            broker
                .ensure_topic_and_subscription(topic, group)
                .await
                .expect("topic and subscription");
        }
        let messages: Vec<Message> = (0..REQUESTS)
            .map(|i| {
                let id = format!("flood-{i}");
                let request = ClassifyRequest {
                    request_id: id.clone(),
                    reply_topic: reply_topic.clone(),
                    image: image.clone(),
                    ..ClassifyRequest::default()
                };
                Message::new(request.encode_to_vec())
                    .with_key(id.clone())
                    .with_attribute(attributes::REQUEST_ID, id)
            })
            .collect();
        for chunk in messages.chunks(500) {
            broker
                .publish_batch(&request_topic, chunk.to_vec())
                .await
                .expect("publish");
        }
        broker
    });
    let started = Instant::now();
    let server = run.start_server("server-flood");
    let (answered, duplicates) = runtime.block_on(async {
        let mut replies = broker
            .subscribe(&reply_topic, "flood-reader", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let mut seen = HashSet::new();
        let mut duplicates = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while seen.len() < REQUESTS {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(Ok(delivery))) => {
                    let response = ClassifyResponse::decode(delivery.message().payload.as_ref())
                        .expect("reply decodes");
                    if !seen.insert(response.request_id) {
                        duplicates += 1;
                    }
                    delivery.ack().expect("ack");
                }
                Ok(Some(Err(error))) => eprintln!("flood: receive error {error}"),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = replies.close().await;
        (seen.len(), duplicates)
    });
    let elapsed = started.elapsed();
    let peak_kib = server.peak_rss_kib();
    stop(server);
    eprintln!(
        "flood test: sent {REQUESTS}, replies {answered}, duplicates {duplicates}, lost {}, \
         {:.0} requests/s, server peak RSS {} MiB",
        REQUESTS - answered,
        answered as f64 / elapsed.as_secs_f64(),
        peak_kib.map_or("unknown".to_string(), |k| (k / 1024).to_string())
    );
    assert_eq!(answered, REQUESTS, "every flooded request answered");
    if let Some(kib) = peak_kib {
        assert!(
            kib < 1024 * 1024,
            "server peak RSS {kib} KiB is not bounded"
        );
    }
    runtime.block_on(async {
        let _ = broker.delete_topic(&reply_topic).await;
        let _ = broker.delete_topic(&request_topic).await;
    });
}
