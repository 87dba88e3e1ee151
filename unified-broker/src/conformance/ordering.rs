//! Ordering, where a backend promises it: messages of one key arrive in publish order.

use std::collections::HashMap;

use super::{ids_of, numbered_messages, BrokerFactory, Case, ORDERED_PER_KEY};
use crate::Message;

/// Case 4: 1,000 messages over 16 keys arrive in publish order per key (first deliveries).
pub async fn order_per_key(factory: &dyn BrokerFactory) {
    let promise = &ORDERED_PER_KEY;
    let Some(case) =
        Case::if_promised(factory, promise, "order_per_key", "ordered", &["readers"]).await
    else {
        return;
    };
    let messages: Vec<Message> = numbered_messages("o", 1000)
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.with_key(format!("key-{}", i % 16)))
        .collect();
    let expected = ids_of(&messages);
    case.publish_in_batches(&messages, 100).await;
    let received = case.read_all("readers", &expected, "order_per_key").await;
    let mut last_index: HashMap<String, usize> = HashMap::new();
    for message in &received.first_seen {
        let key = message.key.clone().expect("key survives the trip");
        let index: usize = message
            .attribute("index")
            .and_then(|i| i.parse().ok())
            .expect("index attribute");
        if let Some(previous) = last_index.insert(key.clone(), index) {
            assert!(previous < index, "{key}: {index} arrived after {previous}");
        }
    }
    case.delete().await;
}
