//! Bad input: files the server cannot classify, and poison messages on the request
//! topic, each answered or dead-lettered without blocking the good ones.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{connect_as_configured, stop, CaseRun};
use crate::{assert_errors_reported, copy_examples, write_bad_inputs};

/// Bad files over a real broker: each answered with its reason, good ones classified,
/// exit status 2.
pub fn bad_inputs_are_answered(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "bad");
    let folder = run.path("mixed");
    let good = copy_examples(&folder, 1);
    let bad = write_bad_inputs(&folder);
    let server = run.start_server("server-bad");
    let (code, stdout, summary) = run.classify_into(&folder, &run.path("results.jsonl"));
    assert_eq!(code, 2, "{stdout}");
    assert_eq!(summary.classified, good, "{stdout}");
    assert_eq!(summary.errors, bad.len(), "{stdout}");
    assert_eq!(summary.unanswered, 0, "{stdout}");
    assert_errors_reported(&stdout, &bad);
    stop(server);
}

/// Poison messages over a real broker: an undecodable payload (with and without a reply
/// topic) and an unsupported image each get an error reply where there is somewhere to
/// send it, and every one of them is copied to the dead-letter topic with its original
/// bytes and the reason. A good request behind them is still classified and not copied.
pub fn poison_messages_are_dead_lettered(backend_env: &[(String, String)]) {
    use classifier_proto::dead_letter_attributes as dead;
    use classifier_proto::{attributes, ClassifyRequest, ClassifyResponse, Outcome, ProstMessage};
    use unified_broker::{Message, SubscribeOptions};

    let mut run = CaseRun::new(backend_env, "poison");
    let request_topic = run.env_value("CLASSIFIER_REQUEST_TOPIC");
    let group = run.env_value("CLASSIFIER_GROUP");
    let dead_letter_topic = format!("{request_topic}-dead");
    run.set_env("CLASSIFIER_DEAD_LETTER_TOPIC", &dead_letter_topic);
    let reply_topic = format!("classify-replies-{request_topic}");
    // The subscription the server keeps copies for (its default `dead_letter_subscription`).
    let inspection = "dead-letter-inspection";

    let garbage: Vec<u8> = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    let request = |id: &str, image: Vec<u8>| {
        let request = ClassifyRequest {
            request_id: id.to_string(),
            reply_topic: reply_topic.clone(),
            image,
            ..ClassifyRequest::default()
        };
        Message::new(request.encode_to_vec())
            .with_key(id.to_string())
            .with_attribute(attributes::REQUEST_ID, id.to_string())
    };
    let text_request = request("poison-text", b"plain text, not an image".to_vec());
    let good_image = std::fs::read(crate::workspace_root().join("examples/bag/00018.png"))
        .expect("example image");
    let poison: Vec<(String, Message)> = vec![
        ("unroutable".into(), Message::new(garbage.clone())),
        (
            "poison-garbage".into(),
            Message::new(garbage.clone())
                .with_attribute(attributes::REQUEST_ID, "poison-garbage")
                .with_attribute(attributes::REPLY_TOPIC, reply_topic.clone()),
        ),
        ("poison-text".into(), text_request),
    ];

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let broker = runtime.block_on(async {
        let broker = connect_as_configured(&run.env).await;
        for (topic, group) in [
            (&request_topic, group.as_str()),
            (&reply_topic, "poison-reader"),
            (&dead_letter_topic, inspection),
        ] {
            broker
                .ensure_topic_and_subscription(topic, group)
                .await
                .expect("topic and subscription");
        }
        let mut messages: Vec<Message> = poison.iter().map(|(_, m)| m.clone()).collect();
        messages.push(request("good", good_image));
        broker
            .publish_batch(&request_topic, messages)
            .await
            .expect("publish");
        broker
    });

    let server = run.start_server("server-poison");
    let (replies, dead_letters) = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        // Replies: request id → (error code, or "" for predictions).
        let mut replies = BTreeMap::new();
        let mut reader = broker
            .subscribe(&reply_topic, "poison-reader", SubscribeOptions::default())
            .await
            .expect("subscribe to replies");
        while replies.len() < 3 {
            match tokio::time::timeout_at(deadline, reader.next()).await {
                Ok(Some(Ok(delivery))) => {
                    let response = ClassifyResponse::decode(delivery.message().payload.as_ref())
                        .expect("reply decodes");
                    let code = match response.outcome {
                        Some(Outcome::Error(error)) => {
                            classifier_proto::ErrorCode::try_from(error.code)
                                .map(|c| c.as_str_name().to_string())
                                .unwrap_or_default()
                        }
                        Some(Outcome::Predictions(_)) => String::new(),
                        None => "NO_OUTCOME".into(),
                    };
                    replies.insert(response.request_id, code);
                    delivery.ack().expect("ack");
                }
                Ok(Some(Err(error))) => eprintln!("poison: receive error {error}"),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = reader.close().await;
        // Dead letters: request id attribute (or "unroutable") → (code, payload).
        let mut dead_letters = BTreeMap::new();
        let mut inspector = broker
            .subscribe(&dead_letter_topic, inspection, SubscribeOptions::default())
            .await
            .expect("subscribe to dead letters");
        while dead_letters.len() < 3 {
            match tokio::time::timeout_at(deadline, inspector.next()).await {
                Ok(Some(Ok(delivery))) => {
                    let message = delivery.message();
                    let id = message
                        .attribute(attributes::REQUEST_ID)
                        .unwrap_or("unroutable")
                        .to_string();
                    assert!(
                        message
                            .attribute(dead::REASON)
                            .is_some_and(|reason| !reason.is_empty()),
                        "dead letter {id} carries its reason"
                    );
                    assert_eq!(
                        message.attribute(dead::SOURCE_TOPIC),
                        Some(request_topic.as_str())
                    );
                    dead_letters.insert(
                        id,
                        (
                            message.attribute(dead::CODE).unwrap_or("").to_string(),
                            message.payload.to_vec(),
                        ),
                    );
                    delivery.ack().expect("ack");
                }
                Ok(Some(Err(error))) => eprintln!("poison: receive error {error}"),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = inspector.close().await;
        (replies, dead_letters)
    });
    stop(server);

    let expected_replies: BTreeMap<String, String> = [
        ("good", ""),
        ("poison-garbage", "MALFORMED_REQUEST"),
        ("poison-text", "UNSUPPORTED_FORMAT"),
    ]
    .into_iter()
    .map(|(id, code)| (id.to_string(), code.to_string()))
    .collect();
    assert_eq!(replies, expected_replies, "one reply per routable request");
    let codes: BTreeMap<&str, &str> = dead_letters
        .iter()
        .map(|(id, (code, _))| (id.as_str(), code.as_str()))
        .collect();
    assert_eq!(
        codes,
        BTreeMap::from([
            ("poison-garbage", "MALFORMED_REQUEST"),
            ("poison-text", "UNSUPPORTED_FORMAT"),
            ("unroutable", "UNROUTABLE"),
        ]),
        "every poison message, and only those, dead-lettered"
    );
    for (id, original) in &poison {
        assert_eq!(
            &dead_letters[id.as_str()].1,
            &original.payload.to_vec(),
            "dead letter {id} holds the original bytes"
        );
    }
    runtime.block_on(async {
        for topic in [&reply_topic, &request_topic, &dead_letter_topic] {
            let _ = broker.delete_topic(topic).await;
        }
    });
}
