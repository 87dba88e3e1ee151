//! The Open Inference Protocol (v2) over HTTP, as KServe, Triton, MLServer and Seldon
//! speak it, so their clients work unchanged:
//!
//! - `GET /v2` (server metadata), `GET /v2/health/live`, `GET /v2/health/ready`;
//! - `GET /v2/models` and `POST /v2/repository/index` (the models known, see
//!   [`crate::catalog`]);
//! - `GET /v2/models/{name}[/versions/{version}]` (metadata: the input, the outputs,
//!   the class names) and `.../ready`;
//! - `POST /v2/models/{name}[/versions/{version}]/infer` (bodies in [`wire`]).
//!
//! A model's version is the one its servers serve now; asking for another is 404.

pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use classifier_app::trace::TraceContext;
use classifier_proto::{ClassifyResponse, ErrorCode, Outcome};
use classifier_server::log_safe::LogLimiter;
use classifier_server::warn_limited;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::catalog::{CatalogError, ModelInfo};
use crate::dispatch::{DispatchError, ImageRequest};
use crate::error::ApiError;
use crate::Shared;
use wire::{ImageScores, InferInput, InputLimits, LABEL, PROBABILITIES};

/// The binary data extension's header: the length of the JSON part of a body.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// Longest wait for the servers when only metadata or readiness is asked.
const METADATA_WAIT: Duration = Duration::from_secs(5);

/// `GET /v2`.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "classifier-gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "classification", "model_repository"],
    }))
}

/// `GET /v2/health/live`: the process answers.
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// `GET /v2/health/ready`: replies can arrive (the reply subscription is open).
pub async fn ready(State(shared): State<Shared>) -> Response {
    let ready = shared.dispatcher.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready }))).into_response()
}

/// `GET /v2/models`: every model known, with its version and state.
pub async fn list_models(State(shared): State<Shared>) -> Json<Value> {
    Json(json!({ "models": repository(&shared).await }))
}

/// `POST /v2/repository/index` (Triton's model repository extension): the same list.
pub async fn repository_index(State(shared): State<Shared>) -> Json<Value> {
    Json(Value::Array(repository(&shared).await))
}

/// The known models, each described now (within one shared wait).
async fn repository(shared: &Shared) -> Vec<Value> {
    let deadline = Instant::now() + METADATA_WAIT;
    // The servers' default model first: asking for it learns its name.
    let _ = shared
        .catalog
        .describe(&shared.dispatcher, "", deadline)
        .await;
    let mut models = Vec::new();
    for name in shared.catalog.names() {
        let entry = match shared
            .catalog
            .describe(&shared.dispatcher, &name, deadline)
            .await
        {
            Ok(info) => json!({ "name": name, "version": info.version, "state": "READY" }),
            Err(error) => {
                json!({ "name": name, "state": "UNAVAILABLE", "reason": error.to_string() })
            }
        };
        models.push(entry);
    }
    models
}

/// `GET /v2/models/{name}`.
pub async fn model_metadata(
    State(shared): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    metadata(&shared, &name, None).await
}

/// `GET /v2/models/{name}/versions/{version}`.
pub async fn version_metadata(
    State(shared): State<Shared>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    metadata(&shared, &name, Some(&version)).await
}

async fn metadata(
    shared: &Shared,
    name: &str,
    version: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let info = describe(shared, name, version, Instant::now() + METADATA_WAIT).await?;
    Ok(Json(json!({
        "name": info.name,
        "versions": [info.version],
        "platform": "classifier",
        "inputs": [{ "name": wire::INPUT, "datatype": "BYTES", "shape": [-1] }],
        "outputs": [
            { "name": PROBABILITIES, "datatype": "FP32", "shape": [-1, info.class_names.len()] },
            { "name": LABEL, "datatype": "BYTES", "shape": [-1] },
        ],
        "parameters": { "class_names": info.class_names },
    })))
}

/// `GET /v2/models/{name}/ready`.
pub async fn model_ready(State(shared): State<Shared>, Path(name): Path<String>) -> Response {
    readiness(&shared, &name, None).await
}

/// `GET /v2/models/{name}/versions/{version}/ready`.
pub async fn version_ready(
    State(shared): State<Shared>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    readiness(&shared, &name, Some(&version)).await
}

/// 200 when a server answers for the model, else the error (404 unknown, 503 not up).
async fn readiness(shared: &Shared, name: &str, version: Option<&str>) -> Response {
    match describe(shared, name, version, Instant::now() + METADATA_WAIT).await {
        Ok(_) => Json(json!({ "name": name, "ready": true })).into_response(),
        Err(error) => error.into_response(),
    }
}

/// The model, if served in `version` (when one is named).
async fn describe(
    shared: &Shared,
    name: &str,
    version: Option<&str>,
    deadline: Instant,
) -> Result<Arc<ModelInfo>, ApiError> {
    let info = shared
        .catalog
        .describe(&shared.dispatcher, name, deadline)
        .await
        .map_err(|error| match error {
            CatalogError::Unknown(reason) => ApiError::not_found(reason),
            CatalogError::Unavailable(_) => ApiError::unavailable(error.to_string()),
        })?;
    match version {
        Some(version) if version != info.version => Err(ApiError::not_found(format!(
            "model {name:?} has no version {version:?}; the servers serve version {:?}",
            info.version
        ))),
        _ => Ok(info),
    }
}

/// `POST /v2/models/{name}/infer`.
pub async fn infer(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run_inference(&shared, &name, None, &headers, body).await
}

/// `POST /v2/models/{name}/versions/{version}/infer`.
pub async fn version_infer(
    State(shared): State<Shared>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run_inference(&shared, &name, Some(&version), &headers, body).await
}

async fn run_inference(
    shared: &Shared,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = shared.read_body(headers, body).await?;
    let json_length = header_length(headers)?;
    let limits = InputLimits {
        max_images: shared.limits.max_images,
    };
    let mut request = wire::parse_infer(&body, json_length, limits)?;
    drop(body);
    let wait = request
        .timeout
        .map_or(shared.limits.request_timeout, |asked| {
            asked.min(shared.limits.request_timeout)
        });
    let deadline = Instant::now() + wait;
    let info = describe(shared, name, version, deadline).await?;
    let top_k = top_k_needed(&request, info.class_names.len());
    let count = request.images.len() as u64;
    // The caller's W3C trace context (headers `traceparent`, `tracestate`) travels on
    // through the gateway's span, or unchanged when spans are not recorded.
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let incoming = TraceContext::from_attributes(header);
    let span = tracing::trace_span!(target: "classifier_gateway::trace", "infer", model = %info.name, images = count);
    classifier_app::trace::join(&span, incoming.as_ref());
    let trace = TraceContext::of_span(&span).or(incoming);
    // The images move into their requests: the response needs only the rest.
    let images = std::mem::take(&mut request.images)
        .into_iter()
        .map(|image| ImageRequest {
            image,
            model_name: info.name.clone(),
            top_k,
            trace: trace.clone(),
        })
        .collect();
    let replies = shared
        .dispatcher
        .classify(images, deadline)
        .await
        .map_err(|error| {
            shared.metrics.count_images("no_reply", count);
            dispatch_error(error)
        })?;
    let (version, scores) = scores_of(shared, &info, replies)?;
    shared.metrics.count_images("answered", count);
    let output = wire::render_infer((&info.name, &version), &info.class_names, &request, &scores);
    Ok(infer_response(output))
}

impl Shared {
    /// An inference request's body, within the read timeout and `max_body_bytes`.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
        let (limit, timeout) = (self.limits.max_body_bytes, self.limits.read_timeout);
        if crate::declares_more_than(headers, limit as u64) {
            return Err(body_too_large(limit));
        }
        match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(error)) if is_length_limit(&error) => Err(body_too_large(limit)),
            Ok(Err(error)) => Err(ApiError::bad_request(format!(
                "reading the request body failed: {error}"
            ))),
            Err(_elapsed) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
            )),
        }
    }
}

/// Whether reading a body failed on its size limit (rather than a broken upload).
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::too_large(format!("the request body is larger than {limit} bytes"))
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    match headers.get(HEADER_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request("Inference-Header-Content-Length must be a byte count")
            }),
    }
}

/// Predictions to ask the servers for: every class when the full `probabilities` are
/// wanted, else as many as the classification asks (at least the top one).
fn top_k_needed(request: &InferInput, classes: usize) -> u32 {
    let full = request.outputs.is_empty()
        || request
            .outputs
            .iter()
            .any(|output| output.name == PROBABILITIES && output.classification == 0);
    let wanted = if full {
        classes
    } else {
        request
            .outputs
            .iter()
            .map(|output| output.classification)
            .max()
            .unwrap_or(1)
    };
    u32::try_from(wanted.max(1)).unwrap_or(u32::MAX)
}

/// Each reply's probabilities by class index, and the version that answered; the first
/// error reply fails the request with its code.
fn scores_of(
    shared: &Shared,
    info: &ModelInfo,
    replies: Vec<ClassifyResponse>,
) -> Result<(String, Vec<ImageScores>), ApiError> {
    let mut version = info.version.clone();
    let mut scores = Vec::with_capacity(replies.len());
    for (index, reply) in replies.into_iter().enumerate() {
        match reply.outcome {
            Some(Outcome::Predictions(predictions)) => {
                shared
                    .catalog
                    .observe(&predictions.model_name, &predictions.model_version);
                version = predictions.model_version;
                let mut probabilities = vec![0.0; info.class_names.len()];
                for prediction in predictions.top_k {
                    // Indexes beyond the classes the model was described with are
                    // dropped: a reply never sets how much is allocated.
                    if let Some(slot) = probabilities.get_mut(prediction.class_index as usize) {
                        *slot = prediction.probability;
                    }
                }
                scores.push(ImageScores { probabilities });
            }
            Some(Outcome::Error(error)) => {
                let code = ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified);
                shared.metrics.count_images(code.as_str_name(), 1);
                return Err(ApiError::new(
                    status_of(code),
                    format!("image {index}: {}: {}", code.as_str_name(), error.reason),
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("image {index}: the server's reply holds no outcome"),
                ))
            }
        }
    }
    Ok((version, scores))
}

/// The HTTP status for a server's error code.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UnknownModel => StatusCode::NOT_FOUND,
        ErrorCode::ImageTooLarge | ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedFormat => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::MalformedRequest | ErrorCode::CorruptImage | ErrorCode::EmptyImage => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::Internal | ErrorCode::Unroutable | ErrorCode::Unspecified => {
            StatusCode::BAD_GATEWAY
        }
        ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
    }
}

fn dispatch_error(error: DispatchError) -> ApiError {
    let status = match &error {
        DispatchError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        DispatchError::Busy(_) | DispatchError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        DispatchError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        DispatchError::Broker(_) => StatusCode::BAD_GATEWAY,
    };
    if matches!(
        error,
        DispatchError::DeadlineExceeded | DispatchError::Broker(_) | DispatchError::Closed
    ) {
        // The operator's side of a 5xx (no server answered in time, the broker failed):
        // at most a few lines a second, however many requests fail.
        static FAILED: LogLimiter = LogLimiter::new(5, Duration::from_secs(1));
        warn_limited!(FAILED, %error, status = status.as_u16(), "an inference request failed");
    }
    ApiError::new(status, error.to_string())
}

/// JSON alone, or JSON then binary outputs with the header that says where JSON ends.
fn infer_response(output: wire::InferOutput) -> Response {
    if output.binary.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], output.json).into_response();
    }
    let json_length = HeaderValue::from(output.json.len());
    let mut body = output.json;
    body.extend_from_slice(&output.binary);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::HeaderName::from_static(HEADER_LENGTH), json_length),
        ],
        body,
    )
        .into_response()
}
