//! End to end over Pub/Sub (emulator): `classifier-server` and `client-app` as separate
//! processes. Needs `PUBSUB_EMULATOR_HOST` (scripts/test.sh starts the broker and sets it).

use integration_tests::cross_process::backend_env_with_config;

fn env() -> Option<Vec<(String, String)>> {
    backend_env_with_config("pubsub", "PUBSUB_EMULATOR_HOST", "tests/pubsub-e2e.toml")
}

integration_tests::cross_process_tests!(env(), "PUBSUB_EMULATOR_HOST");

/// The emulator restarts under a subscriber, forgetting its subscription (it keeps
/// nothing on disk): the client library's reopened stream reports it within seconds,
/// and `Resubscribing` makes the subscription again: a message published afterwards
/// arrives. (A client once waited out its whole timeout on a reply subscription lost in
/// a restart during a full test run; this, run alone, does not show that failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_lost_in_a_restart_is_noticed_and_made_again() {
    use std::sync::Arc;
    use std::time::Duration;
    use unified_broker::{Broker, Message, Resubscribing, SubscribeOptions, Subscriber};

    let Some(mut env) = env() else { return };
    let emulator = integration_tests::PrivateBroker::new("pubsub");
    emulator.start();
    env.retain(|(k, _)| k != "PUBSUB_EMULATOR_HOST");
    env.push(("PUBSUB_EMULATOR_HOST".into(), emulator.address()));
    let config = integration_tests::cross_process::config_for(&env);
    let broker: Arc<dyn Broker> = unified_broker::connect(&config.broker)
        .await
        .expect("connect");
    let topic = "lost-in-a-restart";
    let mut subscription =
        Resubscribing::subscribe(Arc::clone(&broker), topic, "g", SubscribeOptions::default())
            .await
            .expect("subscribe");
    emulator.stop();
    emulator.start();
    let restarted = tokio::time::Instant::now();
    let deadline = restarted + Duration::from_secs(60);
    while subscription.resubscriptions() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost subscription was not noticed within 60 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), subscription.next()).await;
    }
    eprintln!(
        "pubsub: the lost subscription was made again {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    broker
        .publish(topic, Message::new("after"))
        .await
        .expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.next())
        .await
        .expect("a delivery within 30 s")
        .expect("open")
        .expect("delivered");
    assert_eq!(delivery.message().payload.as_ref(), b"after");
    delivery.ack().expect("ack");
    let _ = Box::new(subscription).close().await;
}

/// A service-account key the client cannot use (its PEM does not decode) is a final
/// error naming the credentials, not an endless wait for the broker; and no line of the
/// key, nor its id, appears in the client's output, debug logs included. Needs no
/// emulator: it is the path to the real service (`PUBSUB_EMULATOR_HOST` removed).
#[test]
fn a_broken_service_account_key_is_a_final_error_that_never_shows_the_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key_lines: Vec<String> = (0..20)
        .map(|i| format!("MIIEsecret{i:02}QmFzZTY0S2V5TWF0ZXJpYWxOZXZlckxvZ2dlZA"))
        .collect();
    let mut broken = key_lines.clone();
    broken[10].insert(12, '!');
    let key = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        broken.join("\n")
    );
    let key_id = "kid-4b1d-never-logged";
    let credentials = serde_json::json!({
        "type": "service_account",
        "project_id": "secret-test",
        "private_key_id": key_id,
        "private_key": key,
        "client_email": "svc@secret-test.iam.gserviceaccount.com",
        "client_id": "1234",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let credentials_file = tmp.path().join("service-account.json");
    std::fs::write(&credentials_file, credentials.to_string()).expect("write credentials");
    let config = tmp.path().join("pubsub.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nbackend = \"pubsub\"\nproject_id = \"secret-test\"\ncredentials_file = {:?}\n",
            credentials_file.display().to_string()
        ),
    )
    .expect("write config");
    let bag = integration_tests::workspace_root().join("examples/bag");
    let mut command = std::process::Command::new(integration_tests::binary("client-app"));
    command
        .args(["--config", &config.display().to_string(), "classify"])
        .arg(&bag)
        .args(["--timeout", "10"])
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    let output = integration_tests::output_within(command, std::time::Duration::from_secs(60))
        .expect("the client ends on credentials it cannot use");
    let text = integration_tests::output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("credentials cannot be used"), "{text}");
    // No twelve characters of any line, intact or as given (the broken one is what a PEM
    // error would quote), nor the key's id.
    let lines = key_lines.iter().chain(&broken).map(String::as_str);
    for secret in lines.chain([key_id]) {
        let windows = (0..secret.len().saturating_sub(12)).step_by(6);
        for piece in windows.map(|at| &secret[at..at + 12]) {
            assert!(
                !text.contains(piece),
                "{piece} of {secret} is in the output:\n{text}"
            );
        }
    }
}
