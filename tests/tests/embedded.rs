//! The whole system on the embedded broker: the README's main command, bad inputs, and
//! the server's delivery guarantees, with no external service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use classifier_proto::{attributes, ErrorCode, Outcome, ProstMessage};
use classifier_server::{load_classifier, ModelServer, ServerConfig};
use client_app::job::{run_job, FileOutcome, JobOptions, NoProgress};
use integration_tests::intercept::{Hooks, Intercepted};
use integration_tests::{
    assert_errors_reported, copy_examples, next_delivery, next_reply, parse_summary, run_client,
    run_client_within, top_class, workspace_root, write_bad_inputs, write_size_probes,
};
use tokio_util::sync::CancellationToken;
use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
use unified_broker::{Broker, BrokerError, Message, SubscribeOptions, Subscriber};

/// Checks that a client run exited 0 with all `files` classified and no error; returns its
/// summary and stdout.
fn assert_every_file_classified(
    output: &std::process::Output,
    files: usize,
) -> (integration_tests::Summary, String) {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = parse_summary(&stdout);
    assert_eq!(
        (summary.files, summary.classified, summary.errors),
        (files, files, 0),
        "{stdout}"
    );
    (summary, stdout)
}

/// The README's first command: every example classified, accuracy ≥ 85%, exit 0.
#[test]
fn main_command_classifies_every_example() {
    let work = tempfile::tempdir().expect("tempdir");
    let results = work.path().join("results.csv");
    let output = run_client(
        &[
            "classify",
            "examples",
            "--output",
            &results.to_string_lossy(),
        ],
        &[],
    );
    let (summary, stdout) = assert_every_file_classified(&output, 200);
    let accuracy = summary
        .accuracy_percent
        .expect("accuracy printed for class folders");
    assert!(accuracy >= 85.0, "accuracy {accuracy}%\n{stdout}");
    assert!(stdout.contains("confusion matrix"), "{stdout}");
    let csv = std::fs::read_to_string(&results).expect("results file");
    assert_eq!(csv.lines().count(), 201, "header + one row per image");
}

/// On a machine of one core the async runtime has one worker thread: the client (and the
/// server inside it) must still answer every file and exit, not wait on itself.
#[test]
fn a_runtime_of_one_worker_thread_finishes_the_job() {
    let env = [("TOKIO_WORKER_THREADS".to_string(), "1".to_string())];
    let output = run_client_within(
        &["classify", "examples", "--quiet"],
        &env,
        Duration::from_secs(120),
    )
    .expect("client-app exits within 120 s with one runtime worker thread");
    assert_every_file_classified(&output, 200);
}

/// The embedded broker's configured size limit, end to end: a file just under it is
/// classified, one just over is `FILE_TOO_LARGE` naming the limit, `--max-bytes` lowers
/// the limit further, and `--resize-to` sends both.
#[test]
fn embedded_size_limit_is_answered_and_configurable() {
    let work = tempfile::tempdir().expect("tempdir");
    let limit = 1_000_000;
    let config = work.path().join("small-messages.toml");
    std::fs::write(
        &config,
        format!("[broker]\nbackend = \"embedded\"\nmax_message_bytes = {limit}\n"),
    )
    .expect("write config");
    let folder = work.path().join("probes");
    write_size_probes(&folder, limit);
    let env = [(
        "CLASSIFIER_CONFIG".to_string(),
        config.to_string_lossy().into_owned(),
    )];
    let folder_arg = folder.to_string_lossy().into_owned();
    let run = |extra: &[&str]| {
        let mut args = vec!["classify", folder_arg.as_str()];
        args.extend_from_slice(extra);
        let output = run_client(&args, &env);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.code(), parse_summary(&stdout), stdout)
    };
    let line_of = |stdout: &str, name: &str| -> String {
        stdout
            .lines()
            .find(|line| line.contains(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{stdout}"))
            .to_string()
    };

    let (code, summary, stdout) = run(&[]);
    assert_eq!(code, Some(2), "{stdout}");
    assert_eq!((summary.classified, summary.errors), (1, 1), "{stdout}");
    let over = line_of(&stdout, "over.png");
    assert!(
        over.contains("FILE_TOO_LARGE") && over.contains(&limit.to_string()),
        "{over}"
    );

    let (_, summary, stdout) = run(&["--max-bytes", "500000"]);
    assert_eq!((summary.classified, summary.errors), (0, 2), "{stdout}");
    assert!(line_of(&stdout, "under.png").contains("500000"), "{stdout}");

    let (code, summary, stdout) = run(&["--resize-to", "64"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(summary.classified, 2, "{stdout}");
}

/// Good images, a text file, a zero-byte PNG, a truncated JPEG and a PNG claiming
/// 100000×100000 pixels: all answered, each bad one with its reason, exit status 2.
#[test]
fn mixed_folder_is_fully_answered_with_reasons() {
    let work = tempfile::tempdir().expect("tempdir");
    let folder = work.path().join("mixed");
    let good = copy_examples(&folder, 2);
    let bad = write_bad_inputs(&folder);
    let output = run_client(&["classify", &folder.to_string_lossy()], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    let summary = parse_summary(&stdout);
    assert_eq!(summary.files, good + bad.len(), "{stdout}");
    assert_eq!(summary.classified, good, "{stdout}");
    assert_eq!(summary.errors, bad.len(), "{stdout}");
    assert_eq!(summary.unanswered, 0, "{stdout}");
    assert_errors_reported(&stdout, &bad);
}

/// A missing path is a clear error and exit status 1, not a panic.
#[test]
fn missing_path_is_a_clear_error() {
    let output = run_client(&["classify", "no/such/folder"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no/such/folder"), "{stderr}");
}

fn server_config(topic: &str) -> ServerConfig {
    ServerConfig {
        model_dir: Some(workspace_root().join("models/fashion-mnist")),
        request_topic: topic.to_string(),
        ..ServerConfig::default()
    }
}

/// Hooks that fail the first `failures_left` publishes to reply topics, to prove the
/// server retries replies and acks requests only afterwards.
struct FlakyReplies {
    failures_left: AtomicUsize,
    attempts: AtomicUsize,
}

impl Hooks for FlakyReplies {
    fn before_publish(&self, topic: &str, _messages: &[Message]) -> unified_broker::Result<()> {
        if topic.starts_with("classify-replies-flaky") {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let left = self.failures_left.load(Ordering::SeqCst);
            if left > 0 {
                self.failures_left.store(left - 1, Ordering::SeqCst);
                return Err(BrokerError::Unavailable("injected failure".into()));
            }
        }
        Ok(())
    }
}

/// A subscriber of the test's own group on `reply_topic`, created with its topic.
async fn reply_reader(broker: &dyn Broker, reply_topic: &str) -> Box<dyn Subscriber> {
    broker
        .ensure_topic_and_subscription(reply_topic, "me")
        .await
        .expect("reply topic and subscription");
    broker
        .subscribe(reply_topic, "me", SubscribeOptions::default())
        .await
        .expect("subscribe to replies")
}

/// Publishing a reply fails three times: the server retries, the reply arrives once, and
/// only then is the request acked (until then a second group member could not have
/// "lost" it: it stays unacked in the group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_publish_failures_are_retried_and_ack_waits_for_the_reply() {
    let embedded = EmbeddedBroker::new(EmbeddedConfig {
        max_backlog_per_group: 1,
        ..EmbeddedConfig::default()
    });
    let flaky = Arc::new(Intercepted {
        inner: Arc::new(embedded.new_client()),
        hooks: FlakyReplies {
            failures_left: AtomicUsize::new(3),
            attempts: AtomicUsize::new(0),
        },
    });
    let config = server_config("requests-flaky");
    let classifier = load_classifier(&config).expect("shipped model loads");
    let server = ModelServer::new(flaky.clone(), config.clone(), classifier);
    let stats = server.stats();
    server.prepare_topics().await.expect("topics");
    let stop = CancellationToken::new();
    let running = tokio::spawn(server.run(stop.clone()));

    let client = embedded.new_client();
    let mut replies = reply_reader(&client, "classify-replies-flaky").await;
    let image = std::fs::read(
        workspace_root()
            .join("examples/trouser")
            .read_dir()
            .expect("dir")
            .next()
            .expect("file")
            .expect("entry")
            .path(),
    )
    .expect("png");
    let request = classifier_proto::ClassifyRequest {
        request_id: "req-1".into(),
        reply_topic: "classify-replies-flaky".into(),
        image,
        ..Default::default()
    };
    client
        .publish("requests-flaky", Message::new(request.encode_to_vec()))
        .await
        .expect("publish");
    // The group holds at most one message (backlog 1): a second publish can only
    // complete once the first request was acked, i.e. after its reply got out.
    let second = classifier_proto::ClassifyRequest {
        request_id: "req-2".into(),
        reply_topic: "classify-replies-flaky".into(),
        image: request.image.clone(),
        ..Default::default()
    };
    let second_publish = tokio::spawn({
        let client = embedded.new_client();
        async move {
            client
                .publish("requests-flaky", Message::new(second.encode_to_vec()))
                .await
        }
    });
    let first = next_reply(&mut *replies).await;
    assert_eq!(first.request_id, "req-1");
    assert!(
        flaky.hooks.attempts.load(Ordering::SeqCst) >= 4,
        "three failures then success"
    );
    tokio::time::timeout(Duration::from_secs(30), second_publish)
        .await
        .expect("second publish completes once the first request is acked")
        .expect("task")
        .expect("publish");
    let second = next_reply(&mut *replies).await;
    assert_eq!(second.request_id, "req-2");
    assert_eq!(top_class(&second), "Trouser");
    stop.cancel();
    let final_stats = running.await.expect("task").expect("server ran");
    assert_eq!(final_stats.publish_retries, 3);
    assert_eq!(final_stats.classified, 2);
    assert_eq!(stats.snapshot().received, 2);
}

/// A backlog of 300 requests whose deadline passed, then 5 live ones, waiting for a
/// server: the expired ones are answered `DEADLINE_EXCEEDED` without inference (the
/// model ran 5 requests) and none is dead-lettered; the live ones get predictions.
/// (`cross_process::expired_requests_cost_no_inference` does this with 2,000 on the
/// networked brokers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_are_answered_without_inference() {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
    let config = server_config("requests-deadlines");
    let classifier = load_classifier(&config).expect("model");
    let server = ModelServer::new(broker.clone(), config, classifier);
    server.prepare_topics().await.expect("topics");
    let mut replies = reply_reader(&*broker, "classify-replies-deadlines").await;
    let image = std::fs::read(workspace_root().join("examples/sneaker/00009.png")).expect("png");
    let now = classifier_proto::unix_micros_now();
    let requests = (0..300)
        .map(|i| (format!("expired-{i}"), now - 10_000_000))
        .chain((0..5).map(|i| (format!("live-{i}"), now + 120_000_000)))
        .map(|(id, deadline_unix_micros)| {
            let request = classifier_proto::ClassifyRequest {
                request_id: id,
                reply_topic: "classify-replies-deadlines".into(),
                image: image.clone(),
                deadline_unix_micros,
                ..Default::default()
            };
            Message::new(request.encode_to_vec())
        })
        .collect();
    broker
        .publish_batch("requests-deadlines", requests)
        .await
        .expect("publish the backlog");

    let stats = server.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(server.run(stop.clone()));
    let mut codes: HashMap<String, usize> = HashMap::new();
    for _ in 0..305 {
        let reply = next_reply(&mut *replies).await;
        let code = match reply.outcome {
            Some(Outcome::Predictions(_)) => "predictions".to_string(),
            Some(Outcome::Error(error)) => ErrorCode::try_from(error.code)
                .map(|c| c.as_str_name().to_string())
                .unwrap_or_default(),
            None => "none".to_string(),
        };
        let expected = if reply.request_id.starts_with("live-") {
            "predictions"
        } else {
            "DEADLINE_EXCEEDED"
        };
        assert_eq!(code, expected, "{}", reply.request_id);
        *codes.entry(code).or_default() += 1;
    }
    assert_eq!(codes["DEADLINE_EXCEEDED"], 300);
    assert_eq!(codes["predictions"], 5);
    stop.cancel();
    let final_stats = running.await.expect("task").expect("server ran");
    assert_eq!(
        final_stats.classified, 5,
        "only the live requests were classified"
    );
    assert_eq!(final_stats.rejected, 300);
    assert_eq!(
        final_stats.dead_lettered, 0,
        "expired requests are not dead-lettered"
    );
    assert!(
        stats
            .render_prometheus()
            .contains("classifier_requests_rejected_total{code=\"DEADLINE_EXCEEDED\"} 300"),
        "{}",
        stats.render_prometheus()
    );
}

/// Scaling from zero, in one process: the backlog exporter (`classifier-server
/// backlog-exporter`'s library part, on the embedded broker that only this process can
/// reach) reports 40 requests waiting with no server running and says they are not
/// draining; a server started then answers them and the gauge falls to 0, with a drain
/// time of 0, on the exporter and in the server's own metrics.
/// (`cross_process::the_exporter_reports_the_backlog_servers_drain` runs the binary on
/// the networked brokers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_exporter_reports_what_waits_and_a_server_drains_it() {
    use classifier_server::backlog::exporter::BacklogExporter;
    use classifier_server::backlog::NOT_DRAINING_SECONDS;
    use classifier_server::telemetry::{self, MetricsSource};
    use integration_tests::cross_process::metric;

    const REQUESTS: usize = 40;
    let embedded = EmbeddedBroker::new(EmbeddedConfig::default());
    let mut config = server_config("requests-backlog");
    config.backlog_poll_secs = 1;
    let exporter = Arc::new(BacklogExporter::new());
    let stop = CancellationToken::new();
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let tokens = classifier_server::bearer::BearerTokens::default();
    let (addr, http) = telemetry::serve(any_port, exporter.clone(), tokens, stop.clone())
        .await
        .expect("the exporter's endpoint");
    let exporting = tokio::spawn({
        let (exporter, stop) = (Arc::clone(&exporter), stop.clone());
        let broker: Arc<dyn Broker> = Arc::new(embedded.new_client());
        let every = std::time::Duration::from_millis(100);
        async move {
            let group = ("requests-backlog", "classifier-server");
            exporter.export(broker, group, every, &stop).await
        }
    });
    let series = "{group=\"classifier-server\",topic=\"requests-backlog\"}";
    let scraped = |messages: f64, drain: f64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, text) = telemetry::probe(addr, "/metrics").await.expect("scrape");
            assert_eq!(status, 200, "{text}");
            let value = |name: &str| metric(&text, &format!("{name}{series}"));
            let shown = (
                value("classifier_backlog_messages"),
                value("classifier_backlog_drain_seconds"),
            );
            if shown == (Some(messages), Some(drain)) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{shown:?}:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let client = embedded.new_client();
    let mut replies = reply_reader(&client, "classify-replies-backlog").await;
    scraped(0.0, 0.0).await;
    assert_eq!(exporter.ready(), Ok(()), "the broker answered the exporter");
    let requests =
        integration_tests::example_requests("backlog", REQUESTS, "classify-replies-backlog");
    client
        .publish_batch("requests-backlog", requests)
        .await
        .expect("publish the burst");
    scraped(REQUESTS as f64, NOT_DRAINING_SECONDS).await;

    let classifier = load_classifier(&config).expect("model");
    let server = ModelServer::new(Arc::new(embedded.new_client()), config, classifier);
    let stats = server.stats();
    let running = tokio::spawn(server.run(stop.clone()));
    for _ in 0..REQUESTS {
        next_reply(&mut *replies).await;
    }
    scraped(0.0, 0.0).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !stats
        .render_prometheus()
        .contains(&format!("classifier_backlog_messages{series} 0"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            stats.render_prometheus()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.expect("task").expect("server ran");
    exporting.await.expect("task").expect("exporter ran");
    http.await.expect("the endpoint stops");
}

/// W3C trace context from a job through the server and back, on the embedded broker
/// (the networked brokers run the same case from their test files).
#[test]
fn trace_context_crosses_the_broker() {
    integration_tests::traces::trace_context_crosses_the_broker(&[(
        "CLASSIFIER_BROKER".into(),
        "embedded".into(),
    )]);
}

/// Garbage payloads: with routing attributes they get a MALFORMED_REQUEST reply; without
/// any they are acked (logged) and do not block the requests behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_error_replies_and_never_block_the_stream() {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
    let config = server_config("requests-malformed");
    let classifier = load_classifier(&config).expect("model");
    let server = ModelServer::new(broker.clone(), config, classifier);
    server.prepare_topics().await.expect("topics");
    let stop = CancellationToken::new();
    let running = tokio::spawn(server.run(stop.clone()));
    let mut replies = reply_reader(&*broker, "classify-replies-malformed").await;

    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    broker
        .publish("requests-malformed", Message::new(garbage.clone()))
        .await
        .expect("publish");
    let routed = Message::new(garbage)
        .with_attribute(attributes::REQUEST_ID, "bad-1")
        .with_attribute(attributes::REPLY_TOPIC, "classify-replies-malformed");
    broker
        .publish("requests-malformed", routed)
        .await
        .expect("publish");
    let response = next_reply(&mut *replies).await;
    assert_eq!(response.request_id, "bad-1");
    match response.outcome {
        Some(Outcome::Error(error)) => {
            assert_eq!(error.code, ErrorCode::MalformedRequest as i32);
            assert!(
                error.reason.contains("not a valid ClassifyRequest"),
                "{}",
                error.reason
            );
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    // Both are copied, byte for byte, to the dead-letter topic with the reason.
    let mut dead = broker
        .subscribe(
            "classify-dead-letter",
            "dead-letter-inspection",
            SubscribeOptions::default(),
        )
        .await
        .expect("dead-letter subscription");
    // The one without a route is UNROUTABLE (nobody to answer), the other malformed.
    let mut codes = Vec::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut *dead, Duration::from_secs(30), "dead letter").await;
        let message = delivery.message();
        assert_eq!(message.payload.as_ref(), [0xff, 0xff, 0xff, 0xff, 0x0f]);
        codes.push(message.attribute("dead-letter-code").map(str::to_string));
        assert_eq!(
            message.attribute("dead-letter-source-topic"),
            Some("requests-malformed")
        );
        assert!(message
            .attribute("dead-letter-reason")
            .is_some_and(|r| !r.is_empty()));
        delivery.ack().expect("ack");
    }
    codes.sort();
    assert_eq!(
        codes,
        [
            Some("MALFORMED_REQUEST".to_string()),
            Some("UNROUTABLE".to_string())
        ]
    );
    stop.cancel();
    let stats = running.await.expect("task").expect("server");
    assert_eq!(stats.received, 2);
    assert_eq!(
        stats.unanswerable, 1,
        "the unroutable one was acked, not stuck"
    );
    assert_eq!(stats.rejected, 2);
    assert_eq!(stats.dead_lettered, 2);
}

/// With no server, a job ends after its reply timeout and reports every file as
/// unanswered, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_without_server_reports_unanswered_after_timeout() {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
    let work = tempfile::tempdir().expect("tempdir");
    copy_examples(work.path(), 1);
    let files = client_app::inputs::collect_inputs(&[work.path().to_path_buf()]).expect("inputs");
    let options = JobOptions {
        request_topic: "requests-nobody".into(),
        server_group: "servers".into(),
        window: 4,
        max_in_flight_bytes: 1 << 20,
        reply_timeout: Duration::from_millis(500),
        max_file_bytes: 1 << 20,
        max_request_bytes: None,
        resize_to: None,
        top_k: 1,
        model_name: String::new(),
    };
    let report = run_job(broker, files, &options, &NoProgress)
        .await
        .expect("job");
    assert_eq!(report.results.len(), 10);
    assert!(report
        .results
        .iter()
        .all(|r| r.outcome == FileOutcome::Unanswered));
    let sent: HashMap<_, _> = report
        .results
        .iter()
        .filter(|r| !r.request_id.is_empty())
        .map(|r| (r.request_id.clone(), ()))
        .collect();
    assert_eq!(
        sent.len(),
        4,
        "only a window's worth was sent before the timeout"
    );
}

/// Writes `per_class` 64×64 RGB images into `dir/<colour>/`: dark noise with a square of
/// the class's colour at a varying place and size (only colour tells the classes apart).
fn write_colour_folder(dir: &std::path::Path, per_class: u32) {
    let colours = [
        ("blue", [40u8, 60, 230]),
        ("green", [40, 210, 60]),
        ("red", [230, 40, 40]),
    ];
    for (class, rgb) in colours {
        let folder = dir.join(class);
        std::fs::create_dir_all(&folder).expect("mkdir");
        for i in 0..per_class {
            let side = 16 + (i * 7) % 24;
            let (x0, y0) = ((i * 13) % (64 - side), (i * 29) % (64 - side));
            let img = image::RgbImage::from_fn(64, 64, |x, y| {
                let inside = (x0..x0 + side).contains(&x) && (y0..y0 + side).contains(&y);
                if inside {
                    image::Rgb(rgb)
                } else {
                    let n = ((x * 31 + y * 17 + i * 7) % 40) as u8;
                    image::Rgb([n, n, n])
                }
            });
            img.save(folder.join(format!("{i:03}.png")))
                .expect("write png");
        }
    }
}

/// Runs the workspace's `trainer` binary from the workspace root.
fn run_trainer(args: &[&str]) -> std::process::Output {
    std::process::Command::new(integration_tests::binary("trainer"))
        .args(args)
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("trainer runs")
}

/// An RGB folder of 64×64 images, end to end: `trainer train --channels 3 --image-size 64`
/// writes a model, `trainer evaluate --image-folder` reports it class by class, and the
/// client classifies the folder with it over the embedded broker.
#[test]
fn rgb_model_trains_and_serves_over_the_embedded_broker() {
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("colours");
    let model = work.path().join("model");
    write_colour_folder(&data, 16);
    let (data_arg, model_arg) = (data.to_string_lossy(), model.to_string_lossy());
    let trained = run_trainer(&[
        "train",
        "--image-folder",
        &data_arg,
        "--channels",
        "3",
        "--image-size",
        "64",
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--name",
        "colours",
        "--output",
        &model_arg,
    ]);
    let stdout = String::from_utf8_lossy(&trained.stdout);
    assert!(
        trained.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    assert!(stdout.contains("confusion matrix"), "{stdout}");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("metadata.json")).expect("metadata written"),
    )
    .expect("metadata is JSON");
    assert_eq!(meta["input_channels"], 3);
    assert_eq!(meta["input_width"], 64);
    assert_eq!(meta["augment"], "shift(1px)", "the default augmentation");

    let evaluated = run_trainer(&[
        "evaluate",
        "--model",
        &model_arg,
        "--image-folder",
        &data_arg,
    ]);
    let report = String::from_utf8_lossy(&evaluated.stdout);
    assert!(evaluated.status.success(), "{report}");
    assert!(report.contains("of 48 images"), "{report}");
    for class in ["blue", "green", "red"] {
        assert!(report.contains(class), "{class} missing from\n{report}");
    }

    let results = work.path().join("results.jsonl");
    let output = run_client(
        &[
            "classify",
            &data_arg,
            "--model",
            &model_arg,
            "--output",
            &results.to_string_lossy(),
        ],
        &[],
    );
    let (summary, stdout) = assert_every_file_classified(&output, 48);
    let accuracy = summary.accuracy_percent.expect("accuracy printed");
    assert!(accuracy >= 90.0, "accuracy {accuracy}%\n{stdout}");
    let lines = std::fs::read_to_string(&results).expect("results written");
    assert_eq!(lines.lines().count(), 48);
    // Only the colour model has these classes: the shipped model would answer garments.
    assert!(
        lines.contains("\"predicted_class\":\"blue\""),
        "replies come from the colour model: {lines}"
    );
}
