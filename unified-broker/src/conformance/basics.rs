//! The basics: messages arrive intact, stay on their topic, and admin calls can be
//! repeated.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::{
    assert_none_lost, assert_subscribe_finds_no_topic, ids_of, next_within, numbered_messages,
    receive_all, unique_name, BrokerFactory, Case, ID_ATTRIBUTE,
};
use crate::{BrokerError, Message};

/// Case 1: 100 messages arrive with ids, payloads and attributes intact; closing ends the
/// subscription cleanly.
pub async fn publish_subscribe(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "pubsub", &["readers"]).await;
    let messages: Vec<Message> = numbered_messages("m", 100)
        .into_iter()
        .map(|m| m.with_attribute("colour", "blue"))
        .collect();
    let expected = ids_of(&messages);
    case.publish(messages.clone()).await;
    let received = case
        .read_all("readers", &expected, "publish_subscribe")
        .await;
    let sent: HashMap<_, _> = messages
        .iter()
        .map(|m| (m.attribute(ID_ATTRIBUTE).unwrap_or_default().to_string(), m))
        .collect();
    for got in &received.first_seen {
        let id = got.attribute(ID_ATTRIBUTE).unwrap_or_default();
        let original = sent.get(id).expect("only sent ids arrive");
        assert_eq!(got.payload, original.payload, "payload of {id}");
        // Backends may add attributes of their own; ours must all be there.
        for (name, value) in &original.attributes {
            assert_eq!(
                got.attribute(name),
                Some(value.as_str()),
                "attribute {name} of {id}"
            );
        }
    }
    case.delete().await;
}

/// Case 11: Messages of one topic never show up on another.
pub async fn topic_isolation(factory: &dyn BrokerFactory) {
    let first = Case::new(factory, "iso-a", &["readers"]).await;
    let second = Case::on(factory, Arc::clone(&first.broker), "iso-b", &["readers"]).await;
    let expected_a = first.publish_numbered("a", 30).await;
    let expected_b = second.publish_numbered("b", 30).await;
    for (case, expected, other) in [
        (&first, &expected_a, &expected_b),
        (&second, &expected_b, &expected_a),
    ] {
        let topic = &case.topic;
        let mut subscriber = case.subscribe("readers").await;
        let received = case.receive_all(&mut *subscriber, expected).await;
        assert_none_lost(expected, &received.ids(), "topic_isolation");
        // Give stray messages a moment to show up, then check none did.
        let extra = receive_all(&mut *subscriber, other, Duration::from_millis(500)).await;
        let leaked: Vec<_> = received
            .ids()
            .union(&extra.ids())
            .filter(|id| !expected.contains(*id))
            .cloned()
            .collect();
        assert!(
            leaked.is_empty(),
            "topic_isolation: {topic} received {leaked:?}"
        );
        subscriber.close().await.expect("close");
    }
    first.delete().await;
    second.delete().await;
}

/// Admin calls are idempotent: ensuring twice and deleting twice are fine.
pub async fn admin_is_idempotent(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("admin");
    for _ in 0..2 {
        broker.ensure_topic(&topic).await.expect("ensure_topic");
        broker
            .ensure_subscription(&topic, "readers")
            .await
            .expect("ensure_subscription");
    }
    for _ in 0..2 {
        broker
            .delete_subscription(&topic, "readers")
            .await
            .expect("delete_subscription");
    }
    for _ in 0..2 {
        broker.delete_topic(&topic).await.expect("delete_topic");
    }
}

/// Image-sized payloads (several MB), keys and attributes make the round trip through
/// the backend's publish, storage and receive limits, in order (one key); a first
/// delivery is not counted as a redelivery. Not one of the suite's cases: the test files
/// of the backends meant to carry such messages call it.
pub async fn large_messages_round_trip(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "large", &["readers"]).await;
    let sizes = [5 * 1024 * 1024, 1, 8 * 1024 * 1024];
    let messages: Vec<Message> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            Message::new(vec![(i % 251) as u8; size])
                .with_key("same-key")
                .with_attribute("size", size.to_string())
        })
        .collect();
    case.publish(messages).await;
    let mut subscriber = case.subscribe("readers").await;
    for (i, &size) in sizes.iter().enumerate() {
        let delivery = next_within(&mut *subscriber, factory.receive_timeout()).await;
        let message = delivery.message();
        assert_eq!(message.payload.len(), size, "message {i} in order");
        assert!(message.payload.iter().all(|&b| b == (i % 251) as u8));
        assert_eq!(message.attribute("size"), Some(size.to_string().as_str()));
        assert_eq!(message.key.as_deref(), Some("same-key"));
        assert!(
            matches!(delivery.attempt(), None | Some(1)),
            "first delivery of message {i} counted as attempt {:?}",
            delivery.attempt()
        );
        delivery.ack().expect("ack");
    }
    case.close_and_delete(subscriber).await;
}

/// Case 17 (beyond Watermill's list): the topic's size limit ([`crate::Broker::max_message_bytes`]) is exact: a
/// message of exactly that [`Message::size`] is published and arrives intact, one byte
/// more fails with [`BrokerError::MessageTooLarge`], which is final (not retryable), and
/// nothing of it arrives.
pub async fn size_limit_is_exact(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "sizelimit", &["readers"]).await;
    let limit = case
        .broker
        .max_message_bytes(&case.topic)
        .await
        .expect("max_message_bytes");
    assert!(
        limit <= case.broker.features().max_message_bytes,
        "a topic's limit is at most the client's"
    );
    let sized = |id: &str, size: usize| {
        let message = Message::new(Vec::new()).with_attribute(ID_ATTRIBUTE, id);
        let filler = size - message.size();
        Message {
            payload: vec![b'x'; filler].into(),
            ..message
        }
    };
    let over = sized("over", limit + 1);
    assert_eq!(over.size(), limit + 1);
    match case.broker.publish(&case.topic, over).await {
        Err(error @ BrokerError::MessageTooLarge { .. }) => {
            assert!(!error.is_retryable(), "{error} is final")
        }
        other => panic!("a message one byte over the limit of {limit}: {other:?}"),
    }
    case.broker
        .publish(&case.topic, sized("fits", limit))
        .await
        .expect("a message of exactly the limit is published");
    case.publish_marked("after").await;
    let mut subscriber = case.subscribe("readers").await;
    let expected: HashSet<String> = ["fits".to_string(), "after".to_string()].into();
    let received = case.receive_all(&mut *subscriber, &expected).await;
    assert_none_lost(&expected, &received.ids(), "size_limit_is_exact");
    assert_eq!(received.ids(), expected, "nothing of the refused message");
    let fits = received
        .first_seen
        .iter()
        .find(|m| m.attribute(ID_ATTRIBUTE) == Some("fits"))
        .expect("received");
    assert_eq!(fits.size(), limit, "arrived intact");
    case.close_and_delete(subscriber).await;
}

/// Subscribing to a topic that does not exist is `TopicNotFound`, not a silently created
/// topic. Not one of the suite's cases: the test files of the backends that check it
/// (with checks of their own, or as it is) add it.
pub async fn missing_topic_is_reported(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    assert_subscribe_finds_no_topic(&*broker, &unique_name("missing")).await;
}
