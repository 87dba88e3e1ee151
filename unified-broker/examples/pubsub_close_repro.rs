//! Measures when a message that a Pub/Sub subscriber held (or nacked) as it closed comes
//! back to the next subscriber of the group: the minimal reproduction behind the
//! `continue_after_subscriber_close` conformance case on the emulator.
//!
//! ```text
//! PUBSUB_EMULATOR_HOST=127.0.0.1:8085 cargo run -p unified-broker --example pubsub_close_repro -- hold 1
//! ```
//!
//! Arguments: `hold` (keep the delivery across the close: the shutdown nacks it) or `nack`
//! (nack it, then close), and how many messages to publish (the first one received is the
//! held one; the others stay in flight in the closing subscriber, as in the conformance
//! case). Prints UTC timestamps of every step, comparable with a wire log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use unified_broker::conformance::{numbered_messages, setup_topic, unique_name, ID_ATTRIBUTE};
use unified_broker::pubsub::{PubSubBroker, PubSubConfig};
use unified_broker::{Broker, SubscribeOptions};

/// How long the second subscriber waits for the held message.
const WAIT_FOR_RETURN: Duration = Duration::from_secs(120);

fn stamp() -> String {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds_today = since_epoch.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        seconds_today / 3600,
        seconds_today / 60 % 60,
        seconds_today % 60,
        since_epoch.subsec_micros()
    )
}

macro_rules! say {
    ($($arg:tt)*) => { println!("{} repro: {}", stamp(), format!($($arg)*)) };
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "hold".into());
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1);
    let broker = PubSubBroker::connect(&PubSubConfig {
        ack_deadline_seconds: 10,
        ..PubSubConfig::default()
    })
    .await?;
    let topic = unique_name("repro");
    setup_topic(&broker, &topic, &["readers"]).await;
    broker
        .publish_batch(&topic, numbered_messages("m", count))
        .await?;
    say!("published {count} on {topic}; mode {mode}");

    let mut first = broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await?;
    let delivery = first.next().await.ok_or("stream ended")??;
    let held_id = delivery
        .message()
        .attribute(ID_ATTRIBUTE)
        .unwrap_or_default()
        .to_string();
    say!("first subscriber received {held_id}");
    let kept = match mode.as_str() {
        "nack" => {
            delivery.nack()?;
            say!("nacked {held_id}");
            None
        }
        _ => Some(delivery),
    };
    say!("close start");
    first.close().await?;
    say!("close end");
    drop(kept);

    let mut second = broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await?;
    say!("second subscriber open");
    let started = tokio::time::Instant::now();
    let mut others = 0usize;
    loop {
        let Ok(next) = tokio::time::timeout_at(started + WAIT_FOR_RETURN, second.next()).await
        else {
            say!("NOT BACK: {held_id} did not return within {WAIT_FOR_RETURN:?} ({others} others received)");
            break;
        };
        let delivery = next.ok_or("stream ended")??;
        let id = delivery
            .message()
            .attribute(ID_ATTRIBUTE)
            .unwrap_or_default()
            .to_string();
        let attempt = delivery.attempt();
        delivery.ack()?;
        if id == held_id {
            say!(
                "BACK: {held_id} returned after {:.1}s (attempt {attempt:?}; {others} others before it)",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        others += 1;
    }
    second.close().await?;
    broker.delete_topic(&topic).await?;
    Ok(())
}
