//! Replies reach only the job that asked (issue 28, item 2): a peer that can see a
//! job's reply topic, or even read its requests, cannot slip its own answers into the
//! job's results.

use std::sync::Arc;
use std::time::Duration;

use classifier_proto::{Outcome, ProstMessage};
use classifier_server::{load_classifier, ModelServer, ServerConfig};
use client_app::job::{run_job, FileOutcome, JobOptions, NoProgress};
use integration_tests::intercept::{Hooks, Intercepted};
use integration_tests::{copy_examples, workspace_root};
use tokio_util::sync::CancellationToken;
use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
use unified_broker::{Broker, Message};

/// The shipped model's server config, consuming `topic`.
fn server_config(topic: &str) -> ServerConfig {
    ServerConfig {
        model_dir: Some(workspace_root().join("models/fashion-mnist")),
        request_topic: topic.to_string(),
        ..ServerConfig::default()
    }
}

/// Hooks that tell a test what a peer on the network could learn: the reply topics a
/// client subscribes to (a topic listing shows them) and the requests it publishes
/// (anyone who may read the request topic sees them).
struct Spy {
    request_topic: String,
    reply_topics: tokio::sync::mpsc::UnboundedSender<String>,
    requests: std::sync::Mutex<Vec<classifier_proto::ClassifyRequest>>,
}

impl Spy {
    /// The requests published so far.
    fn requests(&self) -> Vec<classifier_proto::ClassifyRequest> {
        classifier_app::lock(&self.requests).clone()
    }
}

impl Hooks for Spy {
    fn before_publish(&self, topic: &str, messages: &[Message]) -> unified_broker::Result<()> {
        if topic == self.request_topic {
            let decoded = messages.iter().filter_map(|message| {
                classifier_proto::ClassifyRequest::decode(message.payload.as_ref()).ok()
            });
            classifier_app::lock(&self.requests).extend(decoded);
        }
        Ok(())
    }

    fn before_subscribe(&self, topic: &str) {
        if topic.starts_with("classify-replies-") {
            let _ = self.reply_topics.send(topic.to_string());
        }
    }
}

/// A forged reply: predictions of a class no model has, from a server that is not one.
fn forged_reply(request_id: &str, job_id: &str) -> Message {
    let response = classifier_proto::ClassifyResponse {
        request_id: request_id.to_string(),
        job_id: job_id.to_string(),
        server_id: "forger".into(),
        outcome: Some(Outcome::Predictions(classifier_proto::Predictions {
            top_k: vec![classifier_proto::Prediction {
                class_name: "Forged".into(),
                class_index: 0,
                probability: 1.0,
            }],
            model_name: "forged".into(),
            model_version: "0".into(),
        })),
        ..Default::default()
    };
    Message::new(response.encode_to_vec())
}

/// Waits (at most 30 s) until `spy` saw `count` requests published.
async fn wait_for_requests(spy: &Spy, count: usize) -> Vec<classifier_proto::ClassifyRequest> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let requests = spy.requests();
        if requests.len() >= count {
            return requests;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} requests were published",
            requests.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 28, item 2: while a job waits for its replies, a peer that saw its reply topic
/// publishes forged replies there: with request ids guessed the way ids used to be made
/// (`<first 12 of job id>-<index>`), with random ids, and with the job's real request
/// ids (read from the request topic) but another job's id. None of them may become a
/// result: every file is answered by the real server, and the forged replies are
/// counted as rejected (not as duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replies_are_rejected_and_never_become_results() {
    let embedded = EmbeddedBroker::new(EmbeddedConfig::default());
    let request_topic = "requests-forged";
    let (reply_topics, mut reply_topic_rx) = tokio::sync::mpsc::unbounded_channel();
    let spy = Arc::new(Intercepted {
        inner: Arc::new(embedded.new_client()),
        hooks: Spy {
            request_topic: request_topic.to_string(),
            reply_topics,
            requests: std::sync::Mutex::default(),
        },
    });
    let work = tempfile::tempdir().expect("tempdir");
    let count = copy_examples(work.path(), 2);
    let files = client_app::inputs::collect_inputs(&[work.path().to_path_buf()]).expect("inputs");
    let config = server_config(request_topic);
    let options = JobOptions {
        request_topic: request_topic.into(),
        server_group: config.group.clone(),
        window: 64,
        max_in_flight_bytes: 1 << 20,
        reply_timeout: Duration::from_secs(60),
        max_file_bytes: 1 << 20,
        max_request_bytes: None,
        resize_to: None,
        top_k: 1,
        model_name: String::new(),
    };
    let job = tokio::spawn({
        let broker: Arc<dyn Broker> = spy.clone();
        async move { run_job(broker, files, &options, &NoProgress).await }
    });

    // No server runs yet: every request waits, and the forged replies come first.
    let reply_topic = tokio::time::timeout(Duration::from_secs(30), reply_topic_rx.recv())
        .await
        .expect("the job subscribes to its reply topic")
        .expect("a reply topic");
    let job_id = reply_topic
        .strip_prefix("classify-replies-")
        .expect("the client's reply topic shape")
        .to_string();
    let requests = wait_for_requests(&spy.hooks, count).await;
    let forger = embedded.new_client();
    let mut forged = Vec::new();
    for index in 0..count {
        let guessed = format!("{}-{index}", &job_id[..12.min(job_id.len())]);
        forged.push(forged_reply(&guessed, &job_id));
    }
    for _ in 0..5 {
        let random = uuid::Uuid::new_v4().simple().to_string();
        forged.push(forged_reply(&random, &job_id));
    }
    for request in &requests {
        forged.push(forged_reply(&request.request_id, "another-job"));
    }
    forged.push(Message::new(vec![0xff, 0xff, 0x0f])); // not a ClassifyResponse at all
    let forged_count = forged.len();
    forger
        .publish_batch(&reply_topic, forged)
        .await
        .expect("the peer publishes to the reply topic");

    let classifier = load_classifier(&config).expect("shipped model loads");
    let server = ModelServer::new(Arc::new(embedded.new_client()), config, classifier);
    server.prepare_topics().await.expect("topics");
    let stop = CancellationToken::new();
    let running = tokio::spawn(server.run(stop.clone()));
    let report = job.await.expect("job task").expect("job");
    stop.cancel();
    running.await.expect("server task").expect("server ran");

    assert_eq!(report.results.len(), count);
    for result in &report.results {
        match &result.outcome {
            FileOutcome::Classified { top_k, model, .. } => {
                assert_ne!(top_k[0].class_name, "Forged", "{result:?}");
                assert_ne!(model, "forged", "{result:?}");
                assert_ne!(result.server_id, "forger", "{result:?}");
            }
            other => panic!("{}: {other:?}", result.input.display_name),
        }
    }
    assert_eq!(report.duplicate_replies, 0);
    assert_eq!(report.rejected_replies, forged_count as u64);
}
