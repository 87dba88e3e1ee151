//! Redelivery: what is nacked, fails repeatedly, or is left unacked by a subscriber that
//! closes or vanishes comes back, and nothing is lost on the way.

use std::collections::{HashMap, HashSet};

use super::{assert_none_lost, id_of, ids_of, next_before, numbered_messages, BrokerFactory, Case};

/// Case 5: The first deliveries are nacked; every message still arrives, the nacked ones again.
pub async fn nack_redelivers(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "nack", &["readers"]).await;
    let expected = case.publish_numbered("n", 20).await;
    let mut subscriber = case.subscribe("readers").await;
    // Nack the first five deliveries (a backend may redeliver the same one at once).
    let mut nacked = HashSet::new();
    let deadline = case.deadline(1);
    for _ in 0..5 {
        let delivery = next_before(&mut *subscriber, deadline, "nack_redelivers").await;
        nacked.insert(id_of(&delivery));
        delivery.nack().expect("nack");
    }
    let received = case.receive_all(&mut *subscriber, &expected).await;
    assert_none_lost(&expected, &received.ids(), "nack_redelivers");
    assert_none_lost(
        &nacked,
        &received.ids(),
        "nack_redelivers (nacked ones again)",
    );
    case.close_and_delete(subscriber).await;
}

/// Case 9: Continue after errors: every message is nacked three times (several rounds of
/// failures), then all are consumed.
pub async fn continue_after_errors(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "errors", &["readers"]).await;
    let expected = case.publish_numbered("e", 50).await;
    let mut subscriber = case.subscribe("readers").await;
    let mut failures: HashMap<String, usize> = HashMap::new();
    let mut acked = HashSet::new();
    let deadline = case.deadline(2);
    while acked.len() < expected.len() {
        let delivery = next_before(&mut *subscriber, deadline, "continue_after_errors").await;
        let id = id_of(&delivery);
        let failed = failures.entry(id.clone()).or_insert(0);
        if *failed < 3 && !acked.contains(&id) {
            *failed += 1;
            delivery.nack().expect("nack");
        } else {
            acked.insert(id);
            delivery.ack().expect("ack");
        }
    }
    assert_none_lost(&expected, &acked, "continue_after_errors");
    assert!(
        failures.values().all(|&n| n == 3),
        "every message failed three times first"
    );
    case.close_and_delete(subscriber).await;
}

/// Case 7: Unacked messages come back to a new subscriber after the old one closes; 5 rounds
/// of subscribers each ack part of the stream, and nothing is lost across them.
pub async fn continue_after_subscriber_close(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "resume", &["readers"]).await;
    let messages = numbered_messages("r", 1000);
    let expected = ids_of(&messages);
    case.publish_in_batches(&messages, 250).await;
    let mut acked: HashSet<String> = HashSet::new();
    let deadline = case.deadline(3);
    for round in 0..5 {
        let mut subscriber = case.subscribe("readers").await;
        let mut held = Vec::new();
        // Ack up to 200 new messages, and hold 5 unacked ones across the close.
        let mut acked_this_round = 0;
        while acked_this_round < 200 && acked.len() < expected.len() {
            let delivery = next_before(
                &mut *subscriber,
                deadline,
                "continue_after_subscriber_close",
            )
            .await;
            let id = id_of(&delivery);
            if held.len() < 5 && !acked.contains(&id) && round < 4 {
                held.push(delivery);
                continue;
            }
            if acked.insert(id) {
                acked_this_round += 1;
            }
            delivery.ack().expect("ack");
        }
        // Give the held ones back first (a nack), then leave: a backend may only
        // redeliver what a closed subscriber held after an ack deadline.
        drop(held);
        subscriber.close().await.expect("close");
    }
    // Whatever is left (including every held message) goes to one more subscriber.
    let mut subscriber = case.subscribe("readers").await;
    let missing: HashSet<String> = expected.difference(&acked).cloned().collect();
    let received = case.receive_all(&mut *subscriber, &missing).await;
    acked.extend(received.ids());
    assert_none_lost(&expected, &acked, "continue_after_subscriber_close");
    case.close_and_delete(subscriber).await;
}

/// Case 13: Messages abandoned unacked (deliveries dropped, then the subscriber) come back to
/// a new subscriber.
pub async fn unacked_redelivered_to_new_subscriber(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "unacked", &["readers"]).await;
    let expected = case.publish_numbered("u", 10).await;
    let mut subscriber = case.subscribe("readers").await;
    let deadline = case.deadline(1);
    let mut held = Vec::new();
    let mut held_ids = HashSet::new();
    while held_ids.len() < expected.len() {
        let delivery = next_before(&mut *subscriber, deadline, "unacked_redelivered").await;
        held_ids.insert(id_of(&delivery));
        held.push(delivery);
    }
    drop(held);
    drop(subscriber);
    case.read_all(
        "readers",
        &expected,
        "unacked_redelivered_to_new_subscriber",
    )
    .await;
    case.delete().await;
}
