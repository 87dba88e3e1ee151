//! Servers leaving mid-run: killed (SIGKILL) or stopped (SIGTERM) while requests are in
//! flight, with another server taking over.

use std::time::Duration;

use super::{stop, tail, CaseRun};
use crate::parse_summary;

/// SIGKILL the only server while requests are in flight, start another: every request
/// still gets a reply (the killed server's unacked requests are redelivered); the client
/// reports how many duplicates it saw.
pub fn server_crash_loses_nothing(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "crash");
    let (total, folder) = run.many_images(10);
    assert!(total >= 2000, "at least 2,000 images ({total})");
    let first = run.start_server("server-doomed");
    let client = run.classify_in_background(&folder);
    client.wait_for_answers(300, Duration::from_secs(120));
    drop(first); // SIGKILL
    let answered_before_restart = client.answered();
    let second = run.start_server("server-rescue");
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
    let run = CaseRun::new(backend_env, "drain");
    let (total, folder) = run.many_images(5);
    let first = run.start_server("server-leaving");
    let client = run.classify_in_background(&folder);
    client.wait_for_answers(200, Duration::from_secs(120));
    stop(first); // SIGTERM, exit 0 required
    let second = run.start_server("server-staying");
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
