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

use crate::decode::{decode_image, DecodeLimits};

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

/// Decodes a broker message into a model input, or explains why it cannot be.
pub fn prepare(
    message: &Message,
    limits: &DecodeLimits,
    preprocessor: &Preprocessor,
) -> Result<PreparedInput, Box<Rejected>> {
    prepare_for(message, limits, |_| Ok(preprocessor)).map(|(input, _)| input)
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
pub fn prepare_for<M: HasPreprocessor>(
    message: &Message,
    limits: &DecodeLimits,
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
        file_name: request.file_name,
        sent_at_unix_micros: request.sent_at_unix_micros,
        attributes: request.attributes,
        top_k: request.top_k,
    };
    if route.request_id.is_empty() {
        return Err(reject(
            route,
            ErrorCode::MalformedRequest,
            "the request has no request id",
        ));
    }
    let model = match choose(&request.model_name) {
        Ok(model) => model,
        Err(reason) => return Err(reject(route, ErrorCode::UnknownModel, reason)),
    };
    match decode_image(&request.image, limits) {
        Ok(image) => {
            let input = model.preprocessor().to_input(&image);
            Ok((PreparedInput { route, input }, model))
        }
        Err(error) => Err(reject(route, error.code, error.reason)),
    }
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
