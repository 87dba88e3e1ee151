//! The pump: the background task that fetches entries for one subscriber.
//!
//! It reads new entries with `XREADGROUP` on a connection of its own, runs the claim
//! rounds of `claims.rs` between reads, keeps within flow control and backs off while
//! the server is unreachable (see "Reading" in the `consumer` module docs). Decoding a
//! stream entry into a [`Message`] lives here too. Kept apart from the subscriber so the
//! read loop and its reconnection logic can be read on their own.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::claims::{claim, delete_abandoned, touch, CLAIMS_PER_CLEAN_UP};
use super::{is_transient, Item, Member, Pending, PumpSettings, Shared};
use crate::redis::{
    is_lost_group, map_error, ErrorContext, ATTRIBUTE_PREFIX, KEY_FIELD, PAYLOAD_FIELD,
};
use crate::Message;

/// Longest pause between two attempts while the server is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Decodes one stream entry into a message (see the field names in `redis/mod.rs`); fields
/// of other writers are ignored.
pub(super) fn to_message(entry: StreamId) -> (String, Message) {
    let mut message = Message::default();
    for (field, value) in entry.map {
        let bytes = match value {
            Value::BulkString(bytes) => bytes,
            Value::SimpleString(text) => text.into_bytes(),
            _ => continue,
        };
        if field == PAYLOAD_FIELD {
            message.payload = Bytes::from(bytes);
        } else if field == KEY_FIELD {
            message.key = Some(String::from_utf8_lossy(&bytes).into_owned());
        } else if let Some(name) = field.strip_prefix(ATTRIBUTE_PREFIX) {
            message.attributes.insert(
                name.to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            );
        }
    }
    (entry.id, message)
}

/// The pump: fetches and claims entries for one subscriber until stopped or the group
/// is gone (see the `consumer` module docs).
pub(super) async fn pump(
    shared: Arc<Shared>,
    client: redis::Client,
    mut manager: ConnectionManager,
    reader: MultiplexedConnection,
    deliveries: mpsc::UnboundedSender<Item>,
    mut stopped: watch::Receiver<bool>,
    settings: PumpSettings,
) {
    let member = shared.member.clone();
    let mut reader = Some(reader);
    let touch_every = settings.claim_idle / 3;
    let mut next_touch = Instant::now() + touch_every;
    // Claim at once: entries a closed member gave back wait for the next claimer.
    let mut next_claim = Instant::now();
    let mut cursor = "0-0".to_string();
    let mut claims = 0u64;
    let mut failures = 0u32;
    while !*stopped.borrow() {
        let now = Instant::now();
        if now >= next_touch {
            next_touch = now + touch_every;
            if let Err(error) = touch(&mut manager, &member, shared.held_ids()).await {
                tracing::debug!(topic = %member.topic, %error, "re-claiming held entries failed");
            }
        }
        let room = shared.room_left(&settings.options);
        if room == 0 {
            // Wait for an ack, but wake up in time to keep held entries from idling.
            tokio::select! {
                _ = stopped.changed() => {}
                _ = tokio::time::timeout_at(next_touch, shared.room.notified()) => {}
            }
            continue;
        }
        let count = room.min(settings.read_count);
        let fetched = if now >= next_claim {
            claims += 1;
            let result = claim(&mut manager, &member, &mut cursor, count, &settings).await;
            // A cursor that has not wrapped means more to scan: go on right away.
            next_claim = if cursor == "0-0" {
                now + settings.claim_interval
            } else {
                now
            };
            if result.is_ok() && claims.is_multiple_of(CLAIMS_PER_CLEAN_UP) {
                delete_abandoned(&mut manager, &member, &settings).await;
            }
            result
        } else {
            let Some(connection) = reader.as_mut() else {
                match reader_connection(&client, &settings.reader_config).await {
                    Ok((connection, id)) => {
                        shared.reader_id.store(id, Ordering::Relaxed);
                        reader = Some(connection);
                    }
                    Err(error) => {
                        failures += 1;
                        report(&deliveries, &member, &error);
                        back_off(failures, &mut stopped).await;
                    }
                }
                continue;
            };
            let block = next_claim
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), MAX_READ_BLOCK);
            read(connection, &member, count, block).await
        };
        match fetched {
            Ok(entries) => {
                failures = 0;
                for pending in entries {
                    if shared.record(&pending.id, pending.message.payload.len())
                        && deliveries.send(Item::Delivery(pending)).is_err()
                    {
                        return;
                    }
                }
            }
            Err(error) if is_lost_group(&error) => {
                tracing::info!(topic = %member.topic, group = %member.group, "the redis stream or group is gone; the subscription ends");
                let _ = deliveries.send(Item::Ended);
                return;
            }
            Err(error) => {
                failures += 1;
                if is_transient(&error) {
                    reader = None;
                }
                report(&deliveries, &member, &error);
                back_off(failures, &mut stopped).await;
            }
        }
    }
}

/// Hands a receive error to `next` (the caller logs it; `Resubscribing` counts them).
fn report(deliveries: &mpsc::UnboundedSender<Item>, member: &Member, error: &RedisError) {
    tracing::debug!(topic = %member.topic, %error, "redis read failed");
    let _ = deliveries.send(Item::Error(map_error(
        error,
        ErrorContext::Subscribe(&member.topic),
    )));
}

/// Waits before the next attempt after `failures` failures in a row (or until stopped).
async fn back_off(failures: u32, stopped: &mut watch::Receiver<bool>) {
    let pause =
        (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(8))).min(MAX_BACKOFF);
    tokio::select! {
        _ = stopped.changed() => {}
        _ = tokio::time::sleep(pause) => {}
    }
}

/// Longest wait of one blocking read. Leaving waits for the read in progress (see
/// `leave.rs`), so this bounds how long leaving takes where the server refuses
/// `CLIENT UNBLOCK` to our user (ACL rules such as `-@dangerous` exclude it); an idle
/// member costs the server ten reads a second.
const MAX_READ_BLOCK: Duration = Duration::from_millis(100);

/// A connection for the pump's blocking reads, and its id on the server (`CLIENT ID`,
/// 0 if the server does not tell), by which leaving unblocks it.
pub(super) async fn reader_connection(
    client: &redis::Client,
    config: &AsyncConnectionConfig,
) -> RedisResult<(MultiplexedConnection, i64)> {
    let mut connection = client
        .get_multiplexed_async_connection_with_config(config)
        .await?;
    let id = redis::cmd("CLIENT")
        .arg("ID")
        .query_async::<i64>(&mut connection)
        .await
        .unwrap_or_else(|error| {
            tracing::debug!(%error, "CLIENT ID refused; leaving will wait for the read in progress");
            0
        });
    Ok((connection, id))
}

/// Reads up to `count` new entries, waiting at most `block` for the first.
async fn read(
    connection: &mut MultiplexedConnection,
    member: &Member,
    count: usize,
    block: Duration,
) -> RedisResult<Vec<Pending>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&member.group)
        .arg(&member.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(&member.topic)
        .arg(">")
        .query_async(connection)
        .await?;
    Ok(reply
        .into_iter()
        .flat_map(|reply| reply.keys)
        .flat_map(|key| key.ids)
        .map(|entry| {
            let (id, message) = to_message(entry);
            Pending {
                id,
                message,
                attempt: 1,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn entries_decode_into_messages() {
        let mut map = HashMap::new();
        map.insert(
            PAYLOAD_FIELD.to_string(),
            Value::BulkString(vec![0, 159, 255]),
        );
        map.insert(
            KEY_FIELD.to_string(),
            Value::BulkString(b"the-key".to_vec()),
        );
        map.insert(
            format!("{ATTRIBUTE_PREFIX}colour"),
            Value::BulkString(b"blue".to_vec()),
        );
        map.insert("written-by-someone-else".to_string(), Value::Int(3));
        let entry = StreamId {
            id: "1-0".into(),
            map,
            ..StreamId::default()
        };
        let (id, message) = to_message(entry);
        assert_eq!(id, "1-0");
        assert_eq!(message.payload.as_ref(), &[0, 159, 255]);
        assert_eq!(message.key.as_deref(), Some("the-key"));
        assert_eq!(message.attribute("colour"), Some("blue"));
        assert_eq!(message.attributes.len(), 1);
    }
}
