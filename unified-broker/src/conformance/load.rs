//! Under load: many publishers and readers at once, many topics at once, subscribers and
//! publishers closing while others work.

use std::collections::HashSet;
use std::sync::Arc;

use futures::future::join_all;
use tokio::time::Instant;

use super::{assert_none_lost, ids_of, numbered_messages, BrokerFactory, Case, ID_ATTRIBUTE};
use crate::{Broker, Message};

/// Case 2: 5,000 messages from 50 concurrent publishers, read by 3 concurrent members of one
/// group: none lost.
pub async fn concurrent_publish_subscribe(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "concurrent", &["readers"]).await;
    let publishers = TaskPublishers {
        tasks: 50,
        prefix: "p",
        per_task: 100,
    };
    let expected = publishers.ids();
    let publishing = publishers.publish(&case.broker, &case.topic, 25);
    let received = read_with_members(&case, "readers", 3, &expected, publishing).await;
    assert_none_lost(&expected, &received, "concurrent_publish_subscribe");
    case.delete().await;
}

/// Messages published by concurrent tasks, task `t` sending
/// [`numbered_messages`]`("{prefix}{t}", per_task)`.
struct TaskPublishers {
    tasks: usize,
    prefix: &'static str,
    per_task: usize,
}

impl TaskPublishers {
    /// The ids of all the messages.
    fn ids(&self) -> HashSet<String> {
        (0..self.tasks)
            .flat_map(|t| ids_of(&self.messages_of(t)))
            .collect()
    }

    fn messages_of(&self, task: usize) -> Vec<Message> {
        numbered_messages(&format!("{}{task}", self.prefix), self.per_task)
    }

    /// Starts the tasks (when first polled), each publishing its messages on `topic` in
    /// batches of `batch`; ends when all of them have.
    async fn publish(&self, broker: &Arc<dyn Broker>, topic: &str, batch: usize) {
        let publishers = (0..self.tasks).map(|t| {
            let broker = Arc::clone(broker);
            let topic = topic.to_string();
            let messages = self.messages_of(t);
            tokio::spawn(async move {
                for chunk in messages.chunks(batch) {
                    broker
                        .publish_batch(&topic, chunk.to_vec())
                        .await
                        .expect("publish");
                }
            })
        });
        for publisher in join_all(publishers).await {
            publisher.expect("publisher task");
        }
    }
}

/// Runs `members` subscribers of one group of `case`'s topic in parallel with
/// `publishing`, until together they have seen every expected id (or the timeout
/// passed); returns the union.
async fn read_with_members(
    case: &Case<'_>,
    group: &str,
    members: usize,
    expected: &HashSet<String>,
    publishing: impl std::future::Future<Output = ()>,
) -> HashSet<String> {
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    // A watch, not a `Notify`: a reader busy with a delivery when another one finishes
    // must still see "done" at its next wait (`notify_waiters` wakes only tasks already
    // waiting, which left such a reader waiting out the whole receive timeout).
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let done_tx = Arc::new(done_tx);
    let wait = case.factory.receive_timeout();
    let mut readers = Vec::new();
    for _ in 0..members {
        let mut subscriber = case.subscribe(group).await;
        let seen = Arc::clone(&seen);
        let expected = expected.clone();
        let done_tx = Arc::clone(&done_tx);
        let mut done_rx = done_rx.clone();
        readers.push(tokio::spawn(async move {
            let deadline = Instant::now() + wait;
            loop {
                let complete = {
                    let seen = seen.lock().expect("lock");
                    expected.iter().all(|id| seen.contains(id))
                };
                if complete {
                    done_tx.send_replace(true);
                    break;
                }
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, subscriber.next()) => next,
                    _ = done_rx.wait_for(|done| *done) => break,
                };
                match next {
                    Ok(Some(Ok(delivery))) => {
                        if let Some(id) = delivery.message().attribute(ID_ATTRIBUTE) {
                            seen.lock().expect("lock").insert(id.to_string());
                        }
                        delivery.ack().expect("ack");
                    }
                    Ok(Some(Err(error))) => tracing::warn!(%error, "transient receive error"),
                    Ok(None) | Err(_) => break,
                }
            }
            subscriber.close().await.expect("close");
        }));
    }
    publishing.await;
    for reader in join_all(readers).await {
        reader.expect("reader task");
    }
    let seen = seen.lock().expect("lock").clone();
    seen
}

/// Case 3: 20 topics × 100 messages at once, each topic read by its own task.
pub async fn many_topics(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let tasks = (0..20).map(|t| {
        let broker = Arc::clone(&broker);
        async move {
            let case = Case::on(factory, broker, &format!("many{t}"), &["readers"]).await;
            let expected = case.publish_numbered(&format!("t{t}"), 100).await;
            case.read_all("readers", &expected, &format!("many_topics[{t}]"))
                .await;
            case.delete().await;
        }
    });
    join_all(tasks).await;
}

/// Case 8: 10 subscribers of one group subscribe and close concurrently; afterwards the group
/// still receives everything.
pub async fn concurrent_close(factory: &dyn BrokerFactory) {
    let case = Case::new(factory, "close", &["readers"]).await;
    let churn = (0..10).map(|_| async {
        let subscriber = case.subscribe("readers").await;
        subscriber.close().await.expect("close");
    });
    join_all(churn).await;
    let expected = case.publish_numbered("c", 50).await;
    case.read_all("readers", &expected, "concurrent_close")
        .await;
    case.delete().await;
}

/// Case 10: 10,000 messages from 20 tasks, then `close`: another client receives them all.
pub async fn publisher_close_loses_nothing(factory: &dyn BrokerFactory) {
    let admin = Case::new(factory, "pubclose", &["readers"]).await;
    let publisher = factory.client().await;
    let publishers = TaskPublishers {
        tasks: 20,
        prefix: "w",
        per_task: 500,
    };
    let expected = publishers.ids();
    let received = read_with_members(&admin, "readers", 1, &expected, async {
        publishers.publish(&publisher, &admin.topic, 100).await;
        publisher.close().await.expect("close publisher");
    })
    .await;
    assert_none_lost(&expected, &received, "publisher_close_loses_nothing");
    assert!(
        publisher
            .publish(&admin.topic, Message::new("late"))
            .await
            .is_err(),
        "publishing after close must fail"
    );
    admin.delete().await;
}
