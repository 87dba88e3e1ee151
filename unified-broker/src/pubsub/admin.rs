//! Idempotent admin of topics and subscriptions (REST/JSON under the hood).

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};

use super::config::Connection;
use super::errors::{self, code};
use super::names::{subscription_id, subscription_path, topic_id, topic_path};
use crate::{BrokerError, Result};

/// Topic and subscription admin clients of one project.
#[derive(Clone, Debug)]
pub(crate) struct Admin {
    project: String,
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
    ack_deadline_seconds: i32,
    ordering: bool,
}

impl Admin {
    pub(crate) async fn new(
        project: &str,
        connection: &Connection,
        ack_deadline_seconds: u32,
        ordering: bool,
    ) -> Result<Self> {
        let mut topics = TopicAdmin::builder().with_credentials(connection.credentials.clone());
        let mut subscriptions =
            SubscriptionAdmin::builder().with_credentials(connection.credentials.clone());
        if let Some(endpoint) = &connection.endpoint {
            topics = topics.with_endpoint(endpoint.clone());
            subscriptions = subscriptions.with_endpoint(endpoint.clone());
        }
        Ok(Admin {
            project: project.to_string(),
            topics: topics
                .build()
                .await
                .map_err(|e| errors::builder("topic admin", &e))?,
            subscriptions: subscriptions
                .build()
                .await
                .map_err(|e| errors::builder("subscription admin", &e))?,
            ack_deadline_seconds: i32::try_from(ack_deadline_seconds).unwrap_or(600),
            ordering,
        })
    }

    /// Full topic path, after checking the name is a valid id.
    pub(crate) fn topic_path(&self, topic: &str) -> Result<String> {
        Ok(topic_path(&self.project, topic_id(topic)?))
    }

    /// Full path of the subscription standing for `group` on `topic`.
    pub(crate) fn subscription_path(&self, topic: &str, group: &str) -> String {
        subscription_path(&self.project, &subscription_id(topic, group))
    }

    /// Lists one topic of the project: whether the service (or emulator) answers.
    pub(crate) async fn ping(&self) -> Result<()> {
        self.topics
            .list_topics()
            .set_project(format!("projects/{}", self.project))
            .set_page_size(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| errors::admin("list topics", &e))
    }

    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let path = self.topic_path(topic)?;
        match self.topics.create_topic().set_name(&path).send().await {
            Ok(_) => {
                tracing::debug!(topic = %path, "created topic");
                Ok(())
            }
            Err(e) if code(&e) == Some(Code::AlreadyExists) => Ok(()),
            Err(e) => Err(errors::admin(&format!("create topic {path}"), &e)),
        }
    }

    /// Deletes the topic and every subscription attached to it: Pub/Sub would leave
    /// them detached (receiving nothing, still counting against quotas), whereas a
    /// deleted topic's consumer groups are gone on every other backend.
    pub(crate) async fn delete_topic(&self, topic: &str) -> Result<()> {
        let path = self.topic_path(topic)?;
        for subscription in self.topic_subscriptions(&path).await? {
            self.delete_subscription_path(&subscription).await?;
        }
        match self.topics.delete_topic().set_topic(&path).send().await {
            Ok(_) => {
                tracing::debug!(topic = %path, "deleted topic");
                Ok(())
            }
            Err(e) if code(&e) == Some(Code::NotFound) => Ok(()),
            Err(e) => Err(errors::admin(&format!("delete topic {path}"), &e)),
        }
    }

    async fn topic_subscriptions(&self, topic_path: &str) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .topics
                .list_topic_subscriptions()
                .set_topic(topic_path)
                .set_page_token(token)
                .send()
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) if code(&e) == Some(Code::NotFound) => return Ok(found),
                Err(e) => {
                    return Err(errors::admin(
                        &format!("list subscriptions of {topic_path}"),
                        &e,
                    ))
                }
            };
            found.extend(page.subscriptions);
            if page.next_page_token.is_empty() {
                return Ok(found);
            }
            token = page.next_page_token;
        }
    }

    /// Creates the group's subscription if needed; returns its full path.
    pub(crate) async fn ensure_subscription(&self, topic: &str, group: &str) -> Result<String> {
        let topic_path = self.topic_path(topic)?;
        let path = self.subscription_path(topic, group);
        let created = self
            .subscriptions
            .create_subscription()
            .set_name(&path)
            .set_topic(&topic_path)
            .set_ack_deadline_seconds(self.ack_deadline_seconds)
            .set_enable_message_ordering(self.ordering)
            .send()
            .await;
        match created {
            Ok(_) => {
                tracing::debug!(subscription = %path, topic = %topic_path, ordering = self.ordering, "created subscription");
                Ok(path)
            }
            Err(e) if code(&e) == Some(Code::AlreadyExists) => Ok(path),
            Err(e) if code(&e) == Some(Code::NotFound) => {
                Err(BrokerError::TopicNotFound(topic.to_string()))
            }
            Err(e) => Err(errors::admin(&format!("create subscription {path}"), &e)),
        }
    }

    pub(crate) async fn delete_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.delete_subscription_path(&self.subscription_path(topic, group))
            .await
    }

    async fn delete_subscription_path(&self, path: &str) -> Result<()> {
        match self
            .subscriptions
            .delete_subscription()
            .set_subscription(path)
            .send()
            .await
        {
            Ok(_) => {
                tracing::debug!(subscription = %path, "deleted subscription");
                Ok(())
            }
            Err(e) if code(&e) == Some(Code::NotFound) => Ok(()),
            Err(e) => Err(errors::admin(&format!("delete subscription {path}"), &e)),
        }
    }
}
