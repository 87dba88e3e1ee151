//! Taking over entries that other members left idle, and keeping our own from idling.
//!
//! `XAUTOCLAIM` (with `XPENDING` for the delivery counts) takes over entries left idle
//! for `claim_idle_ms`; `XCLAIM … JUSTID` to ourselves resets the idle time of what this
//! subscriber holds; a Lua script deletes consumers that dead members left behind (see
//! "Taking over what others left" in the `consumer` module docs). Separate from the pump
//! because these are the group-wide, ownership-changing commands, with their scripts.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamPendingCountReply};
use redis::{RedisResult, Value};

use super::read::to_message;
use super::{Member, Pending, PumpSettings, PAGE};

/// Claim rounds between two clean-ups of consumers that dead members left behind.
pub(super) const CLAIMS_PER_CLEAN_UP: u64 = 30;

/// Deletes every consumer of group `ARGV[1]` on stream `KEYS[1]`, other than `ARGV[3]`,
/// that holds no pending entry and has been idle for more than `ARGV[2]` ms. Returns how
/// many it deleted. A live consumer it deletes loses nothing (it held nothing) and is
/// re-created by its next read.
const DELETE_ABANDONED: &str = r#"
local deleted = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local fields = {}
    for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
    if fields['name'] ~= ARGV[3] and fields['pending'] == 0
        and fields['idle'] > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
        deleted = deleted + 1
    end
end
return deleted
"#;

/// Takes over up to `count` entries of the group idle for `claim_idle` or longer
/// (`XAUTOCLAIM` from `cursor`, which it advances), with their delivery counts.
pub(super) async fn claim(
    manager: &mut ConnectionManager,
    member: &Member,
    cursor: &mut String,
    count: usize,
    settings: &PumpSettings,
) -> RedisResult<Vec<Pending>> {
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(&member.topic)
        .arg(&member.group)
        .arg(&member.consumer)
        .arg(settings.claim_idle.as_millis() as u64)
        .arg(cursor.as_str())
        .arg("COUNT")
        .arg(count)
        .query_async(manager)
        .await?;
    *cursor = reply.next_stream_id;
    if !reply.deleted_ids.is_empty() {
        tracing::warn!(
            topic = %member.topic,
            group = %member.group,
            lost = reply.deleted_ids.len(),
            "unacked entries were trimmed from the stream (MAXLEN) before they were processed: lost"
        );
    }
    let (Some(first), Some(last)) = (reply.claimed.first(), reply.claimed.last()) else {
        return Ok(Vec::new());
    };
    // Claimed entries come in id order; their counts now include this delivery.
    let counts: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(&member.topic)
        .arg(&member.group)
        .arg(&first.id)
        .arg(&last.id)
        .arg(reply.claimed.len())
        .arg(&member.consumer)
        .query_async(manager)
        .await?;
    let counts: HashMap<String, usize> = counts
        .ids
        .into_iter()
        .map(|entry| (entry.id, entry.times_delivered))
        .collect();
    tracing::info!(topic = %member.topic, group = %member.group, count = reply.claimed.len(), "took over entries left idle by other members");
    Ok(reply
        .claimed
        .into_iter()
        .map(|entry| {
            let attempt = counts
                .get(&entry.id)
                .and_then(|&count| u32::try_from(count).ok())
                .unwrap_or(2);
            let (id, message) = to_message(entry);
            Pending {
                id,
                message,
                attempt,
            }
        })
        .collect())
}

/// Resets the idle time of the entries this subscriber holds (`XCLAIM` to itself,
/// `JUSTID`: no delivery counted), so no other member takes them over while they are
/// being worked on.
pub(super) async fn touch(
    manager: &mut ConnectionManager,
    member: &Member,
    held: Vec<String>,
) -> RedisResult<()> {
    for ids in held.chunks(PAGE) {
        claim_for_self(manager, member, ids, Duration::ZERO).await?;
    }
    Ok(())
}

/// Deletes consumers that hold nothing and have been idle for long: what members that
/// died (or could not delete themselves) leave behind. Best effort.
pub(super) async fn delete_abandoned(
    manager: &mut ConnectionManager,
    member: &Member,
    settings: &PumpSettings,
) {
    let idle = (settings.claim_idle * 2).max(settings.claim_interval * 10);
    let deleted = redis::cmd("EVAL")
        .arg(DELETE_ABANDONED)
        .arg(1)
        .arg(&member.topic)
        .arg(&member.group)
        .arg(idle.as_millis() as u64)
        .arg(&member.consumer)
        .query_async::<i64>(manager)
        .await;
    match deleted {
        Ok(0) => {}
        Ok(count) => {
            tracing::info!(topic = %member.topic, group = %member.group, count, "deleted abandoned consumers")
        }
        Err(error) => {
            tracing::debug!(topic = %member.topic, %error, "cleaning up abandoned consumers failed")
        }
    }
}

/// `XCLAIM`s `ids` (those still pending) for `member` itself with the given idle time,
/// without counting a delivery (`JUSTID`).
pub(super) async fn claim_for_self(
    manager: &mut ConnectionManager,
    member: &Member,
    ids: &[String],
    idle: Duration,
) -> RedisResult<()> {
    redis::cmd("XCLAIM")
        .arg(&member.topic)
        .arg(&member.group)
        .arg(&member.consumer)
        .arg(0)
        .arg(ids)
        .arg("IDLE")
        .arg(idle.as_millis() as u64)
        .arg("JUSTID")
        .query_async::<Value>(manager)
        .await
        .map(|_| ())
}
