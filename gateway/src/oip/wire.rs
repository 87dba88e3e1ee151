//! The Open Inference Protocol's (v2) inference request and response bodies, in JSON and
//! with the binary tensor data extension, as pure functions over bytes.
//!
//! A model here takes one input, `image`, a `BYTES` tensor of shape `[N]` (or `[N, 1]`):
//! one encoded image per element. In JSON the elements are strings, and images are not
//! UTF-8, so they are base64-encoded there (as KServe's examples do); with the binary
//! extension (`Inference-Header-Content-Length`) they are raw, each a 4-byte
//! little-endian length and its bytes, as Triton's clients write them.
//!
//! Outputs: `probabilities` (`FP32`, `[N, classes]`, by class index) and `label`
//! (`BYTES`, `[N]`, the most probable class's name). `probabilities` with the
//! classification extension's `classification: k` parameter becomes `BYTES` `[N, k]`
//! of `"probability:index:label"`, best first, as Triton answers. An output is sent as
//! binary data when it asks for it (`binary_data: true`), or when the request asks for
//! all of them so (`binary_data_output: true`, which Triton's clients set when they name
//! no output).

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// The input's name.
pub const INPUT: &str = "image";
/// The output of class probabilities.
pub const PROBABILITIES: &str = "probabilities";
/// The output of top-1 class names.
pub const LABEL: &str = "label";

/// What the gateway needs of an inference request.
#[derive(Debug, PartialEq)]
pub struct InferInput {
    /// The request's `id`, echoed in the response.
    pub id: Option<String>,
    /// The encoded images, in order.
    pub images: Vec<Vec<u8>>,
    /// The outputs asked for, in order (empty: all, as JSON unless `binary_output`).
    pub outputs: Vec<OutputRequest>,
    /// `binary_data_output`: outputs not naming `binary_data` are sent as binary.
    pub binary_output: bool,
    /// The `timeout` parameter (microseconds, as Triton's clients send it).
    pub timeout: Option<Duration>,
}

/// One requested output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRequest {
    /// `probabilities` or `label`.
    pub name: String,
    /// The classification extension's class count (0: none).
    pub classification: usize,
    /// Whether it goes as binary data (`None`: as the request says).
    pub binary: Option<bool>,
}

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Most images in one request.
    pub max_images: usize,
}

#[derive(Deserialize)]
struct RequestBody {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<TensorBody>,
    #[serde(default)]
    outputs: Vec<RequestedOutputBody>,
}

#[derive(Deserialize)]
struct TensorBody {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestedOutputBody {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Reads an inference request: `body` is all JSON, or (with `json_length` from the
/// `Inference-Header-Content-Length` header) that much JSON followed by binary tensors.
pub fn parse_infer(
    body: &[u8],
    json_length: Option<usize>,
    limits: InputLimits,
) -> Result<InferInput, ApiError> {
    let (json_part, mut binary) = match json_length {
        Some(length) if length <= body.len() => body.split_at(length),
        Some(length) => {
            return Err(ApiError::bad_request(format!(
                "Inference-Header-Content-Length is {length} but the body has {} bytes",
                body.len()
            )))
        }
        None => (body, &[][..]),
    };
    let request: RequestBody = serde_json::from_slice(json_part).map_err(|error| {
        ApiError::bad_request(format!(
            "the request is not valid JSON for the inference protocol: {error}"
        ))
    })?;
    let [input] = <[TensorBody; 1]>::try_from(request.inputs).map_err(|inputs| {
        ApiError::bad_request(format!(
            "the model takes one input, {INPUT:?} (BYTES, one encoded image per element); the request has {}",
            inputs.len()
        ))
    })?;
    let images = read_images(&input, &mut binary, limits)?;
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes of binary data follow the inputs and belong to none",
            binary.len()
        )));
    }
    let outputs = request
        .outputs
        .into_iter()
        .map(output_request)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InferInput {
        id: request.id.map(|id| match id {
            Value::String(text) => text,
            other => other.to_string(),
        }),
        images,
        outputs,
        binary_output: flag(&request.parameters, "binary_data_output")?.unwrap_or(false),
        timeout: timeout(&request.parameters)?,
    })
}

/// The input's images, from its JSON data or from the front of `binary`.
fn read_images(
    input: &TensorBody,
    binary: &mut &[u8],
    limits: InputLimits,
) -> Result<Vec<Vec<u8>>, ApiError> {
    if input.datatype != "BYTES" {
        return Err(ApiError::bad_request(format!(
            "input {:?} must be BYTES (encoded images), not {}",
            input.name, input.datatype
        )));
    }
    let count = element_count(&input.shape, limits)?;
    let images = match (&input.data, binary_size(&input.parameters)?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "the input has both data and binary_data_size",
            ))
        }
        (None, Some(size)) => {
            if size > binary.len() {
                return Err(ApiError::bad_request(format!(
                    "binary_data_size is {size} but only {} bytes of binary data follow",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            binary_elements(mine)?
        }
        (Some(data), None) => json_elements(data)?,
        (None, None) => {
            return Err(ApiError::bad_request(
                "the input has neither data nor binary_data_size",
            ))
        }
    };
    if images.len() != count {
        return Err(ApiError::bad_request(format!(
            "the input's shape {:?} holds {count} elements but {} were sent",
            input.shape,
            images.len()
        )));
    }
    if let Some(index) = images.iter().position(Vec::is_empty) {
        return Err(ApiError::bad_request(format!("image {index} is empty")));
    }
    Ok(images)
}

/// Elements a shape holds: `[N]` or `[N, 1]`, 1 ≤ N ≤ the limit.
fn element_count(shape: &[i64], limits: InputLimits) -> Result<usize, ApiError> {
    let count = match shape {
        [n] | [n, 1] => usize::try_from(*n).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::bad_request(format!(
            "the input's shape must be [N] or [N, 1] with N images, not {shape:?}"
        ))
    })?;
    if count == 0 {
        return Err(ApiError::bad_request("the input holds no image"));
    }
    if count > limits.max_images {
        return Err(ApiError::too_large(format!(
            "{count} images in one request; at most {} are taken",
            limits.max_images
        )));
    }
    Ok(count)
}

/// BYTES elements in binary form: each a u32 little-endian length, then its bytes.
fn binary_elements(mut data: &[u8]) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut elements = Vec::new();
    while !data.is_empty() {
        let Some((length, rest)) = data.split_first_chunk::<4>() else {
            return Err(ApiError::bad_request(
                "binary BYTES data ends inside a length prefix",
            ));
        };
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(ApiError::bad_request(format!(
                "binary BYTES element of {length} bytes, but only {} bytes follow",
                rest.len()
            )));
        }
        let (element, rest) = rest.split_at(length);
        elements.push(element.to_vec());
        data = rest;
    }
    Ok(elements)
}

/// BYTES elements in JSON: strings (nested arrays are flattened, row-major), each a
/// base64-encoded image.
fn json_elements(data: &Value) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut strings = Vec::new();
    flatten_strings(data, &mut strings)?;
    strings
        .iter()
        .enumerate()
        .map(|(index, text)| {
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|error| {
                    ApiError::bad_request(format!(
                        "element {index} is not base64 ({error}): in JSON, images are base64-encoded strings (or send them raw with the binary data extension)"
                    ))
                })
        })
        .collect()
}

fn flatten_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) -> Result<(), ApiError> {
    match value {
        Value::String(text) => out.push(text),
        Value::Array(items) => {
            for item in items {
                flatten_strings(item, out)?;
            }
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "BYTES data must be strings, found {}",
                kind_of(other)
            )))
        }
    }
    Ok(())
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn output_request(output: RequestedOutputBody) -> Result<OutputRequest, ApiError> {
    if output.name != PROBABILITIES && output.name != LABEL {
        return Err(ApiError::bad_request(format!(
            "unknown output {:?}; the outputs are {PROBABILITIES:?} and {LABEL:?}",
            output.name
        )));
    }
    let classification = match output.parameters.get("classification") {
        None => 0,
        Some(value) => value
            .as_u64()
            .and_then(|k| usize::try_from(k).ok())
            .ok_or_else(|| ApiError::bad_request("classification must be a count of classes"))?,
    };
    if classification > 0 && output.name != PROBABILITIES {
        return Err(ApiError::bad_request(format!(
            "classification applies to {PROBABILITIES:?}, not {:?}",
            output.name
        )));
    }
    Ok(OutputRequest {
        binary: flag(&output.parameters, "binary_data")?,
        name: output.name,
        classification,
    })
}

fn flag(parameters: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match parameters.get(name) {
        None => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} must be true or false"
        ))),
    }
}

fn binary_size(parameters: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    match parameters.get("binary_data_size") {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|size| usize::try_from(size).ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("binary_data_size must be a byte count")),
    }
}

fn timeout(parameters: &Map<String, Value>) -> Result<Option<Duration>, ApiError> {
    match parameters.get("timeout") {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .map(|micros| Some(Duration::from_micros(micros)))
            .ok_or_else(|| ApiError::bad_request("timeout must be microseconds")),
    }
}

/// One image's answer: probability by class index and the top-1 class's name.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    /// Probability of each class, by index.
    pub probabilities: Vec<f32>,
}

/// An inference response: its JSON header and the binary data after it (empty when
/// every output is JSON).
#[derive(Debug)]
pub struct InferOutput {
    /// The JSON part.
    pub json: Vec<u8>,
    /// Binary outputs, in the order the JSON lists them.
    pub binary: Vec<u8>,
}

/// The response to `request` for `scores` (one per image) of a model with
/// `class_names`.
pub fn render_infer(
    model: (&str, &str),
    class_names: &[String],
    request: &InferInput,
    scores: &[ImageScores],
) -> InferOutput {
    let defaults = [PROBABILITIES, LABEL].map(|name| OutputRequest {
        name: name.to_string(),
        classification: 0,
        binary: None,
    });
    let wanted = if request.outputs.is_empty() {
        &defaults[..]
    } else {
        &request.outputs[..]
    };
    let mut binary = Vec::new();
    let outputs: Vec<Value> = wanted
        .iter()
        .map(|output| {
            let tensor = tensor_for(output, class_names, scores);
            let as_binary = output.binary.unwrap_or(request.binary_output);
            tensor.to_json(&output.name, as_binary, &mut binary)
        })
        .collect();
    let mut header = json!({
        "model_name": model.0,
        "model_version": model.1,
        "outputs": outputs,
    });
    if let Some(id) = &request.id {
        header["id"] = Value::String(id.clone());
    }
    InferOutput {
        json: header.to_string().into_bytes(),
        binary,
    }
}

/// An output's values.
enum Tensor {
    Fp32 {
        shape: [usize; 2],
        values: Vec<f32>,
    },
    Bytes {
        shape: Vec<usize>,
        values: Vec<String>,
    },
}

fn tensor_for(output: &OutputRequest, class_names: &[String], scores: &[ImageScores]) -> Tensor {
    let classes = class_names.len();
    let label = |index: usize| {
        class_names
            .get(index)
            .cloned()
            .unwrap_or_else(|| format!("class {index}"))
    };
    if output.name == LABEL {
        let values = scores
            .iter()
            .map(|image| {
                ranked(&image.probabilities)
                    .first()
                    .map_or_else(String::new, |&(index, _)| label(index))
            })
            .collect();
        return Tensor::Bytes {
            shape: vec![scores.len()],
            values,
        };
    }
    if output.classification == 0 {
        let mut values = Vec::with_capacity(scores.len() * classes);
        for image in scores {
            values.extend(
                (0..classes).map(|index| image.probabilities.get(index).copied().unwrap_or(0.0)),
            );
        }
        return Tensor::Fp32 {
            shape: [scores.len(), classes],
            values,
        };
    }
    let k = output.classification.min(classes.max(1));
    let values = scores
        .iter()
        .flat_map(|image| {
            let mut best = ranked(&image.probabilities);
            best.truncate(k);
            best.resize(k, (0, 0.0));
            best.into_iter()
                .map(|(index, probability)| format!("{probability:.6}:{index}:{}", label(index)))
                .collect::<Vec<_>>()
        })
        .collect();
    Tensor::Bytes {
        shape: vec![scores.len(), k],
        values,
    }
}

/// (class index, probability), most probable first, ties by index.
fn ranked(probabilities: &[f32]) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
}

impl Tensor {
    /// The output's JSON, its data inline or appended to `binary`.
    fn to_json(&self, name: &str, as_binary: bool, binary: &mut Vec<u8>) -> Value {
        let (datatype, shape, data) = match self {
            Tensor::Fp32 { shape, values } => ("FP32", shape.to_vec(), json!(values)),
            Tensor::Bytes { shape, values } => ("BYTES", shape.clone(), json!(values)),
        };
        let mut output = json!({ "name": name, "datatype": datatype, "shape": shape });
        if as_binary {
            let start = binary.len();
            self.write_binary(binary);
            output["parameters"] = json!({ "binary_data_size": binary.len() - start });
        } else {
            output["data"] = data;
        }
        output
    }

    fn write_binary(&self, out: &mut Vec<u8>) {
        match self {
            Tensor::Fp32 { values, .. } => {
                for value in values {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            Tensor::Bytes { values, .. } => {
                for value in values {
                    let length = u32::try_from(value.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&length.to_le_bytes());
                    out.extend_from_slice(value.as_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InputLimits = InputLimits { max_images: 4 };

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn binary_bytes(elements: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for element in elements {
            out.extend_from_slice(&(element.len() as u32).to_le_bytes());
            out.extend_from_slice(element);
        }
        out
    }

    #[test]
    fn json_images_are_base64_strings() {
        let body = json!({
            "id": "r1",
            "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(b"\x89PNG1"), b64(b"\xff\xd8jpeg")]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
            "parameters": {"timeout": 2500000}
        });
        let input = parse_infer(body.to_string().as_bytes(), None, LIMITS).expect("parses");
        assert_eq!(input.id.as_deref(), Some("r1"));
        assert_eq!(
            input.images,
            vec![b"\x89PNG1".to_vec(), b"\xff\xd8jpeg".to_vec()]
        );
        assert_eq!(input.outputs[0].classification, 3);
        assert_eq!(input.timeout, Some(Duration::from_micros(2_500_000)));
        assert!(!input.binary_output);
    }

    #[test]
    fn binary_images_follow_the_json_header() {
        let tensors = binary_bytes(&[b"one", b"three"]);
        let header = json!({
            "inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": tensors.len()}}],
            "parameters": {"binary_data_output": true}
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&tensors);
        let input = parse_infer(&body, Some(header.len()), LIMITS).expect("parses");
        assert_eq!(input.images, vec![b"one".to_vec(), b"three".to_vec()]);
        assert!(input.binary_output);
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        let cases = [
            (json!({"inputs": []}), "one input"),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
                "must be BYTES",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(b"a")]}]}),
                "holds 2 elements but 1",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}),
                "not base64",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]}),
                "must be strings",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}),
                "no image",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": []}]}),
                "[N] or [N, 1]",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1, 2, 3], "datatype": "BYTES", "data": []}]}),
                "[N] or [N, 1]",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}),
                "neither data",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [""]}]}),
                "image 0 is empty",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"a")]}], "outputs": [{"name": "logits"}]}),
                "unknown output",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"a")]}], "outputs": [{"name": "label", "parameters": {"classification": 2}}]}),
                "applies to",
            ),
            (
                json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"a")]}], "parameters": {"timeout": "soon"}}),
                "microseconds",
            ),
        ];
        for (body, expected) in cases {
            let error =
                parse_infer(body.to_string().as_bytes(), None, LIMITS).expect_err("refused");
            assert_eq!(error.status, 400, "{body}");
            assert!(
                error.message.contains(expected),
                "{body}: {}",
                error.message
            );
        }
        let error = parse_infer(b"{not json", None, LIMITS).expect_err("refused");
        assert!(
            error.message.contains("not valid JSON"),
            "{}",
            error.message
        );
    }

    #[test]
    fn too_many_images_is_413() {
        let body =
            json!({"inputs": [{"name": "image", "shape": [5], "datatype": "BYTES", "data": []}]});
        let error = parse_infer(body.to_string().as_bytes(), None, LIMITS).expect_err("refused");
        assert_eq!(error.status, 413);
    }

    #[test]
    fn broken_binary_data_is_refused() {
        let header = |size: usize| {
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                               "parameters": {"binary_data_size": size}}]})
            .to_string()
        };
        let cases: [(Vec<u8>, usize, &str); 4] = [
            (vec![9, 0, 0, 0, 1], 5, "only 1 bytes follow"),
            (vec![1, 0], 2, "inside a length prefix"),
            (
                binary_bytes(&[b"a"]),
                50,
                "only 5 bytes of binary data follow",
            ),
            (
                [binary_bytes(&[b"a"]), vec![0; 3]].concat(),
                5,
                "belong to none",
            ),
        ];
        for (tensors, size, expected) in cases {
            let head = header(size);
            let body = [head.as_bytes(), &tensors].concat();
            let error = parse_infer(&body, Some(head.len()), LIMITS).expect_err("refused");
            assert!(
                error.message.contains(expected),
                "{expected}: {}",
                error.message
            );
        }
        let error = parse_infer(b"{}", Some(10), LIMITS).expect_err("refused");
        assert!(
            error.message.contains("Inference-Header-Content-Length"),
            "{}",
            error.message
        );
    }

    fn classes() -> Vec<String> {
        ["Coat", "Shirt", "Bag"].map(String::from).to_vec()
    }

    fn scores() -> Vec<ImageScores> {
        vec![
            ImageScores {
                probabilities: vec![0.1, 0.2, 0.7],
            },
            ImageScores {
                probabilities: vec![0.6, 0.3, 0.1],
            },
        ]
    }

    fn request(outputs: Vec<OutputRequest>, binary_output: bool) -> InferInput {
        InferInput {
            id: Some("r9".to_string()),
            images: vec![],
            outputs,
            binary_output,
            timeout: None,
        }
    }

    #[test]
    fn default_outputs_are_probabilities_and_labels_in_json() {
        let out = render_infer(("m", "3"), &classes(), &request(vec![], false), &scores());
        assert!(out.binary.is_empty());
        let json: Value = serde_json::from_slice(&out.json).expect("json");
        assert_eq!(json["model_name"], "m");
        assert_eq!(json["model_version"], "3");
        assert_eq!(json["id"], "r9");
        assert_eq!(json["outputs"][0]["name"], "probabilities");
        assert_eq!(json["outputs"][0]["shape"], json!([2, 3]));
        assert_eq!(json["outputs"][0]["datatype"], "FP32");
        let values: Vec<f64> =
            serde_json::from_value(json["outputs"][0]["data"].clone()).expect("floats");
        assert_eq!(values.len(), 6);
        assert!((values[2] - 0.7).abs() < 1e-6);
        assert_eq!(json["outputs"][1]["data"], json!(["Bag", "Coat"]));
    }

    #[test]
    fn classification_gives_triton_style_strings_best_first() {
        let wanted = vec![OutputRequest {
            name: PROBABILITIES.to_string(),
            classification: 2,
            binary: None,
        }];
        let out = render_infer(("m", "3"), &classes(), &request(wanted, false), &scores());
        let json: Value = serde_json::from_slice(&out.json).expect("json");
        assert_eq!(json["outputs"][0]["shape"], json!([2, 2]));
        assert_eq!(
            json["outputs"][0]["data"],
            json!([
                "0.700000:2:Bag",
                "0.200000:1:Shirt",
                "0.600000:0:Coat",
                "0.300000:1:Shirt"
            ])
        );
    }

    #[test]
    fn binary_outputs_follow_the_json_with_their_sizes() {
        let out = render_infer(("m", "3"), &classes(), &request(vec![], true), &scores());
        let json: Value = serde_json::from_slice(&out.json).expect("json");
        let probabilities = json["outputs"][0]["parameters"]["binary_data_size"].as_u64();
        let labels = json["outputs"][1]["parameters"]["binary_data_size"].as_u64();
        assert_eq!(probabilities, Some(24));
        assert_eq!(labels, Some(4 + 3 + 4 + 4));
        assert!(json["outputs"][0].get("data").is_none());
        assert_eq!(out.binary.len(), 24 + 15);
        assert_eq!(&out.binary[8..12], &0.7f32.to_le_bytes());
        assert_eq!(&out.binary[24..31], b"\x03\0\0\0Bag");
    }
}
