//! End to end over Redis Streams: `classifier-server` and `client-app` as separate
//! processes. Needs `REDIS_URL` (scripts/test.sh starts a server and sets it).

use integration_tests::cross_process::backend_env;

fn env() -> Option<Vec<(String, String)>> {
    let mut env = backend_env("redis", "REDIS_URL")?;
    let config = integration_tests::workspace_root().join("tests/redis-e2e.toml");
    env.push((
        "CLASSIFIER_CONFIG".into(),
        config.to_string_lossy().into_owned(),
    ));
    Some(env)
}

integration_tests::cross_process_tests!(env(), "REDIS_URL");
