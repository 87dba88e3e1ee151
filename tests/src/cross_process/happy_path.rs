//! The happy path: servers classify the examples, alone or sharing the work.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{server_ids_in, stop, CaseRun};

/// One server process classifies every example image; the client reports ≥ 85%
/// accuracy and exits 0; the server exits 0 on SIGTERM.
pub fn one_server_classifies_examples(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "one");
    let server = run.start_server("server-one");
    let (code, stdout, summary) =
        run.classify(&["classify", "examples", "--quiet", "--timeout", "90"]);
    let log = std::fs::read_to_string(run.server_log("server-one")).unwrap_or_default();
    assert_eq!(code, 0, "client exit status\n{stdout}\nserver log:\n{log}");
    assert_eq!((summary.files, summary.classified), (200, 200), "{stdout}");
    assert!(summary.accuracy_percent.unwrap_or(0.0) >= 85.0, "{stdout}");
    stop(server);
}

/// Two server processes in one group: over repeated runs both answer requests, and in
/// every run every image is answered exactly once as far as the user sees.
pub fn two_servers_share_the_work(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "two");
    let first = run.start_server("server-a");
    let second = run.start_server("server-b");
    let mut seen: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut runs = 0;
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "after {runs} runs only {seen:?} answered"
        );
        runs += 1;
        let results = run.path(&format!("run{runs}.jsonl"));
        let results_arg = results.to_string_lossy().into_owned();
        let (code, stdout, summary) = run.classify(&[
            "classify",
            "examples",
            "--quiet",
            "--timeout",
            "90",
            "--output",
            &results_arg,
        ]);
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
