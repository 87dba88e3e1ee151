//! Outages: no server to answer, no broker to reach, and a broker that restarts mid-run
//! losing all it held.

use std::time::Duration;

use super::background_client::BackgroundClient;
use super::metrics::{free_loopback_port, wait_for_status};
use super::{lookup, stop, tail, wait_for_log_line, CaseRun};
use crate::{copy_examples, parse_summary};

/// With no server running, the client gives up after its timeout, lists what went
/// unanswered and exits 3.
pub fn no_server_means_unanswered_after_timeout(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "none");
    let folder = run.path("few");
    let copied = copy_examples(&folder, 1);
    let folder_arg = folder.to_string_lossy().into_owned();
    let (code, stdout, summary) = run.classify(&["classify", &folder_arg, "--timeout", "5"]);
    assert_eq!(code, 3, "{stdout}");
    assert_eq!(summary.unanswered, copied, "{stdout}");
    assert!(stdout.contains("UNANSWERED"), "{stdout}");
}

/// A server started while its broker is unreachable keeps retrying (and says what it
/// waits for) instead of exiting, and still stops cleanly on SIGTERM.
pub fn server_waits_for_an_unreachable_broker(backend_env: &[(String, String)], address_var: &str) {
    let mut run = CaseRun::new(backend_env, "outage");
    // Nothing listens on port 9 (discard) on these machines.
    run.set_env(address_var, "127.0.0.1:9");
    let server = run.start_server("server-waiting");
    wait_for_log_line(
        &run.server_log("server-waiting"),
        "waiting for the broker",
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    stop(server);
}

/// `/readyz` follows the broker: 200 while it serves, 503 within seconds of the broker
/// going away (even where the backend's client retries quietly and the subscription sees
/// no error: the server asks the broker every 2 s), 200 again once it is back.
pub fn readiness_follows_the_broker(backend_env: &[(String, String)], address_var: &str) {
    let backend = lookup(backend_env, "CLASSIFIER_BROKER");
    let broker = crate::PrivateBroker::new(&backend);
    let mut run = CaseRun::new(backend_env, "ready");
    run.set_env(address_var, &broker.address());
    let addr = free_loopback_port();
    run.set_env("CLASSIFIER_METRICS_ADDR", &addr.to_string());
    broker.start();
    let server = run.start_server("server-ready");
    let log = || std::fs::read_to_string(run.server_log("server-ready")).unwrap_or_default();
    wait_for_status(addr, "/readyz", 200, &log);
    broker.stop();
    let stopped = std::time::Instant::now();
    wait_for_status(addr, "/readyz", 503, &log);
    eprintln!(
        "readiness ({backend}): 503 {:.1} s after the broker stopped",
        stopped.elapsed().as_secs_f64()
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "503 only {:?} after the broker stopped",
        stopped.elapsed()
    );
    broker.start();
    wait_for_status(addr, "/readyz", 200, &log);
    stop(server);
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
    // On Pub/Sub this case was skipped from 2026-12-02 to 2026-12-07 for two failures in
    // full-suite runs. One (a request published between the re-creation of the request
    // topic and of the servers' subscription was dropped) was fixed on 2026-12-04: the
    // client reads its re-send list only after both exist again. The other (a client that
    // gave up after 30 s without noticing its lost reply subscription) was never seen
    // again: the client now waits 90 s, the subscriber ends its stream when its
    // subscription is gone, and tests/tests/pubsub.rs checks that a lost subscription is
    // noticed and made again. On 2026-12-07 it passed 5 of 5 runs on the emulator (the
    // first ones with a release build on both cores beside them; 5,000 of 5,000, 0-20
    // duplicates) and then two full scripts/test.sh runs; it runs on every broker again.
    let broker = crate::PrivateBroker::new(&backend);
    let mut run = CaseRun::new(backend_env, "restart");
    run.set_env(address_var, &broker.address());
    let (total, folder_arg) = run.many_images(25);
    let server_log = run.server_log("server-outlasting");
    let client_log = run.path("client.log");

    // 1. Nobody is listening yet.
    let server = run.start_server("server-outlasting");
    let client = BackgroundClient::start_logged(
        &[
            "classify",
            &folder_arg,
            // Long enough for a loaded machine: in one full run (2026-12-02, other builds
            // on both cores) the Pub/Sub client noticed its lost reply subscription only
            // after more than 30 s and gave up on 4,700 images; alone it passes in time.
            "--timeout",
            "90",
            // A small window keeps the job running long enough to be cut in the middle.
            "--window",
            "20",
        ],
        &run.env,
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
    let (code, stdout, summary) =
        run.classify(&["classify", "examples", "--quiet", "--timeout", "120"]);
    let log = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert_eq!(
        (code, summary.classified),
        (0, 200),
        "after the restart\n{stdout}\nserver log:\n{}",
        tail(&log)
    );
    stop(server);
}
