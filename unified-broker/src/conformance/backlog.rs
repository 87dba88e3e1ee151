//! A group's backlog ([`crate::Broker::backlog`]), where the backend can tell it: what an
//! autoscaler reads, so it must count every message the group has not acked, held ones
//! included, and nothing once all are acked.

use std::time::Duration;

use tokio::time::Instant;

use super::{next_before, numbered_messages, unique_name, BrokerFactory, Case};
use crate::{Backlog, BrokerError};

/// How many messages the case publishes.
const MESSAGES: u64 = 40;

/// A topic that does not exist has no backlog but an error. With the group made and no
/// member, `N` published messages are its backlog; handed to
/// a member and not acked they still are; acked (and the member closed, which settles
/// what it committed lazily) the backlog is 0, and the consumed count, where there is
/// one, grew by `N`. Skipped, saying so, by a backend that cannot tell a backlog.
pub async fn backlog_counts_what_the_group_has_not_acked(factory: &dyn BrokerFactory) {
    let name = "backlog_counts_what_the_group_has_not_acked";
    let case = Case::new(factory, "backlog", &["workers"]).await;
    let Some(before) = backlog_of(&case).await else {
        eprintln!(
            "conformance: SKIPPED {name}: the {} backend cannot tell a group's backlog \
             (Broker::backlog answers None)",
            case.broker.backend()
        );
        case.delete().await;
        return;
    };
    assert_eq!(before.unanswered(), 0, "{name}: a new group has no backlog");
    let missing = unique_name("no-such-topic");
    match case.broker.backlog(&missing, "workers").await {
        Err(BrokerError::TopicNotFound(topic)) => assert_eq!(topic, missing),
        other => panic!("{name}: the backlog on a missing topic: {other:?}"),
    }
    // One at a time: a batch of several at the end of a Kafka partition is counted as one
    // by Tansu 0.6, the test broker (see `kafka/backlog.rs`).
    for message in numbered_messages("b", MESSAGES as usize) {
        case.publish(vec![message]).await;
    }
    let published = wait_for_backlog(&case, MESSAGES, name).await;
    if let Some(in_flight) = published.in_flight {
        assert_eq!(
            in_flight, 0,
            "{name}: nothing handed out yet: {published:?}"
        );
    }

    let mut subscriber = case.subscribe("workers").await;
    let deadline = case.deadline(1);
    let mut held = Vec::new();
    for _ in 0..MESSAGES {
        held.push(next_before(&mut *subscriber, deadline, name).await);
    }
    let holding = wait_for_backlog(&case, MESSAGES, name).await;
    if let Some(in_flight) = holding.in_flight {
        assert_eq!(in_flight, MESSAGES, "{name}: held, not acked: {holding:?}");
    }

    for delivery in held {
        delivery.ack().expect("ack");
    }
    subscriber.close().await.expect("close");
    let done = wait_for_backlog(&case, 0, name).await;
    if let (Some(start), Some(end)) = (before.consumed, done.consumed) {
        assert_eq!(
            end - start,
            MESSAGES,
            "{name}: consumed {before:?} → {done:?}"
        );
    }
    case.delete().await;
}

/// The case's group's backlog now (panics on an error).
async fn backlog_of(case: &Case<'_>) -> Option<Backlog> {
    case.broker
        .backlog(&case.topic, "workers")
        .await
        .expect("backlog")
}

/// Polls the backlog until it counts `unanswered` messages (a broker may take a moment
/// to show a commit or a publish); panics, naming `case_name`, after the factory's
/// receive timeout.
async fn wait_for_backlog(case: &Case<'_>, unanswered: u64, case_name: &str) -> Backlog {
    let deadline = case.deadline(1);
    loop {
        let backlog = backlog_of(case)
            .await
            .unwrap_or_else(|| panic!("{case_name}: the backlog became unknown"));
        if backlog.unanswered() == unanswered {
            return backlog;
        }
        assert!(
            Instant::now() < deadline,
            "{case_name}: backlog {backlog:?}, expected {unanswered} unanswered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
