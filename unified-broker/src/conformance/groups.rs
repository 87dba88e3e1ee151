//! Consumer groups, where a backend has them: every group gets every message (even ones
//! published before it existed, where retained), and members of one group share them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{timeout, Instant};

use super::{
    assert_none_lost, id_of, ids_of, numbered_messages, BrokerFactory, Case, CONSUMER_GROUPS,
    RETAINS_BEFORE_SUBSCRIPTION,
};
use crate::{Message, Subscriber};

/// Case 15: A group created after publishing still receives older messages, where retained.
pub async fn new_group_receives_old_messages(factory: &dyn BrokerFactory) {
    let promise = &RETAINS_BEFORE_SUBSCRIPTION;
    let case_name = "new_group_receives_old_messages";
    let Some(case) = Case::if_promised(factory, promise, case_name, "old", &[]).await else {
        return;
    };
    let expected = case.publish_numbered("old", 20).await;
    case.read_all("late-group", &expected, "new_group_receives_old_messages")
        .await;
    case.delete().await;
}

/// Case 16a: Two consumer groups each receive every message.
pub async fn groups_each_receive_everything(factory: &dyn BrokerFactory) {
    let groups = ["group-one", "group-two"];
    let case_name = "groups_each_receive_everything";
    let promise = &CONSUMER_GROUPS;
    let Some(case) = Case::if_promised(factory, promise, case_name, "groups", &groups).await else {
        return;
    };
    let expected = case.publish_numbered("g", 200).await;
    for group in groups {
        case.read_all(group, &expected, group).await;
    }
    case.delete().await;
}

/// Case 16b: Two members of one group split the stream: both get some, together all.
pub async fn group_members_share_the_stream(factory: &dyn BrokerFactory) {
    let promise = &CONSUMER_GROUPS;
    let case_name = "group_members_share_the_stream";
    let Some(case) = Case::if_promised(factory, promise, case_name, "share", &["workers"]).await
    else {
        return;
    };
    let mut first = case.subscribe("workers").await;
    let mut second = case.subscribe("workers").await;
    let messages: Vec<Message> = numbered_messages("s", 400)
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.with_key(format!("key-{i}")))
        .collect();
    let expected = ids_of(&messages);
    let wait = factory.receive_timeout();
    // Both members read at the same pace (a short pause per message) so neither can
    // drain the whole stream before the other has joined.
    let read = |mut subscriber: Box<dyn Subscriber>,
                expected: HashSet<String>,
                seen: Arc<std::sync::Mutex<HashMap<String, usize>>>| async move {
        let deadline = Instant::now() + wait;
        let mut mine = 0usize;
        loop {
            let all_seen = expected
                .iter()
                .all(|id| seen.lock().expect("lock").contains_key(id));
            if all_seen {
                break;
            }
            match timeout(Duration::from_millis(200), subscriber.next()).await {
                Ok(Some(Ok(delivery))) => {
                    *seen
                        .lock()
                        .expect("lock")
                        .entry(id_of(&delivery))
                        .or_insert(0) += 1;
                    mine += 1;
                    delivery.ack().expect("ack");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(Some(Err(error))) => tracing::warn!(%error, "transient receive error"),
                Ok(None) => break,
                Err(_) if Instant::now() > deadline => break,
                Err(_) => {}
            }
        }
        subscriber.close().await.expect("close");
        mine
    };
    let seen = Arc::new(std::sync::Mutex::new(HashMap::new()));
    // Let both members finish joining (some brokers rebalance) before publishing.
    case.publish(numbered_messages("warmup", 1)).await;
    let _ = timeout(Duration::from_millis(10), first.next()).await;
    let _ = timeout(Duration::from_millis(10), second.next()).await;
    case.publish(messages).await;
    let (a, b) = tokio::join!(
        read(first, expected.clone(), Arc::clone(&seen)),
        read(
            std::mem::replace(&mut second, Box::new(NeverSubscriber)),
            expected.clone(),
            Arc::clone(&seen)
        ),
    );
    let seen: HashSet<String> = seen.lock().expect("lock").keys().cloned().collect();
    assert_none_lost(&expected, &seen, "group_members_share_the_stream");
    assert!(a > 0 && b > 0, "both members take part (got {a} and {b})");
    case.delete().await;
}

/// Placeholder left behind by `mem::replace`; never polled.
struct NeverSubscriber;

#[async_trait]
impl Subscriber for NeverSubscriber {
    async fn next(&mut self) -> Option<crate::Result<crate::Delivery>> {
        None
    }
    async fn close(self: Box<Self>) -> crate::Result<()> {
        Ok(())
    }
}
