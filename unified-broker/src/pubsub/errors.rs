//! Maps the client library's errors onto [`BrokerError`].

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::Error as GaxError;

use crate::BrokerError;

/// The gRPC/HTTP status code of an error, if the service answered at all.
pub(crate) fn code(error: &GaxError) -> Option<Code> {
    error.status().map(|status| status.code)
}

/// Whether the service could not be reached or the call broke in transit.
fn is_unreachable(error: &GaxError) -> bool {
    // No status at all means the service never answered (the REST admin client reports
    // a refused connection that way, without `is_connect`).
    code(error).is_none()
        || error.is_connect()
        || error.is_io()
        || error.is_transport()
        || error.is_timeout()
        || matches!(
            code(error),
            Some(Code::Unavailable | Code::DeadlineExceeded | Code::Aborted)
        )
}

/// The client could not make credentials and says no retry will (a key file that does
/// not parse, a token endpoint that refuses the account): a configuration error, final.
/// A transient failure (the token endpoint unreachable) is not one.
fn is_credentials_failure(error: &GaxError) -> bool {
    use std::error::Error as _;
    error.is_authentication()
        && error
            .source()
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|c| !c.is_transient())
}

/// The error for [`is_credentials_failure`]: final, and naming the credentials.
fn credentials(what: &str, error: &GaxError) -> BrokerError {
    BrokerError::Config(format!(
        "{what}: the Pub/Sub credentials cannot be used (credentials_file or Application \
         Default Credentials): {error}"
    ))
}

/// The service refused a publish for its size ("Request payload size exceeds the limit",
/// "message too large"): final, the same request is refused again.
fn is_size_rejection(error: &GaxError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    matches!(
        code(error),
        Some(Code::InvalidArgument | Code::ResourceExhausted)
    ) && (text.contains("size") || text.contains("too large"))
}

/// The service refused a publish for its topic's name (`Invalid [topics] name`, `Invalid
/// resource name`): final, the same name is refused again. Names are checked before
/// publishing ([`super::names`]), so this is the service's word on a rule we do not
/// know of.
fn is_name_rejection(error: &GaxError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    code(error) == Some(Code::InvalidArgument)
        && (text.contains("topic") || text.contains("resource name"))
}

/// An admin call (create/delete of topics and subscriptions) failed.
pub(crate) fn admin(what: &str, error: &GaxError) -> BrokerError {
    if is_credentials_failure(error) {
        credentials(what, error)
    } else if is_unreachable(error) {
        BrokerError::Unavailable(format!("{what}: {error}"))
    } else {
        BrokerError::Admin(format!("{what}: {error}"))
    }
}

/// A publish was not confirmed.
pub(crate) fn publish(topic: &str, error: &PublishError) -> BrokerError {
    match error {
        PublishError::Rpc(source) if code(source) == Some(Code::NotFound) => {
            BrokerError::TopicNotFound(topic.to_string())
        }
        PublishError::Rpc(source) if is_size_rejection(source) => {
            BrokerError::MessageTooLarge { size: 0, limit: 0 }
        }
        PublishError::Rpc(source) if is_name_rejection(source) => {
            BrokerError::invalid_topic(topic, format!("refused by Pub/Sub: {source}"))
        }
        PublishError::Rpc(source) if is_credentials_failure(source) => {
            credentials(&format!("publish to {topic}"), source)
        }
        PublishError::Rpc(source) if is_unreachable(source) => {
            BrokerError::Unavailable(format!("publish to {topic}: {source}"))
        }
        PublishError::Shutdown => BrokerError::Closed,
        other => BrokerError::Publish {
            topic: topic.to_string(),
            reason: other.to_string(),
        },
    }
}

/// The streaming pull failed.
pub(crate) fn subscribe(subscription: &str, error: &GaxError) -> BrokerError {
    if is_credentials_failure(error) {
        credentials(&format!("streaming pull of {subscription}"), error)
    } else if is_unreachable(error) {
        BrokerError::Unavailable(format!("streaming pull of {subscription}: {error}"))
    } else {
        BrokerError::Subscribe(format!("streaming pull of {subscription}: {error}"))
    }
}

/// Building a client failed (bad endpoint, credentials).
pub(crate) fn builder(what: &str, error: &google_cloud_gax::client_builder::Error) -> BrokerError {
    if error.is_transport() {
        BrokerError::Unavailable(format!("pubsub {what} client: {error}"))
    } else {
        BrokerError::Config(format!("pubsub {what} client: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use google_cloud_gax::error::rpc::Status;

    use super::*;

    fn refused(code: Code, message: &str) -> PublishError {
        let status = Status::default().set_code(code).set_message(message);
        PublishError::Rpc(Arc::new(GaxError::service(status)))
    }

    #[test]
    fn what_can_never_succeed_is_final() {
        let name = refused(
            Code::InvalidArgument,
            "Invalid [topics] name: (name=projects/p/topics/goog)",
        );
        let error = publish("goog", &name);
        assert!(
            matches!(error, BrokerError::InvalidTopic { .. }),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        let size = refused(
            Code::InvalidArgument,
            "Request payload size exceeds the limit: 10485760 bytes.",
        );
        assert!(matches!(
            publish("t", &size),
            BrokerError::MessageTooLarge { .. }
        ));
        let missing = refused(Code::NotFound, "Resource not found");
        assert!(matches!(
            publish("t", &missing),
            BrokerError::TopicNotFound(_)
        ));
        let away = refused(Code::Unavailable, "try again");
        assert!(publish("t", &away).is_retryable());
    }
}
