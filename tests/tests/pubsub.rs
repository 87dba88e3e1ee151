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
