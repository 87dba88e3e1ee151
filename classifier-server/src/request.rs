//! One request's life outside the model: from broker message to model input, and from
//! predictions (or an error) to the reply message.
//!
//! These functions are pure and synchronous, so they can run on worker threads, be
//! fuzzed, and be tested without a broker.

use classifier_inference::ModelMetadata;
use classifier_inference::Preprocessor;
use classifier_proto::{
    attributes, ClassifyError, ClassifyRequest, ClassifyResponse, ErrorCode, Outcome, Prediction,
    Predictions, ProstMessage, CONTENT_TYPE_RESPONSE, SCHEMA_VERSION,
};
use unified_broker::Message;

use crate::decode::{decode_image_for, DecodeLimits};

/// Where a reply goes and what it answers: known even for requests whose payload could
/// not be decoded, thanks to the routing attributes the client sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyRoute {
    /// The request being answered.
    pub request_id: String,
    /// The job the request belongs to.
    pub job_id: String,
    /// Topic to publish the reply to; empty when nobody can be answered.
    pub reply_topic: String,
    /// Echoed file name.
    pub file_name: String,
    /// Echoed send time.
    pub sent_at_unix_micros: i64,
    /// Echoed attributes.
    pub attributes: std::collections::HashMap<String, String>,
    /// Predictions wanted (0: server default).
    pub top_k: u32,
}

/// A request ready for the model.
#[derive(Debug)]
pub struct PreparedInput {
    /// Who to answer.
    pub route: ReplyRoute,
    /// The preprocessed image (the model's input length).
    pub input: Vec<f32>,
}

/// A request that cannot be classified, with the reason.
#[derive(Debug)]
pub struct Rejected {
    /// Who to answer (may have an empty reply topic).
    pub route: ReplyRoute,
    /// Why.
    pub error: ClassifyError,
}

/// The longest request id (and job id) a server answers: ids are echoed in every reply
/// and logged, so an absurd one (a peer's 1 MB id) is refused as
/// [`ErrorCode::Unroutable`] before any work. Ids this system makes are 32 characters.
pub const MAX_ID_BYTES: usize = 256;

/// The longest file name echoed in a reply; longer ones are cut (on a character
/// boundary), since the name is only a label for the client.
pub const MAX_FILE_NAME_BYTES: usize = 4096;

/// A broker's topic naming rules: `Err(reason)` for a name it could never publish to.
pub type TopicNameCheck = std::sync::Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Which requests a server answers at all, checked before any work is done for them:
/// the reply topics it publishes to (the requests' routes come from anyone who can
/// write to the request topic; see `proto/README.md`, "Trust") and whether anyone still
/// waits for the answer (the request's deadline).
#[derive(Clone)]
pub struct RoutePolicy {
    /// Reply topics must start with this (`classify-replies-` by default, the
    /// client's own shape); empty allows any name the broker accepts.
    pub reply_topic_prefix: String,
    /// The broker's naming rules (`Broker::check_topic_name`): `Err(reason)` for a
    /// name the broker could never publish to.
    pub check_name: TopicNameCheck,
    /// How far past its deadline a request is still classified (the clocks of client
    /// and server may differ by this much); `None` ignores deadlines.
    pub deadline_grace: Option<std::time::Duration>,
}

impl RoutePolicy {
    /// Any non-empty reply topic: for tools and tests that answer no one.
    pub fn any() -> Self {
        RoutePolicy {
            reply_topic_prefix: String::new(),
            check_name: std::sync::Arc::new(|_| Ok(())),
            deadline_grace: None,
        }
    }

    /// `Err(reason)` when a request with this deadline (0: none) is past it, by more
    /// than the grace, at `now` (both microseconds since the Unix epoch).
    pub fn check_deadline(&self, deadline_unix_micros: i64, now: i64) -> Result<(), String> {
        let Some(grace) = self.deadline_grace else {
            return Ok(());
        };
        if deadline_unix_micros <= 0 {
            return Ok(());
        }
        let late_by = now.saturating_sub(deadline_unix_micros);
        if late_by > grace.as_micros() as i64 {
            return Err(format!(
                "the request's deadline passed {} ms before a server took it; the model was not run",
                late_by / 1000
            ));
        }
        Ok(())
    }

    /// `Err(reason)` unless `route` can be answered: a reply topic of the allowed
    /// prefix that the broker accepts, and ids of a sane length.
    pub fn check(&self, route: &ReplyRoute) -> Result<(), String> {
        if route.reply_topic.is_empty() {
            return Err("the request has no reply topic".into());
        }
        if !route.reply_topic.starts_with(&self.reply_topic_prefix) {
            return Err(format!(
                "reply topic {:?} is not one this server answers on (they start with {:?})",
                crate::log_safe::Untrusted(&route.reply_topic),
                self.reply_topic_prefix
            ));
        }
        (self.check_name)(&route.reply_topic)?;
        for (what, id) in [("request id", &route.request_id), ("job id", &route.job_id)] {
            if id.len() > MAX_ID_BYTES {
                return Err(format!(
                    "the {what} is {} bytes; at most {MAX_ID_BYTES} are answered",
                    id.len()
                ));
            }
        }
        Ok(())
    }
}

/// Decodes a broker message into a model input, or explains why it cannot be.
pub fn prepare(
    message: &Message,
    limits: &DecodeLimits,
    preprocessor: &Preprocessor,
) -> Result<PreparedInput, Box<Rejected>> {
    // Routes are not checked: this answers no one (fuzzing, tools).
    prepare_unchecked(message, limits, None, |_| Ok(preprocessor)).map(|(input, _)| input)
}

/// What [`prepare_for`] needs of the model a request names: its preprocessing.
pub trait HasPreprocessor {
    /// Image → input for this model.
    fn preprocessor(&self) -> &Preprocessor;
}

impl HasPreprocessor for &Preprocessor {
    fn preprocessor(&self) -> &Preprocessor {
        self
    }
}

/// [`prepare`] for a server of several models: `choose` maps the model name the request
/// gives (empty: none) to the model, or to the reason it is not served (an
/// `UNKNOWN_MODEL` rejection); the input is preprocessed for that model, returned with it.
/// A request whose route `policy` refuses is rejected as [`ErrorCode::Unroutable`] with
/// an empty reply topic (nobody is answered; it is dead-lettered), before its image is
/// decoded.
pub fn prepare_for<M: HasPreprocessor>(
    message: &Message,
    limits: &DecodeLimits,
    policy: &RoutePolicy,
    choose: impl FnOnce(&str) -> Result<M, String>,
) -> Result<(PreparedInput, M), Box<Rejected>> {
    prepare_unchecked(message, limits, Some(policy), choose).map_err(|rejected| {
        match policy.check(&rejected.route) {
            Ok(()) => rejected,
            Err(reason) => unroutable(rejected.route, reason),
        }
    })
}

/// [`ErrorCode::Unroutable`]: a rejection nobody is answered for.
fn unroutable(mut route: ReplyRoute, reason: String) -> Box<Rejected> {
    route.reply_topic.clear();
    reject(route, ErrorCode::Unroutable, reason)
}

/// [`prepare_for`] without the route check of rejections; a request whose route
/// `policy` (if any) refuses is rejected before its image is decoded.
fn prepare_unchecked<M: HasPreprocessor>(
    message: &Message,
    limits: &DecodeLimits,
    policy: Option<&RoutePolicy>,
    choose: impl FnOnce(&str) -> Result<M, String>,
) -> Result<(PreparedInput, M), Box<Rejected>> {
    let fallback_route = route_from_attributes(message);
    if message.payload.len() > limits.max_message_bytes {
        return Err(reject(
            fallback_route,
            ErrorCode::MessageTooLarge,
            format!(
                "the request is {} bytes; the server accepts at most {}",
                message.payload.len(),
                limits.max_message_bytes
            ),
        ));
    }
    let request = match ClassifyRequest::decode(message.payload.as_ref()) {
        Ok(request) => request,
        Err(error) => {
            return Err(reject(
                fallback_route,
                ErrorCode::MalformedRequest,
                format!("the message is not a valid ClassifyRequest: {error}"),
            ))
        }
    };
    let route = ReplyRoute {
        request_id: non_empty_or(request.request_id, fallback_route.request_id),
        job_id: non_empty_or(request.job_id, fallback_route.job_id),
        reply_topic: non_empty_or(request.reply_topic, fallback_route.reply_topic),
        file_name: cut_to(request.file_name, MAX_FILE_NAME_BYTES),
        sent_at_unix_micros: request.sent_at_unix_micros,
        attributes: request.attributes,
        top_k: request.top_k,
    };
    if let Some(Err(reason)) = policy.map(|policy| policy.check(&route)) {
        return Err(unroutable(route, reason));
    }
    if route.request_id.is_empty() {
        return Err(reject(
            route,
            ErrorCode::MalformedRequest,
            "the request has no request id",
        ));
    }
    if let Some(Err(reason)) = policy.map(|policy| {
        policy.check_deadline(
            request.deadline_unix_micros,
            classifier_proto::unix_micros_now(),
        )
    }) {
        return Err(reject(route, ErrorCode::DeadlineExceeded, reason));
    }
    let model = match choose(&request.model_name) {
        Ok(model) => model,
        Err(reason) => return Err(reject(route, ErrorCode::UnknownModel, reason)),
    };
    let needed = |w, h| model.preprocessor().decode_size_needed(w, h);
    match decode_image_for(&request.image, limits, Some(&needed)) {
        Ok(image) => {
            let input = model.preprocessor().to_input(&image);
            Ok((PreparedInput { route, input }, model))
        }
        Err(error) => Err(reject(route, error.code, error.reason)),
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(end);
    }
    text
}

fn non_empty_or(value: String, fallback: String) -> String {
    if value.is_empty() {
        fallback
    } else {
        value
    }
}

fn reject(route: ReplyRoute, code: ErrorCode, reason: impl Into<String>) -> Box<Rejected> {
    Box::new(Rejected {
        route,
        error: ClassifyError {
            code: code as i32,
            reason: reason.into(),
        },
    })
}

fn route_from_attributes(message: &Message) -> ReplyRoute {
    let get = |name: &str| message.attribute(name).unwrap_or_default().to_string();
    ReplyRoute {
        request_id: get(attributes::REQUEST_ID),
        job_id: get(attributes::JOB_ID),
        reply_topic: get(attributes::REPLY_TOPIC),
        ..ReplyRoute::default()
    }
}

/// Timing and identity stamped on every reply.
#[derive(Clone, Debug, Default)]
pub struct ReplyContext {
    /// This replica's id.
    pub server_id: String,
    /// Microseconds between receiving the request and starting its batch.
    pub queue_time_micros: u64,
    /// Microseconds the batch spent in the model.
    pub inference_time_micros: u64,
    /// Size of the batch.
    pub batch_size: u32,
}

/// The reply for a classified image: the `top_k` most probable classes.
///
/// `model` is the name the model is served under, with its metadata (class names,
/// version).
pub fn success_response(
    route: &ReplyRoute,
    probabilities: &[f32],
    (model_name, metadata): (&str, &ModelMetadata),
    default_top_k: usize,
    context: &ReplyContext,
) -> ClassifyResponse {
    let wanted = if route.top_k == 0 {
        default_top_k
    } else {
        route.top_k as usize
    };
    let mut ranked: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_k = ranked
        .into_iter()
        .take(wanted.max(1))
        .map(|(index, probability)| Prediction {
            class_name: metadata
                .class_names
                .get(index)
                .cloned()
                .unwrap_or_else(|| format!("class {index}")),
            class_index: index as u32,
            probability,
        })
        .collect();
    response(
        route,
        Outcome::Predictions(Predictions {
            top_k,
            model_name: model_name.to_string(),
            model_version: metadata.version.clone(),
        }),
        context,
    )
}

/// The reply for a request that could not be classified.
pub fn error_response(rejected: &Rejected, context: &ReplyContext) -> ClassifyResponse {
    response(
        &rejected.route,
        Outcome::Error(rejected.error.clone()),
        context,
    )
}

fn response(route: &ReplyRoute, outcome: Outcome, context: &ReplyContext) -> ClassifyResponse {
    ClassifyResponse {
        schema_version: SCHEMA_VERSION,
        request_id: route.request_id.clone(),
        job_id: route.job_id.clone(),
        outcome: Some(outcome),
        server_id: context.server_id.clone(),
        queue_time_micros: context.queue_time_micros,
        inference_time_micros: context.inference_time_micros,
        file_name: route.file_name.clone(),
        sent_at_unix_micros: route.sent_at_unix_micros,
        attributes: route.attributes.clone(),
        batch_size: context.batch_size,
    }
}

/// Wraps a response into a broker message (keyed by request id, with routing attributes).
pub fn response_message(response: &ClassifyResponse) -> Message {
    Message::new(response.encode_to_vec())
        .with_key(response.request_id.clone())
        .with_attribute(attributes::REQUEST_ID, response.request_id.clone())
        .with_attribute(attributes::JOB_ID, response.job_id.clone())
        .with_attribute(attributes::CONTENT_TYPE, CONTENT_TYPE_RESPONSE)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The shipped model's preprocessing: the tests need some model to choose.
    fn preprocessor() -> Preprocessor {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/fashion-mnist");
        let meta = ModelMetadata::load(std::path::Path::new(dir)).expect("shipped metadata");
        Preprocessor::new(&meta)
    }

    fn message(route: &str, request_id: &str) -> Message {
        let request = ClassifyRequest {
            request_id: request_id.into(),
            reply_topic: route.into(),
            image: b"not an image".to_vec(),
            ..ClassifyRequest::default()
        };
        Message::new(request.encode_to_vec())
    }

    /// The default prefix and Kafka-like naming rules (at most 249 characters, no NUL).
    fn policy() -> RoutePolicy {
        RoutePolicy {
            reply_topic_prefix: "classify-replies-".into(),
            check_name: Arc::new(|topic: &str| {
                if topic.len() > 249 || topic.contains('\0') {
                    Err("not a legal topic name".into())
                } else {
                    Ok(())
                }
            }),
            deadline_grace: Some(std::time::Duration::from_secs(1)),
        }
    }

    fn outcome(message: &Message) -> (ErrorCode, String) {
        let preprocessor = preprocessor();
        let rejected = prepare_for(message, &DecodeLimits::default(), &policy(), |_| {
            Ok(&preprocessor)
        })
        .map(|_| ())
        .expect_err("never classified: the image is text");
        let code = ErrorCode::try_from(rejected.error.code).expect("a known code");
        (code, rejected.route.reply_topic)
    }

    #[test]
    fn a_route_of_the_allowed_shape_is_answered_with_the_real_error() {
        let (code, topic) = outcome(&message("classify-replies-0d5e", "r-1"));
        assert_eq!(code, ErrorCode::UnsupportedFormat);
        assert_eq!(topic, "classify-replies-0d5e");
    }

    #[test]
    fn routes_the_server_must_not_publish_to_are_unroutable_and_answer_nobody() {
        let long_id = "i".repeat(MAX_ID_BYTES + 1);
        let huge_topic = format!("classify-replies-{}", "x".repeat(1_000_000));
        for (route, id) in [
            ("", "r-1"),
            ("someone-elses-topic", "r-1"),
            ("classify-replies-a\0b", "r-1"),
            (huge_topic.as_str(), "r-1"),
            ("classify-replies-0d5e", long_id.as_str()),
        ] {
            let (code, topic) = outcome(&message(route, id));
            assert_eq!(
                code,
                ErrorCode::Unroutable,
                "route of {} bytes",
                route.len()
            );
            assert_eq!(topic, "", "nobody is answered");
        }
    }

    #[test]
    fn an_undecodable_payload_is_checked_by_its_attributes_route() {
        let garbage = Message::new(vec![0xff, 0xff, 0xff])
            .with_attribute(attributes::REQUEST_ID, "junk")
            .with_attribute(attributes::REPLY_TOPIC, "elsewhere");
        assert_eq!(outcome(&garbage), (ErrorCode::Unroutable, String::new()));
        let answerable = Message::new(vec![0xff, 0xff, 0xff])
            .with_attribute(attributes::REQUEST_ID, "junk")
            .with_attribute(attributes::REPLY_TOPIC, "classify-replies-1");
        assert_eq!(
            outcome(&answerable),
            (ErrorCode::MalformedRequest, "classify-replies-1".into())
        );
    }

    fn with_deadline(deadline_unix_micros: i64) -> Message {
        let request = ClassifyRequest {
            request_id: "r-1".into(),
            reply_topic: "classify-replies-1".into(),
            image: b"not an image".to_vec(),
            deadline_unix_micros,
            ..ClassifyRequest::default()
        };
        Message::new(request.encode_to_vec())
    }

    #[test]
    fn a_request_past_its_deadline_and_the_grace_is_answered_deadline_exceeded() {
        let now = classifier_proto::unix_micros_now();
        let expired = outcome(&with_deadline(now - 1_500_000));
        assert_eq!(
            expired,
            (ErrorCode::DeadlineExceeded, "classify-replies-1".into())
        );
        // Within the grace, in the future, or without a deadline: the image is looked
        // at (and found to be text).
        for deadline in [now - 500_000, now + 60_000_000, 0] {
            assert_eq!(
                outcome(&with_deadline(deadline)).0,
                ErrorCode::UnsupportedFormat
            );
        }
    }

    #[test]
    fn a_policy_without_grace_ignores_deadlines() {
        let policy = RoutePolicy::any();
        assert_eq!(policy.check_deadline(1, i64::MAX), Ok(()));
        let strict = RoutePolicy {
            deadline_grace: Some(std::time::Duration::ZERO),
            ..RoutePolicy::any()
        };
        assert!(strict.check_deadline(1, 2).is_err());
        assert_eq!(strict.check_deadline(0, i64::MAX), Ok(()));
    }

    #[test]
    fn a_long_file_name_is_cut_on_a_character_boundary() {
        let name = "é".repeat(MAX_FILE_NAME_BYTES);
        let cut = cut_to(name, MAX_FILE_NAME_BYTES);
        assert!(cut.len() <= MAX_FILE_NAME_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(cut_to("short".into(), 10), "short");
    }
}
