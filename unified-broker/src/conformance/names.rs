//! Topic names from untrusted peers: every backend refuses the names its broker can
//! never publish to, at once and for good, and says quickly that a topic is missing;
//! neither stops the client from working.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{unique_name, BrokerFactory, Case};
use crate::{Broker, BrokerError, Message};

/// How long refusing a name may take: it is checked locally, no request is sent.
const REFUSAL_TIME: Duration = Duration::from_millis(500);

/// How long a publish to a missing topic may take to fail.
const MISSING_TOPIC_TIME: Duration = Duration::from_secs(2);

/// Panics unless `result` is a final [`BrokerError::InvalidTopic`] of a short message (a
/// long name must not become a long error or log line); `what` names the call.
pub fn assert_invalid_topic<T: std::fmt::Debug>(result: crate::Result<T>, what: &str) {
    match result {
        Err(error @ BrokerError::InvalidTopic { .. }) => {
            assert!(!error.is_retryable(), "{what}: {error} must be final");
            let shown = error.to_string();
            assert!(shown.len() < 400, "{what}: {} bytes of error", shown.len());
        }
        other => panic!("{what}: expected InvalidTopic, got {other:?}"),
    }
}

/// Panics unless `broker` refuses `topic` as a name everywhere a topic is named, at once:
/// [`Broker::check_topic_name`], `publish`, `publish_batch` and `ensure_topic`.
pub async fn assert_name_refused(broker: &dyn Broker, topic: &str) {
    let what = |call: &str| format!("{call} of a {}-byte name", topic.len());
    assert_invalid_topic(broker.check_topic_name(topic), &what("check_topic_name"));
    let started = Instant::now();
    let published = broker.publish(topic, Message::new("x")).await;
    assert!(started.elapsed() < REFUSAL_TIME, "{}", what("publish"));
    assert_invalid_topic(published, &what("publish"));
    let batch = vec![Message::new("a"), Message::new("b")];
    assert_invalid_topic(
        broker.publish_batch(topic, batch).await,
        &what("publish_batch"),
    );
    assert_invalid_topic(broker.ensure_topic(topic).await, &what("ensure_topic"));
}

/// Case 18: names no backend can publish to (empty, a megabyte long) are refused with a
/// final [`BrokerError::InvalidTopic`] before anything is sent, and the client works on
/// afterwards; the suite's own names pass the check.
pub async fn hostile_topic_names_are_refused(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let huge = "x".repeat(1024 * 1024);
    for topic in ["", huge.as_str()] {
        assert_name_refused(&*broker, topic).await;
    }
    let case = Case::on(factory, broker, "names", &["readers"]).await;
    assert!(case.broker.check_topic_name(&case.topic).is_ok());
    case.publish_marked("after").await;
    let expected: HashSet<String> = ["after".to_string()].into();
    case.read_all("readers", &expected, "after refused names")
        .await;
    case.delete().await;
}

/// Case 19: publishing to many distinct topics that do not exist (what a peer naming
/// made-up reply topics causes) fails fast with [`BrokerError::TopicNotFound`] each
/// time, and publishing to a real topic meanwhile stays fast.
pub async fn missing_topics_fail_fast(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "missing-many", &["readers"]).await;
    let broker = &*case.broker;
    let missing = futures::stream::iter(0..200)
        .map(|i| async move {
            let topic = format!("{}-{i}", unique_name("absent"));
            let started = Instant::now();
            let published = broker.publish(&topic, Message::new("x")).await;
            (topic, started.elapsed(), published)
        })
        .buffer_unordered(50)
        .for_each(|(topic, took, published)| async move {
            assert!(
                matches!(&published, Err(BrokerError::TopicNotFound(_))),
                "{topic}: {published:?}"
            );
            assert!(took < MISSING_TOPIC_TIME, "{topic}: failed after {took:?}");
        });
    let real = async {
        for i in 0..10 {
            let started = Instant::now();
            case.publish_marked(&format!("real-{i}")).await;
            let took = started.elapsed();
            assert!(took < MISSING_TOPIC_TIME, "real publish {i} took {took:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::join!(missing, real);
    let expected: HashSet<String> = (0..10).map(|i| format!("real-{i}")).collect();
    case.read_all("readers", &expected, "missing_topics_fail_fast")
        .await;
    case.delete().await;
}
