//! End-to-end cases with `classifier-server` and `client-app` as separate processes,
//! run against a real broker. Each backend's test file supplies the environment that
//! selects it (`CLASSIFIER_BROKER` plus the broker's address) and calls these cases
//! through [`cross_process_tests!`](crate::cross_process_tests).
//!
//! The cases, by topic: [`happy_path`] (servers classify and share the work),
//! [`bad_input`] (bad files and poison messages), [`crash`] (servers killed or
//! stopped mid-run), [`flood`] (a backlog worked through with bounded memory),
//! [`outages`] (no server, no broker, a broker restarting), [`hostile`] (peers
//! naming reply routes that can never be answered), [`deadlines`] (a backlog of
//! expired requests answered without inference), [`metrics`] (the
//! server's metrics and probes against what the client saw), [`models`] (a model
//! reloaded mid-run, several models chosen per request; run on one backend, since
//! nothing in them is broker-specific), [`onnx`] (an ONNX model served beside the
//! native CNN) and [`backlog`] (the backlog exporter with no server running, then
//! servers draining it). Each starts from a
//! [`CaseRun`]: its own topic, group and scratch folder.

mod auth;
mod background_client;
mod backlog;
mod bad_input;
mod crash;
mod deadlines;
mod flood;
mod happy_path;
mod hostile;
mod metrics;
mod models;
mod onnx;
mod outages;
mod size_limits;

pub use auth::redis_credentials_and_acls_are_enforced;
pub use backlog::the_exporter_reports_the_backlog_servers_drain;
pub use bad_input::{bad_inputs_are_answered, poison_messages_are_dead_lettered};
pub use crash::{graceful_shutdown_hands_over, server_crash_loses_nothing};
pub use deadlines::expired_requests_cost_no_inference;
pub use flood::flood_is_worked_through_with_bounded_memory;
pub use happy_path::{one_server_classifies_examples, two_servers_share_the_work};
pub use hostile::poisoned_reply_routes_never_stall_the_server;
pub use metrics::{metric, metrics_add_up_to_the_replies};
pub use models::{a_model_reload_mid_run_loses_nothing, requests_choose_among_several_models};
pub use onnx::an_onnx_model_is_served_like_a_native_one;
pub use outages::{
    broker_restart_mid_run, no_server_means_unanswered_after_timeout, readiness_follows_the_broker,
    server_waits_for_an_unreachable_broker,
};
pub use size_limits::size_limits_are_answered;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use background_client::BackgroundClient;

use crate::{parse_summary, run_client, ServerProcess, Summary};

pub use models::write_model_version;

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
/// An empty variable counts as unset.
pub fn backend_env(backend: &str, address_var: &str) -> Option<Vec<(String, String)>> {
    match std::env::var(address_var) {
        Ok(address) if !address.trim().is_empty() => Some(vec![
            ("CLASSIFIER_BROKER".into(), backend.into()),
            (address_var.into(), address),
        ]),
        _ if std::env::var_os("REQUIRE_BROKERS").is_some() => {
            panic!("{address_var} is not set but REQUIRE_BROKERS is: start the broker (scripts/test.sh does)")
        }
        _ => {
            eprintln!(
                "SKIPPED: {address_var} not set, so the {backend} end-to-end tests cannot run"
            );
            None
        }
    }
}

/// [`backend_env`] plus `CLASSIFIER_CONFIG` naming `config_file` (a path relative to the
/// workspace root), for a backend whose servers need settings of their own in the tests.
pub fn backend_env_with_config(
    backend: &str,
    address_var: &str,
    config_file: &str,
) -> Option<Vec<(String, String)>> {
    let mut env = backend_env(backend, address_var)?;
    let config = crate::workspace_root().join(config_file);
    env.push((
        "CLASSIFIER_CONFIG".into(),
        config.to_string_lossy().into_owned(),
    ));
    Some(env)
}

/// One case's setup: its environment (see [`case_env`]) and a scratch folder for its
/// inputs, results and process logs, with the steps the cases repeat on them.
struct CaseRun {
    env: Vec<(String, String)>,
    work: tempfile::TempDir,
}

impl CaseRun {
    /// A run of `case` on the backend of `backend_env`.
    fn new(backend_env: &[(String, String)], case: &str) -> CaseRun {
        CaseRun {
            env: case_env(backend_env, case),
            work: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Sets `name` to `value` in the environment of the processes started from now on.
    fn set_env(&mut self, name: &str, value: &str) {
        match self.env.iter_mut().find(|(k, _)| k == name) {
            Some((_, old)) => *old = value.to_string(),
            None => self.env.push((name.to_string(), value.to_string())),
        }
    }

    /// The value of `name` in the case's environment (panics if it is not set).
    fn env_value(&self, name: &str) -> String {
        lookup(&self.env, name)
    }

    /// `name` inside the scratch folder.
    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Where the server `id` started by [`CaseRun::start_server`] logs.
    fn server_log(&self, id: &str) -> PathBuf {
        self.path(&format!("{id}.log"))
    }

    /// Starts a server with `--server-id id`, logging to [`CaseRun::server_log`].
    fn start_server(&self, id: &str) -> ServerProcess {
        ServerProcess::start(id, &self.env, &self.server_log(id))
    }

    /// [`CaseRun::start_server`] with more server arguments.
    fn start_server_with(&self, id: &str, args: &[&str]) -> ServerProcess {
        ServerProcess::start_with_args(id, args, &self.env, &self.server_log(id))
    }

    /// Gives the server a dead-letter topic and a metrics address of the case's own, and
    /// returns them with the names a case that publishes its own requests needs.
    fn own_topics(&mut self) -> OwnTopics {
        let request_topic = self.env_value("CLASSIFIER_REQUEST_TOPIC");
        let dead_letter_topic = format!("{request_topic}-dead");
        self.set_env("CLASSIFIER_DEAD_LETTER_TOPIC", &dead_letter_topic);
        let metrics = metrics::free_loopback_port();
        self.set_env("CLASSIFIER_METRICS_ADDR", &metrics.to_string());
        OwnTopics {
            group: self.env_value("CLASSIFIER_GROUP"),
            reply_topic: format!("classify-replies-{request_topic}"),
            request_topic,
            dead_letter_topic,
            metrics,
        }
    }

    /// Runs the client with `args` to its end: exit code, stdout, summary.
    fn classify(&self, args: &[&str]) -> (i32, String, Summary) {
        client_output(args, &self.env)
    }

    /// Classifies `folder` (90 s reply timeout), writing the results to `results`.
    fn classify_into(&self, folder: &Path, results: &Path) -> (i32, String, Summary) {
        let folder = folder.to_string_lossy();
        let results = results.to_string_lossy();
        self.classify(&["classify", &folder, "--timeout", "90", "--output", &results])
    }

    /// Fills `images/` with every example `copies` times: (image count, folder path).
    fn many_images(&self, copies: usize) -> (usize, String) {
        let folder = self.path("images");
        let total = crate::many_images(&folder, copies);
        (total, folder.to_string_lossy().into_owned())
    }

    /// A client classifying `folder` in the background with a 300 s reply timeout and a
    /// window of 100 requests.
    fn classify_in_background(&self, folder: &str) -> BackgroundClient {
        BackgroundClient::start(
            &["classify", folder, "--timeout", "300", "--window", "100"],
            &self.env,
        )
    }
}

/// The names of a case that publishes its own requests ([`CaseRun::own_topics`]).
struct OwnTopics {
    request_topic: String,
    group: String,
    dead_letter_topic: String,
    /// `classify-replies-<request topic>`.
    reply_topic: String,
    /// Where the server serves `/metrics` and the probes.
    metrics: std::net::SocketAddr,
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

/// SIGTERM, and the server must exit 0 within 60 s.
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
    unified_broker::connect(&config_for(env).broker)
        .await
        .expect("connect")
}

/// A broker client for a case (see [`connect_as_configured`]) once each `(topic, group)`
/// of `subscriptions` exists, with `messages` published to `topic` in batches of `batch`:
/// the set-up of the cases that publish their own requests before a server runs.
async fn connect_and_publish(
    env: &[(String, String)],
    subscriptions: &[(&str, &str)],
    (topic, messages, batch): (&str, Vec<unified_broker::Message>, usize),
) -> std::sync::Arc<dyn unified_broker::Broker> {
    let broker = connect_as_configured(env).await;
    for (subscribed, group) in subscriptions {
        broker
            .ensure_topic_and_subscription(subscribed, group)
            .await
            .expect("topic and subscription");
    }
    for chunk in messages.chunks(batch) {
        broker
            .publish_batch(topic, chunk.to_vec())
            .await
            .expect("publish the requests");
    }
    broker
}

/// The configuration the binaries would read in a case's environment: the file
/// `CLASSIFIER_CONFIG` names (if any), with the environment laid over it.
pub fn config_for(env: &[(String, String)]) -> classifier_app::AppConfig {
    let value = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut config = match value("CLASSIFIER_CONFIG") {
        Some(path) => classifier_app::AppConfig::from_file(Path::new(&path)).expect("config"),
        None => classifier_app::AppConfig::default(),
    };
    config.apply_env(value).expect("environment");
    config
}

/// The last 25 lines of `stdout`, for failure messages.
fn tail(stdout: &str) -> String {
    let lines: Vec<&str> = stdout.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
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
            size_limits_are_answered,
            metrics_add_up_to_the_replies,
            poisoned_reply_routes_never_stall_the_server,
            expired_requests_cost_no_inference,
            the_exporter_reports_the_backlog_servers_drain,
        );
        #[test]
        fn trace_context_crosses_the_broker() {
            if let Some(env) = $env {
                $crate::traces::trace_context_crosses_the_broker(&env);
            }
        }
        $crate::cross_process_tests!(@with_address $env, $address_var;
            server_waits_for_an_unreachable_broker,
            broker_restart_mid_run,
            readiness_follows_the_broker,
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
