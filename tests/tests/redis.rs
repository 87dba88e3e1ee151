//! End to end over Redis Streams: `classifier-server` and `client-app` as separate
//! processes. Needs `REDIS_URL` (scripts/test.sh starts a server and sets it).

use integration_tests::cross_process::backend_env_with_config;

fn env() -> Option<Vec<(String, String)>> {
    backend_env_with_config("redis", "REDIS_URL", "tests/redis-e2e.toml")
}

integration_tests::cross_process_tests!(env(), "REDIS_URL");

// The model cases need no particular broker: they run on this one.
#[test]
fn a_model_reload_mid_run_loses_nothing() {
    if let Some(env) = env() {
        integration_tests::cross_process::a_model_reload_mid_run_loses_nothing(&env);
    }
}

#[test]
fn requests_choose_among_several_models() {
    if let Some(env) = env() {
        integration_tests::cross_process::requests_choose_among_several_models(&env);
    }
}

#[test]
fn an_onnx_model_is_served_like_a_native_one() {
    if let Some(env) = env() {
        integration_tests::cross_process::an_onnx_model_is_served_like_a_native_one(&env);
    }
}

// Credentials and ACLs: on a Redis server of the test's own that asks for them.
#[test]
fn redis_credentials_and_acls_are_enforced() {
    if let Some(env) = env() {
        integration_tests::cross_process::redis_credentials_and_acls_are_enforced(&env);
    }
}
