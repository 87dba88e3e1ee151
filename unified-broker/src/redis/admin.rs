//! Stream and consumer-group admin for Redis.
//!
//! - `ensure_topic` creates an empty stream if the key does not exist, atomically (a
//!   script: `XADD … MAXLEN 0` adds a placeholder entry and trims it at once). A key
//!   that holds something other than a stream is an error, not silently reused: final
//!   ([`BrokerError::InvalidTopic`]), as is publishing or subscribing to such a key.
//! - Groups are created at the end of the stream (`XGROUP CREATE … $`), "already
//!   exists" (`BUSYGROUP`) counting as success. `ensure_subscription` creates the stream
//!   too if needed (`MKSTREAM`); `subscribe` requires it.
//! - Deleting a missing stream or group succeeds (idempotent).
//! - A group's backlog is read from `XINFO GROUPS` (see [`RedisBroker::group_backlog`]).

use redis::streams::{StreamInfoGroup, StreamInfoGroupsReply};

use super::{map_error, not_a_stream, ErrorContext, RedisBroker};
use crate::{Backlog, BrokerError, Result};

/// Creates an empty stream at `KEYS[1]` unless the key exists; fails if it exists and is
/// not a stream. Returns 1 if it created the stream.
const CREATE_STREAM: &str = r#"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
    redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'created', '1')
    return 1
elseif kind ~= 'stream' then
    return redis.error_reply('WRONGTYPE key ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a stream')
end
return 0
"#;

/// Whether a server error says the stream does not exist (XGROUP on a missing key).
fn is_missing_key(error: &redis::RedisError) -> bool {
    error.to_string().contains("requires the key to exist")
}

impl RedisBroker {
    /// Creates stream `topic` unless it exists.
    pub(super) async fn create_stream(&self, topic: &str) -> Result<()> {
        let created: i64 = redis::cmd("EVAL")
            .arg(CREATE_STREAM)
            .arg(1)
            .arg(topic)
            .query_async(&mut self.manager())
            .await
            .map_err(|error| map_error(&error, ErrorContext::Admin(topic)))?;
        if created == 1 {
            tracing::info!(topic, "created redis stream");
        } else {
            tracing::debug!(topic, "redis stream already exists");
        }
        Ok(())
    }

    /// Deletes stream `topic` (and its groups) if it exists.
    pub(super) async fn remove_stream(&self, topic: &str) -> Result<()> {
        let deleted: i64 = redis::cmd("DEL")
            .arg(topic)
            .query_async(&mut self.manager())
            .await
            .map_err(|error| map_error(&error, ErrorContext::Admin(topic)))?;
        tracing::info!(topic, existed = deleted > 0, "deleted redis stream");
        Ok(())
    }

    /// Creates group `group` on `topic` at the end of the stream unless it exists;
    /// creates the stream too if `make_stream`, otherwise a missing stream is
    /// `TopicNotFound`.
    pub(super) async fn create_group(
        &self,
        topic: &str,
        group: &str,
        make_stream: bool,
    ) -> Result<()> {
        let mut command = redis::cmd("XGROUP");
        command.arg("CREATE").arg(topic).arg(group).arg("$");
        if make_stream {
            command.arg("MKSTREAM");
        }
        match command.query_async::<()>(&mut self.manager()).await {
            Ok(()) => {
                tracing::info!(topic, group, "created redis consumer group");
                Ok(())
            }
            Err(error) if error.code() == Some("BUSYGROUP") => {
                tracing::debug!(topic, group, "redis consumer group already exists");
                Ok(())
            }
            Err(error) if is_missing_key(&error) => Err(BrokerError::TopicNotFound(topic.into())),
            Err(error) => Err(map_error(&error, ErrorContext::Admin(topic))),
        }
    }

    /// Destroys group `group` on `topic` (with its pending entries) if it exists.
    pub(super) async fn remove_group(&self, topic: &str, group: &str) -> Result<()> {
        let destroyed = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(topic)
            .arg(group)
            .query_async::<i64>(&mut self.manager())
            .await;
        match destroyed {
            Ok(count) => {
                tracing::info!(
                    topic,
                    group,
                    existed = count > 0,
                    "destroyed redis consumer group"
                );
                Ok(())
            }
            Err(error) if is_missing_key(&error) => {
                tracing::debug!(
                    topic,
                    group,
                    "stream of the group to destroy does not exist"
                );
                Ok(())
            }
            Err(error) => Err(map_error(&error, ErrorContext::Admin(topic))),
        }
    }

    /// The backlog of `group` on stream `topic`, from `XINFO GROUPS` (one command, no
    /// member added): `lag` waiting, `pending` in flight, `entries-read` consumed. `None`
    /// when Redis cannot compute the lag (`nil`: entries deleted with `XDEL` inside the
    /// part the group has not read, or a group moved with `XGROUP SETID` without
    /// `ENTRIESREAD`; no field at all before Redis 7.0): no count is better than a wrong
    /// one. A group that does not exist has no backlog; a missing stream is
    /// `TopicNotFound`.
    pub(super) async fn group_backlog(&self, topic: &str, group: &str) -> Result<Option<Backlog>> {
        let reply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(topic)
            .query_async::<StreamInfoGroupsReply>(&mut self.manager())
            .await;
        let groups = match reply {
            Ok(reply) => reply.groups,
            Err(error) if error.to_string().contains("no such key") => {
                return Err(BrokerError::TopicNotFound(topic.to_string()))
            }
            Err(error) => return Err(map_error(&error, ErrorContext::Admin(topic))),
        };
        let Some(info) = groups.into_iter().find(|info| info.name == group) else {
            tracing::debug!(topic, group, "no such redis consumer group: no backlog");
            return Ok(Some(Backlog::default()));
        };
        Ok(backlog_of(&info))
    }

    /// Fails with `TopicNotFound` unless `topic` is a stream.
    pub(super) async fn require_topic(&self, topic: &str) -> Result<()> {
        let kind: String = redis::cmd("TYPE")
            .arg(topic)
            .query_async(&mut self.manager())
            .await
            .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
        match kind.as_str() {
            "stream" => Ok(()),
            "none" => Err(BrokerError::TopicNotFound(topic.to_string())),
            other => Err(not_a_stream(topic, other)),
        }
    }
}

/// A group's [`Backlog`] from its `XINFO GROUPS` entry; `None` without a `lag`.
fn backlog_of(info: &StreamInfoGroup) -> Option<Backlog> {
    let Some(lag) = info.lag else {
        tracing::debug!(group = %info.name, "redis cannot tell the group's lag now");
        return None;
    };
    Some(Backlog {
        waiting: lag as u64,
        in_flight: Some(info.pending as u64),
        consumed: info.entries_read.map(|read| read as u64),
    })
}
