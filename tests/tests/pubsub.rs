//! End to end over Pub/Sub (emulator): `classifier-server` and `client-app` as separate
//! processes. Needs `PUBSUB_EMULATOR_HOST` (scripts/test.sh starts the broker and sets it).

use integration_tests::cross_process::backend_env;

fn env() -> Option<Vec<(String, String)>> {
    let mut env = backend_env("pubsub", "PUBSUB_EMULATOR_HOST")?;
    let config = integration_tests::workspace_root().join("tests/pubsub-e2e.toml");
    env.push((
        "CLASSIFIER_CONFIG".into(),
        config.to_string_lossy().into_owned(),
    ));
    Some(env)
}

integration_tests::cross_process_tests!(env(), "PUBSUB_EMULATOR_HOST");
