//! End to end over Kafka: `classifier-server` and `client-app` as separate
//! processes. Needs `KAFKA_BOOTSTRAP_SERVERS` (scripts/test.sh starts the broker and sets it).

use integration_tests::cross_process::backend_env;

fn env() -> Option<Vec<(String, String)>> {
    backend_env("kafka", "KAFKA_BOOTSTRAP_SERVERS")
}

integration_tests::cross_process_tests!(env(), "KAFKA_BOOTSTRAP_SERVERS");
