//! End-to-end cases with `classifier-server` and `client-app` as separate processes,
//! run against a real broker. Each backend's test file supplies the environment that
//! selects it (`CLASSIFIER_BROKER` plus the broker's address) and calls these cases.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{copy_examples, parse_summary, run_client, write_bad_inputs, ServerProcess, Summary};

/// Environment for one case: the backend's variables plus a request topic and group of
/// its own, so cases never see each other's requests.
pub fn case_env(backend_env: &[(String, String)], case: &str) -> Vec<(String, String)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut env = backend_env.to_vec();
    env.push((
        "CLASSIFIER_REQUEST_TOPIC".into(),
        format!("e2e-{case}-{}", &id[..10]),
    ));
    env.push(("CLASSIFIER_GROUP".into(), format!("servers-{}", &id[..10])));
    env
}

/// The backend environment from the variables the test script sets, or `None` (with a
/// loud message) when the broker is not running and `REQUIRE_BROKERS` is not set.
pub fn backend_env(backend: &str, address_var: &str) -> Option<Vec<(String, String)>> {
    match std::env::var(address_var) {
        Ok(address) => Some(vec![
            ("CLASSIFIER_BROKER".into(), backend.into()),
            (address_var.into(), address),
        ]),
        Err(_) if std::env::var_os("REQUIRE_BROKERS").is_some() => {
            panic!("{address_var} is not set but REQUIRE_BROKERS is: start the broker (scripts/test.sh does)")
        }
        Err(_) => {
            eprintln!(
                "SKIPPED: {address_var} not set, so the {backend} end-to-end tests cannot run"
            );
            None
        }
    }
}

fn client_output(args: &[&str], env: &[(String, String)]) -> (i32, String, Summary) {
    let output = run_client(args, env);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code().unwrap_or(-1);
    assert!(
        stdout.contains("Summary"),
        "client printed no summary (exit {code})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (code, stdout.clone(), parse_summary(&stdout))
}

fn server_ids_in(results: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(results).expect("results file");
    let mut ids = BTreeMap::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("json line");
        if let Some(id) = row["server_id"].as_str().filter(|s| !s.is_empty()) {
            *ids.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    ids
}

fn stop(server: ServerProcess) {
    let id = server.id.clone();
    let status = server
        .terminate(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("server {id} did not exit within 60 s of SIGTERM"));
    assert!(
        status.success(),
        "server {id} exited with {status} after SIGTERM"
    );
}

/// One server process classifies every example image; the client reports ≥ 85%
/// accuracy and exits 0; the server exits 0 on SIGTERM.
pub fn one_server_classifies_examples(backend_env: &[(String, String)]) {
    let env = case_env(backend_env, "one");
    let work = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start("server-one", &env, &work.path().join("server.log"));
    let (code, stdout, summary) = client_output(
        &["classify", "examples", "--quiet", "--timeout", "90"],
        &env,
    );
    let log = std::fs::read_to_string(work.path().join("server.log")).unwrap_or_default();
    assert_eq!(code, 0, "client exit status\n{stdout}\nserver log:\n{log}");
    assert_eq!((summary.files, summary.classified), (200, 200), "{stdout}");
    assert!(summary.accuracy_percent.unwrap_or(0.0) >= 85.0, "{stdout}");
    stop(server);
}

/// Bad files over a real broker: each answered with its reason, good ones classified,
/// exit status 2.
pub fn bad_inputs_are_answered(backend_env: &[(String, String)]) {
    let env = case_env(backend_env, "bad");
    let work = tempfile::tempdir().expect("tempdir");
    let folder = work.path().join("mixed");
    let good = copy_examples(&folder, 1);
    let bad = write_bad_inputs(&folder);
    let server = ServerProcess::start("server-bad", &env, &work.path().join("server.log"));
    let results = work.path().join("results.jsonl");
    let folder_arg = folder.to_string_lossy().into_owned();
    let results_arg = results.to_string_lossy().into_owned();
    let (code, stdout, summary) = client_output(
        &[
            "classify",
            &folder_arg,
            "--timeout",
            "90",
            "--output",
            &results_arg,
        ],
        &env,
    );
    assert_eq!(code, 2, "{stdout}");
    assert_eq!(summary.classified, good, "{stdout}");
    assert_eq!(summary.errors, bad.len(), "{stdout}");
    assert_eq!(summary.unanswered, 0, "{stdout}");
    for (name, code) in bad {
        let line = stdout
            .lines()
            .find(|l| l.contains(name) && l.contains('✗'))
            .unwrap_or_else(|| panic!("no error line for {name}:\n{stdout}"));
        assert!(line.contains(code), "{name} should be {code}: {line}");
    }
    stop(server);
}

/// Two server processes in one group: over repeated runs both answer requests, and in
/// every run every image is answered exactly once as far as the user sees.
pub fn two_servers_share_the_work(backend_env: &[(String, String)]) {
    let env = case_env(backend_env, "two");
    let work = tempfile::tempdir().expect("tempdir");
    let first = ServerProcess::start("server-a", &env, &work.path().join("a.log"));
    let second = ServerProcess::start("server-b", &env, &work.path().join("b.log"));
    let mut seen: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut runs = 0;
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "after {runs} runs only {seen:?} answered"
        );
        runs += 1;
        let results = work.path().join(format!("run{runs}.jsonl"));
        let results_arg = results.to_string_lossy().into_owned();
        let (code, stdout, summary) = client_output(
            &[
                "classify",
                "examples",
                "--quiet",
                "--timeout",
                "90",
                "--output",
                &results_arg,
            ],
            &env,
        );
        assert_eq!(code, 0, "{stdout}");
        assert_eq!((summary.files, summary.classified), (200, 200), "{stdout}");
        let by_server = server_ids_in(&results);
        assert_eq!(
            by_server.values().sum::<usize>(),
            200,
            "one result per image"
        );
        seen.extend(by_server.into_keys());
    }
    assert_eq!(
        seen,
        HashSet::from(["server-a".to_string(), "server-b".to_string()])
    );
    stop(first);
    stop(second);
}

/// With no server running, the client gives up after its timeout, lists what went
/// unanswered and exits 3.
pub fn no_server_means_unanswered_after_timeout(backend_env: &[(String, String)]) {
    let env = case_env(backend_env, "none");
    let work = tempfile::tempdir().expect("tempdir");
    let folder = work.path().join("few");
    let copied = copy_examples(&folder, 1);
    let folder_arg = folder.to_string_lossy().into_owned();
    let (code, stdout, summary) = client_output(&["classify", &folder_arg, "--timeout", "5"], &env);
    assert_eq!(code, 3, "{stdout}");
    assert_eq!(summary.unanswered, copied, "{stdout}");
    assert!(stdout.contains("UNANSWERED"), "{stdout}");
}

/// A client run in the background whose per-file lines are counted as they arrive.
struct BackgroundClient {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundClient {
    fn start(args: &[&str], env: &[(String, String)]) -> Self {
        Self::start_with_stderr(args, env, std::process::Stdio::inherit())
    }

    /// Like `start`, with the client's log (stderr, `RUST_LOG=info`) going to `log`.
    fn start_logged(args: &[&str], env: &[(String, String)], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("client log file");
        let mut env = env.to_vec();
        env.push(("RUST_LOG".into(), "info".into()));
        Self::start_with_stderr(args, &env, file.into())
    }

    fn start_with_stderr(
        args: &[&str],
        env: &[(String, String)],
        stderr: std::process::Stdio,
    ) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(crate::binary("client-app"))
            .args(args)
            .current_dir(crate::workspace_root())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("client-app starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("lock").push(line);
            }
        });
        BackgroundClient {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Per-file result lines printed so far.
    fn answered(&self) -> usize {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains("  →  ") || l.contains("  ✗  "))
            .count()
    }

    fn wait_for_answers(&self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.answered() < count {
            assert!(
                Instant::now() < deadline,
                "only {} answers after {timeout:?}",
                self.answered()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the client to exit, at most `timeout` (a hang fails the test).
    fn finish_within(mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().expect("client status").is_none() {
            if Instant::now() >= deadline {
                let answered = self.answered();
                let _ = self.child.kill();
                panic!("the client hung: still running after {timeout:?} ({answered} answers)");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.finish()
    }

    fn finish(mut self) -> (i32, String) {
        let status = self.child.wait().expect("client exits");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stdout = self.lines.lock().expect("lock").join("\n");
        (status.code().unwrap_or(-1), stdout)
    }
}

impl Drop for BackgroundClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies every example `copies` times under distinct names: a big labelled folder.
pub fn many_images(dir: &Path, copies: usize) -> usize {
    let staging = dir.join(".staging");
    let per_copy = copy_examples(&staging, usize::MAX);
    for copy in 0..copies {
        for class in std::fs::read_dir(&staging)
            .expect("staging")
            .filter_map(Result::ok)
        {
            let target = dir.join(class.file_name());
            std::fs::create_dir_all(&target).expect("mkdir");
            for file in std::fs::read_dir(class.path())
                .expect("class")
                .filter_map(Result::ok)
            {
                let name = format!("{copy:03}-{}", file.file_name().to_string_lossy());
                std::fs::copy(file.path(), target.join(name)).expect("copy");
            }
        }
    }
    per_copy * copies
}

/// SIGKILL the only server while requests are in flight, start another: every request
/// still gets a reply (the killed server's unacked requests are redelivered); the client
/// reports how many duplicates it saw.
pub fn server_crash_loses_nothing(backend_env: &[(String, String)]) {
    let env = case_env(backend_env, "crash");
    let work = tempfile::tempdir().expect("tempdir");
    let folder = work.path().join("images");
    let total = many_images(&folder, 10);
    assert!(total >= 2000, "at least 2,000 images ({total})");
    let folder_arg = folder.to_string_lossy().into_owned();
    let first = ServerProcess::start("server-doomed", &env, &work.path().join("doomed.log"));
    let client = BackgroundClient::start(
        &[
            "classify",
            &folder_arg,
            "--timeout",
            "300",
            "--window",
            "100",
        ],
        &env,
    );
    client.wait_for_answers(300, Duration::from_secs(120));
    drop(first); // SIGKILL
    let answered_before_restart = client.answered();
    let second = ServerProcess::start("server-rescue", &env, &work.path().join("rescue.log"));
    let (code, stdout) = client.finish();
    let summary = parse_summary(&stdout);
    eprintln!(
        "crash test: sent {total}, {answered_before_restart} answered before the restart, \
         replies {} + errors {}, unanswered {}, duplicates {}",
        summary.classified, summary.errors, summary.unanswered, summary.duplicates
    );
    assert_eq!(code, 0, "{}", tail(&stdout));
    assert_eq!(summary.files, total);
    assert_eq!(
        summary.classified,
        total,
        "every request answered: {}",
        tail(&stdout)
    );
    assert_eq!(summary.unanswered, 0);
    stop(second);
}

/// SIGTERM the first server mid-run: it finishes what it took and exits 0; a second
/// server answers the rest. Nothing lost, and nothing answered twice (the first server
/// acked everything it answered before leaving).
pub fn graceful_shutdown_hands_over(backend_env: &[(String, String)]) {
    let env = case_env(backend_env, "drain");
    let work = tempfile::tempdir().expect("tempdir");
    let folder = work.path().join("images");
    let total = many_images(&folder, 5);
    let folder_arg = folder.to_string_lossy().into_owned();
    let first = ServerProcess::start("server-leaving", &env, &work.path().join("leaving.log"));
    let client = BackgroundClient::start(
        &[
            "classify",
            &folder_arg,
            "--timeout",
            "300",
            "--window",
            "100",
        ],
        &env,
    );
    client.wait_for_answers(200, Duration::from_secs(120));
    stop(first); // SIGTERM, exit 0 required
    let second = ServerProcess::start("server-staying", &env, &work.path().join("staying.log"));
    let (code, stdout) = client.finish();
    let summary = parse_summary(&stdout);
    assert_eq!(code, 0, "{}", tail(&stdout));
    assert_eq!(summary.classified, total, "{}", tail(&stdout));
    assert_eq!(
        summary.duplicates, 0,
        "the drained server acked all it answered"
    );
    stop(second);
}

/// The value of `name` in a case's environment (panics if the case did not set it).
fn lookup(env: &[(String, String)], name: &str) -> String {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{name} is not in the case's environment"))
}

/// A broker client of this test process, configured from a case's environment the way
/// the server and the client configure theirs.
async fn connect_as_configured(
    env: &[(String, String)],
) -> std::sync::Arc<dyn unified_broker::Broker> {
    let backend = lookup(env, "CLASSIFIER_BROKER");
    let mut config = unified_broker::BrokerConfig::default_for(&backend).expect("backend config");
    config.apply_env(&|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
    unified_broker::connect(&config).await.expect("connect")
}

fn tail(stdout: &str) -> String {
    let lines: Vec<&str> = stdout.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Flood: 20,000 requests wait on the broker while no server runs; then one server
/// starts and works through all of them with bounded memory (its peak RSS is printed
/// and must stay under 1 GiB, far below what holding the backlog would need).
pub fn flood_is_worked_through_with_bounded_memory(backend_env: &[(String, String)]) {
    use classifier_proto::{attributes, ClassifyRequest, ClassifyResponse, ProstMessage};
    use unified_broker::{Message, SubscribeOptions};

    const REQUESTS: usize = 20_000;
    let env = case_env(backend_env, "flood");
    let request_topic = lookup(&env, "CLASSIFIER_REQUEST_TOPIC");
    let group = lookup(&env, "CLASSIFIER_GROUP");
    let reply_topic = format!("{request_topic}-replies");
    let image = std::fs::read(crate::workspace_root().join("examples/bag/00018.png"))
        .expect("example image");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let broker = runtime.block_on(async {
        let broker = connect_as_configured(&env).await;
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
    let work = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let server = ServerProcess::start("server-flood", &env, &work.path().join("flood.log"));
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

/// Waits until the log file at `path` contains `needle` (fails after `timeout`).
fn wait_for_log_line(path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no '{needle}' line in {} within {timeout:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A server started while its broker is unreachable keeps retrying (and says what it
/// waits for) instead of exiting, and still stops cleanly on SIGTERM.
pub fn server_waits_for_an_unreachable_broker(backend_env: &[(String, String)], address_var: &str) {
    let mut env = case_env(backend_env, "outage");
    for (name, value) in env.iter_mut() {
        if name == address_var {
            // Nothing listens on port 9 (discard) on these machines.
            *value = "127.0.0.1:9".to_string();
        }
    }
    let work = tempfile::tempdir().expect("tempdir");
    let log = work.path().join("outage.log");
    let server = ServerProcess::start("server-waiting", &env, &log);
    wait_for_log_line(&log, "waiting for the broker", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    stop(server);
}

/// Poison messages over a real broker: an undecodable payload (with and without a reply
/// topic) and an unsupported image each get an error reply where there is somewhere to
/// send it, and every one of them is copied to the dead-letter topic with its original
/// bytes and the reason. A good request behind them is still classified and not copied.
pub fn poison_messages_are_dead_lettered(backend_env: &[(String, String)]) {
    use classifier_proto::{attributes, ClassifyRequest, ClassifyResponse, Outcome, ProstMessage};
    use classifier_server::server::dead_letter_attributes as dead;
    use unified_broker::{Message, SubscribeOptions};

    let mut env = case_env(backend_env, "poison");
    let request_topic = lookup(&env, "CLASSIFIER_REQUEST_TOPIC");
    let group = lookup(&env, "CLASSIFIER_GROUP");
    let dead_letter_topic = format!("{request_topic}-dead");
    env.push((
        "CLASSIFIER_DEAD_LETTER_TOPIC".into(),
        dead_letter_topic.clone(),
    ));
    let reply_topic = format!("{request_topic}-replies");
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
        let broker = connect_as_configured(&env).await;
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

    let work = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start("server-poison", &env, &work.path().join("poison.log"));
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
            ("unroutable", "MALFORMED_REQUEST"),
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

/// Broker outages, on a broker of the test's own:
///
/// 1. a server and a client started while the broker is down both wait for it, saying
///    so in their logs, instead of failing;
/// 2. the broker comes up and the client's 5,000 images flow;
/// 3. mid-run the broker is stopped and started again, losing everything it held (both
///    Tansu and the emulator keep topics and messages in memory only);
/// 4. server and client carry on: they re-create the topics and subscriptions, the
///    client sends again what the broker lost, and every image is answered (replies to
///    both copies of a request count as duplicates); the client never hangs;
/// 5. a second job afterwards is answered in full, and the server still exits 0 on
///    SIGTERM.
pub fn broker_restart_mid_run(backend_env: &[(String, String)], address_var: &str) {
    let backend = lookup(backend_env, "CLASSIFIER_BROKER");
    let broker = crate::PrivateBroker::new(&backend);
    let mut env = case_env(backend_env, "restart");
    for (name, value) in env.iter_mut() {
        if name == address_var {
            *value = broker.address();
        }
    }
    let work = tempfile::tempdir().expect("tempdir");
    let folder = work.path().join("images");
    let total = many_images(&folder, 25);
    let folder_arg = folder.to_string_lossy().into_owned();
    let server_log = work.path().join("server.log");
    let client_log = work.path().join("client.log");

    // 1. Nobody is listening yet.
    let server = ServerProcess::start("server-outlasting", &env, &server_log);
    let client = BackgroundClient::start_logged(
        &[
            "classify",
            &folder_arg,
            "--timeout",
            "30",
            // A small window keeps the job running long enough to be cut in the middle.
            "--window",
            "20",
        ],
        &env,
        &client_log,
    );
    wait_for_log_line(
        &server_log,
        "waiting for the broker",
        Duration::from_secs(60),
    );
    wait_for_log_line(
        &client_log,
        "waiting for the broker",
        Duration::from_secs(60),
    );

    // 2. The broker comes up; work flows.
    broker.start();
    client.wait_for_answers(300, Duration::from_secs(180));

    // 3. Restart, losing what the broker held.
    broker.stop();
    let answered_before_restart = client.answered();
    assert!(
        answered_before_restart < total,
        "the job finished before the broker stopped: the test proves nothing"
    );
    std::thread::sleep(Duration::from_secs(2));
    broker.start();

    // 4. The client ends by itself, with every file answered.
    let (code, stdout) = client.finish_within(Duration::from_secs(400));
    assert!(
        stdout.contains("Summary"),
        "client printed no summary (exit {code})\n{}\nclient log:\n{}",
        tail(&stdout),
        tail(&std::fs::read_to_string(&client_log).unwrap_or_default())
    );
    let summary = parse_summary(&stdout);
    eprintln!(
        "broker restart test ({backend}): sent {total}, {answered_before_restart} answered \
         before the restart; classified {}, errors {}, unanswered {}, duplicates {}",
        summary.classified, summary.errors, summary.unanswered, summary.duplicates
    );
    let log = std::fs::read_to_string(&client_log).unwrap_or_default();
    assert_eq!(
        (code, summary.files, summary.classified),
        (0, total, total),
        "every file answered despite the restart\n{}\nclient log:\n{}",
        tail(&stdout),
        tail(&log)
    );
    assert!(
        log.contains("sending the unanswered requests again"),
        "the client noticed what the broker lost"
    );

    // 5. The server reconnected: a new job is answered in full.
    let (code, stdout, summary) = client_output(
        &["classify", "examples", "--quiet", "--timeout", "120"],
        &env,
    );
    let log = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert_eq!(
        (code, summary.classified),
        (0, 200),
        "after the restart\n{stdout}\nserver log:\n{}",
        tail(&log)
    );
    stop(server);
}

/// Declares every case above as a `#[test]` for one backend: `env` is an expression
/// giving that backend's `Option` environment (`None` skips), `address_var` the
/// variable holding the broker's address. Each backend's test file is this one line.
#[macro_export]
macro_rules! cross_process_tests {
    ($env:expr, $address_var:expr) => {
        $crate::cross_process_tests!(@cases $env;
            one_server_classifies_examples,
            two_servers_share_the_work,
            bad_inputs_are_answered,
            no_server_means_unanswered_after_timeout,
            server_crash_loses_nothing,
            graceful_shutdown_hands_over,
            flood_is_worked_through_with_bounded_memory,
            poison_messages_are_dead_lettered,
        );
        $crate::cross_process_tests!(@with_address $env, $address_var;
            server_waits_for_an_unreachable_broker,
            broker_restart_mid_run,
        );
    };
    (@cases $env:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                if let Some(env) = $env {
                    $crate::cross_process::$case(&env);
                }
            }
        )*
    };
    (@with_address $env:expr, $address_var:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                if let Some(env) = $env {
                    $crate::cross_process::$case(&env, $address_var);
                }
            }
        )*
    };
}
