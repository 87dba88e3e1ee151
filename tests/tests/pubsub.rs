//! End to end over Pub/Sub (emulator): `classifier-server` and `client-app` as separate
//! processes. Needs `PUBSUB_EMULATOR_HOST` (scripts/test.sh starts the broker and sets it).

use integration_tests::cross_process::backend_env_with_config;

fn env() -> Option<Vec<(String, String)>> {
    backend_env_with_config("pubsub", "PUBSUB_EMULATOR_HOST", "tests/pubsub-e2e.toml")
}

integration_tests::cross_process_tests!(env(), "PUBSUB_EMULATOR_HOST");
