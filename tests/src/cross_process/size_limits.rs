//! The broker's message size limit, end to end: a file just under it is classified, one
//! just over it is answered at once with `FILE_TOO_LARGE` naming the limit (never sent,
//! never left unanswered), and `--resize-to` sends the large one downscaled instead.

use super::{connect_as_configured, stop, CaseRun};
use crate::write_size_probes;

/// See the module docs. The limit is the one the broker reports for the request topic
/// (`Broker::max_message_bytes`), asked by a client configured as the processes are.
pub fn size_limits_are_answered(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "size");
    let request_topic = run.env_value("CLASSIFIER_REQUEST_TOPIC");
    let limit = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let broker = connect_as_configured(&run.env).await;
            broker
                .ensure_topic(&request_topic)
                .await
                .expect("ensure_topic");
            broker
                .max_message_bytes(&request_topic)
                .await
                .expect("max_message_bytes")
        });
    let folder = run.path("probes");
    write_size_probes(&folder, limit);
    let folder_arg = folder.to_string_lossy().into_owned();
    let server = run.start_server("server-size");

    let (code, stdout, summary) = run.classify(&["classify", &folder_arg, "--timeout", "120"]);
    assert_eq!(code, 2, "one error: exit status 2\n{stdout}");
    assert_eq!((summary.classified, summary.errors), (1, 1), "{stdout}");
    assert_eq!(summary.unanswered, 0, "{stdout}");
    let over_line = stdout
        .lines()
        .find(|line| line.contains("over.png"))
        .unwrap_or_else(|| panic!("no line for over.png:\n{stdout}"));
    assert!(over_line.contains("FILE_TOO_LARGE"), "{over_line}");
    assert!(
        over_line.contains(&limit.to_string()),
        "names the limit {limit}: {over_line}"
    );
    let under_line = stdout
        .lines()
        .find(|line| line.contains("under.png"))
        .unwrap_or_else(|| panic!("no line for under.png:\n{stdout}"));
    assert!(under_line.contains("→"), "classified: {under_line}");

    let (code, stdout, summary) = run.classify(&[
        "classify",
        &folder_arg,
        "--timeout",
        "120",
        "--resize-to",
        "64",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(
        summary.classified, 2,
        "both sent, the large one downscaled: {stdout}"
    );
    stop(server);
}
