//! Credentials against a real broker (issue 30, item 4): a Redis server that asks for a
//! password and gives our user access to our streams only.

use std::time::Duration;

use super::{stop, CaseRun};
use crate::{copy_examples, output_text, run_client_within};

/// The password of the ACL user the servers and clients connect as.
const PASSWORD: &str = "classifier-pw-3f9a1c";
/// A password nobody was given, which must not show up in any output either.
const WRONG_PASSWORD: &str = "wrong-pw-77d2e0";

/// A Redis server started with an ACL file: the default user needs a password, and the
/// user `classifier` may use only keys starting with `classify-` and `e2e-` (reply
/// topics, the dead-letter topic, and the tests' request topics). Then:
///
/// 1. a server and a client connecting as `classifier` classify the examples;
/// 2. a client without a password, and one with a wrong one, exit at once with an
///    error that says what is wrong (never "waiting for the broker" for ever);
/// 3. a client whose request topic lies outside its key patterns fails with the
///    broker's refusal (`NOPERM`), not a hang;
/// 4. no password appears in any output or log, at debug level, on any of these paths.
pub fn redis_credentials_and_acls_are_enforced(backend_env: &[(String, String)]) {
    let mut run = CaseRun::new(backend_env, "auth");
    let acl = run.path("users.acl");
    std::fs::write(
        &acl,
        format!(
            "user default on >admin-pw-0b1c ~* &* +@all\n\
             user classifier on >{PASSWORD} resetchannels ~classify-* ~e2e-* +@all -@dangerous\n"
        ),
    )
    .expect("acl file");
    let broker =
        crate::PrivateBroker::new("redis").with_env("REDIS_ACL_FILE", &acl.to_string_lossy());
    broker.start();
    let address = broker.address();
    let url = |credentials: &str| format!("redis://{credentials}{address}");
    run.set_env("RUST_LOG", "debug");
    run.set_env("CLASSIFIER_DEAD_LETTER_TOPIC", "classify-dead-letter-auth");
    run.set_env("REDIS_URL", &url(&format!("classifier:{PASSWORD}@")));
    let folder = run.path("few");
    let files = copy_examples(&folder, 1);
    let folder = folder.to_string_lossy().into_owned();

    // 1. The right user, within its keys.
    let server = run.start_server("server-auth");
    let (code, stdout, summary) = run.classify(&["classify", &folder, "--timeout", "60"]);
    assert_eq!((code, summary.classified), (0, files), "{stdout}");
    stop(server);
    let server_log = std::fs::read_to_string(run.server_log("server-auth")).unwrap_or_default();
    assert!(
        !server_log.contains(PASSWORD),
        "the password is in the server log"
    );

    // 2. No password, a wrong one: refused at once, said clearly.
    for (credentials, expected) in [
        (String::new(), "NOAUTH"),
        (
            format!("classifier:{WRONG_PASSWORD}@"),
            "wrong user or password",
        ),
    ] {
        let mut env = run.env.clone();
        env.retain(|(k, _)| k != "REDIS_URL");
        env.push(("REDIS_URL".into(), url(&credentials)));
        let output = run_client_within(
            &["classify", &folder, "--timeout", "10"],
            &env,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("the client kept waiting with {expected:?} credentials"));
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(1), "{text}");
        assert!(
            text.contains(expected) && text.contains("credentials"),
            "the error names the refusal ({expected}):\n{text}"
        );
        for secret in [PASSWORD, WRONG_PASSWORD] {
            assert!(
                !text.contains(secret),
                "a password is in the output:\n{text}"
            );
        }
    }

    // 3. A request topic outside the user's keys: the broker's refusal, at once.
    let mut env = run.env.clone();
    env.retain(|(k, _)| k != "CLASSIFIER_REQUEST_TOPIC");
    env.push((
        "CLASSIFIER_REQUEST_TOPIC".into(),
        "forbidden-requests".into(),
    ));
    let output = run_client_within(
        &["classify", &folder, "--timeout", "10"],
        &env,
        Duration::from_secs(60),
    )
    .expect("the client ends when the broker refuses a key");
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("NOPERM"),
        "the broker's refusal is shown:\n{text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "the password is in the output:\n{text}"
    );
}
