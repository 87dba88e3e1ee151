//! End to end over Kafka: `classifier-server` and `client-app` as separate
//! processes. Needs `KAFKA_BOOTSTRAP_SERVERS` (scripts/test.sh starts the broker and sets it).

use integration_tests::cross_process::{self, backend_env};

fn env() -> Option<Vec<(String, String)>> {
    backend_env("kafka", "KAFKA_BOOTSTRAP_SERVERS")
}

#[test]
fn one_server_classifies_examples() {
    if let Some(env) = env() {
        cross_process::one_server_classifies_examples(&env);
    }
}

#[test]
fn two_servers_share_the_work() {
    if let Some(env) = env() {
        cross_process::two_servers_share_the_work(&env);
    }
}

#[test]
fn bad_inputs_are_answered() {
    if let Some(env) = env() {
        cross_process::bad_inputs_are_answered(&env);
    }
}

#[test]
fn no_server_means_unanswered_after_timeout() {
    if let Some(env) = env() {
        cross_process::no_server_means_unanswered_after_timeout(&env);
    }
}

#[test]
fn server_crash_loses_nothing() {
    if let Some(env) = env() {
        cross_process::server_crash_loses_nothing(&env);
    }
}

#[test]
fn graceful_shutdown_hands_over() {
    if let Some(env) = env() {
        cross_process::graceful_shutdown_hands_over(&env);
    }
}

#[test]
fn flood_is_worked_through_with_bounded_memory() {
    if let Some(env) = env() {
        cross_process::flood_is_worked_through_with_bounded_memory(&env);
    }
}

#[test]
fn server_waits_for_an_unreachable_broker() {
    if let Some(env) = env() {
        cross_process::server_waits_for_an_unreachable_broker(&env, "KAFKA_BOOTSTRAP_SERVERS");
    }
}

#[test]
fn poison_messages_are_dead_lettered() {
    if let Some(env) = env() {
        cross_process::poison_messages_are_dead_lettered(&env);
    }
}

#[test]
fn broker_restart_mid_run() {
    if let Some(env) = env() {
        cross_process::broker_restart_mid_run(&env, "KAFKA_BOOTSTRAP_SERVERS");
    }
}
