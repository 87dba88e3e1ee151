//! Reading dead letters back and re-publishing them after a fix.
//!
//! - On the embedded broker, through the library (the embedded broker lives inside one
//!   process): a server with a tiny image-size limit dead-letters two images; the inbox
//!   lists both with code and source; after the "fix" (a server with normal limits) one
//!   is re-published and classified, the other stays on the topic.
//! - On Kafka, through the binaries: `client-app dead-letters` lists what a
//!   `classifier-server` process dead-lettered, and `--republish ID --to-topic T` sends
//!   the original request (without the dead-letter attributes) to T, after which only
//!   the letters not re-published are listed.

use std::sync::Arc;
use std::time::Duration;

use classifier_proto::{attributes, ClassifyRequest, ErrorCode, Outcome, ProstMessage};
use classifier_server::{load_classifier, ModelServer, ServerConfig};
use client_app::dead_letters::{DeadLetterInbox, InboxOptions};
use integration_tests::cross_process::backend_env;
use integration_tests::{
    copy_examples, next_delivery, next_reply, run_client, top_class, workspace_root, ServerProcess,
};
use tokio_util::sync::CancellationToken;
use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
use unified_broker::{Broker, Message, SubscribeOptions};

const DEAD_LETTER_TOPIC: &str = "dead-letters-under-test";
const INSPECTION_GROUP: &str = "inspection";

fn server_config(request_topic: &str, max_side: u32) -> ServerConfig {
    let mut config = ServerConfig {
        model_dir: Some(workspace_root().join("models/fashion-mnist")),
        request_topic: request_topic.to_string(),
        dead_letter_topic: DEAD_LETTER_TOPIC.to_string(),
        dead_letter_subscription: INSPECTION_GROUP.to_string(),
        ..ServerConfig::default()
    };
    config.limits.max_width = max_side;
    config.limits.max_height = max_side;
    config
}

/// Starts a server on `broker`; returns its stop token and task.
async fn start_server(
    broker: &Arc<dyn Broker>,
    config: ServerConfig,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<impl std::fmt::Debug>>,
) {
    let classifier = load_classifier(&config).expect("model");
    let server = ModelServer::new(Arc::clone(broker), config, classifier);
    server.prepare_topics().await.expect("topics");
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));
    (stop, task)
}

fn request(id: &str, file: &str, reply_topic: &str) -> Message {
    let path = workspace_root().join("examples").join(file);
    let image = std::fs::read(&path).expect("example image");
    let request = ClassifyRequest {
        schema_version: 1,
        request_id: id.into(),
        job_id: "job".into(),
        image,
        file_name: file.into(),
        reply_topic: reply_topic.into(),
        ..Default::default()
    };
    Message::new(request.encode_to_vec())
        .with_attribute(attributes::REQUEST_ID, id)
        .with_attribute(attributes::REPLY_TOPIC, reply_topic)
}

fn inbox_options() -> InboxOptions {
    InboxOptions {
        topic: DEAD_LETTER_TOPIC.into(),
        group: INSPECTION_GROUP.into(),
        idle: Duration::from_secs(2),
        max_letters: 100,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_dead_letters_are_listed_and_republished_after_a_fix() {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
    let topic = "requests-dead-letters";
    broker
        .ensure_topic_and_subscription("classify-replies-dl-test", "me")
        .await
        .expect("classify-replies-dl-test");
    let mut replies = broker
        .subscribe(
            "classify-replies-dl-test",
            "me",
            SubscribeOptions::default(),
        )
        .await
        .expect("subscribe");

    // A server whose limit (8×8 pixels) no 28×28 example meets.
    let (stop, task) = start_server(&broker, server_config(topic, 8)).await;
    broker
        .publish(
            topic,
            request("r-1", "trouser/00002.png", "classify-replies-dl-test"),
        )
        .await
        .expect("publish");
    broker
        .publish(
            topic,
            request("r-2", "bag/00018.png", "classify-replies-dl-test"),
        )
        .await
        .expect("publish");
    for _ in 0..2 {
        match next_reply(&mut *replies).await.outcome {
            Some(Outcome::Error(error)) => assert_eq!(error.code, ErrorCode::ImageTooLarge as i32),
            other => panic!("expected IMAGE_TOO_LARGE, got {other:?}"),
        }
    }
    stop.cancel();
    task.await.expect("task").expect("server ran");

    let mut inbox = DeadLetterInbox::open(Arc::clone(&broker), &inbox_options())
        .await
        .expect("inbox");
    let mut listed: Vec<_> = inbox
        .letters()
        .iter()
        .map(|l| {
            (
                l.request_id.clone(),
                l.code.clone(),
                l.source_topic.clone(),
                l.file_name.clone(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            (
                "r-1".into(),
                "IMAGE_TOO_LARGE".into(),
                topic.into(),
                Some("trouser/00002.png".into())
            ),
            (
                "r-2".into(),
                "IMAGE_TOO_LARGE".into(),
                topic.into(),
                Some("bag/00018.png".into())
            ),
        ]
    );
    assert!(
        inbox.letters().iter().all(|l| l.reason.contains("8")),
        "reason names the limit"
    );

    // The fix: a server with normal limits. Re-publish one letter; it is classified.
    let (stop, task) = start_server(&broker, server_config(topic, 16_384)).await;
    let count = inbox
        .republish(|l| l.request_id == "r-1", None)
        .await
        .expect("republish");
    assert_eq!(count, 1);
    inbox.close().await.expect("close");
    let reply = next_reply(&mut *replies).await;
    assert_eq!(reply.request_id, "r-1");
    assert_eq!(top_class(&reply), "Trouser");
    stop.cancel();
    task.await.expect("task").expect("server ran");

    // The letter not re-published is still there; the re-published one is gone.
    let inbox = DeadLetterInbox::open(Arc::clone(&broker), &inbox_options())
        .await
        .expect("inbox");
    let left: Vec<_> = inbox
        .letters()
        .iter()
        .map(|l| l.request_id.clone())
        .collect();
    assert_eq!(left, vec!["r-2".to_string()]);
    inbox.close().await.expect("close");
}

/// The Kafka environment, or `None` when no broker is configured (fails under
/// `REQUIRE_BROKERS`).
fn kafka_env() -> Option<Vec<(String, String)>> {
    backend_env("kafka", "KAFKA_BOOTSTRAP_SERVERS")
}

fn stdout_of(output: &std::process::Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_command_lists_and_republishes() {
    let Some(mut env) = kafka_env() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let request_topic = format!("dl-requests-{run}");
    let dead_letter_topic = format!("dl-dead-{run}");
    let inspect_topic = format!("dl-inspect-{run}");
    env.extend([
        ("CLASSIFIER_REQUEST_TOPIC".into(), request_topic.clone()),
        (
            "CLASSIFIER_DEAD_LETTER_TOPIC".into(),
            dead_letter_topic.clone(),
        ),
    ]);
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("tiny-limits.toml");
    std::fs::write(&config, "[server.limits]\nmax_width = 8\nmax_height = 8\n").expect("config");
    let folder = work.path().join("images");
    let images = copy_examples(&folder, 1);

    let mut server_env = env.clone();
    server_env.push((
        "CLASSIFIER_CONFIG".into(),
        config.to_string_lossy().into_owned(),
    ));
    let server = ServerProcess::start("dl-server", &server_env, &work.path().join("server.log"));
    let output = run_client(
        &[
            "classify",
            &folder.to_string_lossy(),
            "--quiet",
            "--timeout",
            "120",
        ],
        &env,
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "every image IMAGE_TOO_LARGE: {}",
        stdout_of(&output)
    );
    assert_eq!(
        server.terminate(Duration::from_secs(60)).map(|s| s.code()),
        Some(Some(0))
    );

    let list = |extra: &[&str]| {
        let mut args = vec!["dead-letters", "--json", "--wait", "15"];
        args.extend_from_slice(extra);
        let output = run_client(&args, &env);
        assert_eq!(output.status.code(), Some(0), "{}", stdout_of(&output));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).expect("one JSON object per line")
            })
            .collect::<Vec<_>>()
    };
    let letters = list(&[]);
    assert_eq!(letters.len(), images, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["code"], "IMAGE_TOO_LARGE", "{letter}");
        assert_eq!(letter["source_topic"], request_topic.as_str(), "{letter}");
        assert_eq!(letter["server_id"], "dl-server", "{letter}");
        assert!(
            letter["file_name"]
                .as_str()
                .is_some_and(|f| f.ends_with(".png")),
            "{letter}"
        );
    }

    // Re-publish the oldest letter to a topic of the test's own, and read it there.
    let broker = unified_broker::connect(&{
        let mut config = unified_broker::BrokerConfig::default_for("kafka").expect("kafka");
        config.apply_env(&|name| std::env::var(name).ok());
        config
    })
    .await
    .expect("connect");
    broker
        .ensure_topic_and_subscription(&inspect_topic, "test")
        .await
        .expect("inspect topic");
    let chosen = letters[0]["request_id"]
        .as_str()
        .expect("request id")
        .to_string();
    let remaining = list(&["--republish", &chosen, "--to-topic", &inspect_topic]);
    assert_eq!(
        remaining.len(),
        images,
        "the listing before re-publishing shows all"
    );
    let mut inspect = broker
        .subscribe(&inspect_topic, "test", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let delivery = next_delivery(
        &mut *inspect,
        Duration::from_secs(90),
        "re-published request",
    )
    .await;
    let message = delivery.message();
    let original = ClassifyRequest::decode(message.payload.as_ref()).expect("the original request");
    assert_eq!(original.request_id, chosen);
    assert_eq!(
        message.attribute(attributes::REQUEST_ID),
        Some(chosen.as_str())
    );
    assert!(
        message
            .attributes
            .keys()
            .all(|name| !name.starts_with("dead-letter-")),
        "dead-letter attributes stripped: {:?}",
        message.attributes
    );
    delivery.ack().expect("ack");
    inspect.close().await.expect("close");

    // Only the letters not re-published are left.
    let left = list(&[]);
    let mut left_ids: Vec<_> = left
        .iter()
        .map(|l| l["request_id"].as_str().unwrap_or("").to_string())
        .collect();
    left_ids.sort();
    let mut expected: Vec<_> = letters[1..]
        .iter()
        .map(|l| l["request_id"].as_str().unwrap_or("").to_string())
        .collect();
    expected.sort();
    assert_eq!(left_ids, expected);

    for topic in [&request_topic, &dead_letter_topic, &inspect_topic] {
        let _ = broker.delete_topic(topic).await;
    }
    let _ = broker.close().await;
}
