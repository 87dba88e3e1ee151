//! What the ONNX file itself says, read before the engine sees it: the one image input
//! and its shape, the output, the operators and whether the engine has them, whether
//! every value a node reads exists, and the metadata properties. Checks that would
//! otherwise surface as an engine panic or an obscure analysis error become errors that
//! name the node.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context};
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{GraphProto, ModelProto, ValueInfoProto};

use super::config::{show_dims, InputShape};
use crate::preprocess::Layout;

/// ONNX `TensorProto.DataType` of float32.
const FLOAT: i32 = 1;

/// At most this many unsupported nodes are listed in an error.
const LISTED_NODES: usize = 5;

/// The facts about a model file that loading needs.
#[derive(Clone, Debug)]
pub(crate) struct GraphInfo {
    /// Name of the image input.
    pub input_name: String,
    /// Its batch dimension: `Some(n)` when fixed in the file, `None` when dynamic.
    pub fixed_batch: Option<u64>,
    /// Its other dimensions and the layout they suggest.
    pub shape: InputShape,
    /// Op type of the node producing the (first) output, e.g. "Softmax" or "Gemm".
    pub output_op: Option<String>,
    /// `ai.onnx` operator set version (0 if the file names none).
    pub opset: i64,
    /// Who wrote the file, e.g. "pytorch 2.5".
    pub producer: String,
    /// The file's `model_version` (0 when unset).
    pub model_version: i64,
    /// `metadata_props` as a map.
    pub props: HashMap<String, String>,
    /// Number of nodes in the main graph.
    pub nodes: usize,
}

impl GraphInfo {
    /// Reads and checks `proto`; `known_op` says whether the engine implements an op type.
    pub(crate) fn of(proto: &ModelProto, known_op: impl Fn(&str) -> bool) -> anyhow::Result<Self> {
        let graph = proto
            .graph
            .as_ref()
            .context("the file holds no graph (not an ONNX model, or truncated)")?;
        check_operators(graph, known_op)?;
        check_wiring(graph)?;
        let input = single_input(graph)?;
        let (fixed_batch, shape) = input_shape(input)?;
        let output = graph.output.first().context("the graph has no output")?;
        let output_op = graph
            .node
            .iter()
            .find(|n| n.output.contains(&output.name))
            .map(|n| n.op_type.clone());
        Ok(GraphInfo {
            input_name: input.name.clone(),
            fixed_batch,
            shape,
            output_op,
            opset: opset(proto),
            producer: format!("{} {}", proto.producer_name, proto.producer_version)
                .trim()
                .to_string(),
            model_version: proto.model_version,
            props: proto
                .metadata_props
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect(),
            nodes: graph.node.len(),
        })
    }
}

/// The `ai.onnx` operator set a model imports (0 when it names none).
pub(super) fn opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version)
}

/// Every node's operator must be one the engine has; the error names the operators and
/// the first nodes using them.
fn check_operators(graph: &GraphProto, known_op: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let unknown: Vec<_> = graph
        .node
        .iter()
        .filter(|n| !known_op(&n.op_type))
        .collect();
    let Some(first) = unknown.first() else {
        return Ok(());
    };
    let mut ops: Vec<&str> = unknown.iter().map(|n| n.op_type.as_str()).collect();
    ops.sort_unstable();
    ops.dedup();
    let listed: Vec<String> = unknown
        .iter()
        .take(LISTED_NODES)
        .map(|n| {
            let domain = if n.domain.is_empty() {
                String::new()
            } else {
                format!(", domain {}", n.domain)
            };
            format!("node {:?} ({}{domain})", node_name(n), n.op_type)
        })
        .collect();
    bail!(
        "the ONNX engine (tract) does not implement operator {:?}{} used by node {:?}; \
         {} node(s) use unsupported operators ({}): {}",
        first.op_type,
        if ops.len() > 1 {
            format!(" (nor {})", ops[1..].join(", "))
        } else {
            String::new()
        },
        node_name(first),
        unknown.len(),
        ops.join(", "),
        listed.join(", ")
    )
}

/// A node's name, or its first output's when it has none (as the engine names it).
fn node_name(node: &tract_onnx::pb::NodeProto) -> &str {
    if !node.name.is_empty() {
        &node.name
    } else {
        node.output.first().map_or("(unnamed)", String::as_str)
    }
}

/// Every value a node or the graph output reads must be a graph input, an initialiser
/// or a node's output (a truncated or hand-edited file may break this; the engine
/// would panic on it).
fn check_wiring(graph: &GraphProto) -> anyhow::Result<()> {
    let mut known: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    known.extend(graph.initializer.iter().map(|t| t.name.as_str()));
    known.extend(
        graph
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str)),
    );
    for node in &graph.node {
        if let Some(missing) = node
            .input
            .iter()
            .find(|i| !i.is_empty() && !known.contains(i.as_str()))
        {
            // Values from an enclosing graph are only legal in subgraphs (If, Loop).
            bail!(
                "node {:?} ({}) reads {missing:?}, which no node, initialiser or input makes \
                 (the file is incomplete or damaged)",
                node_name(node),
                node.op_type
            );
        }
    }
    if let Some(missing) = graph
        .output
        .iter()
        .find(|o| !known.contains(o.name.as_str()))
    {
        bail!(
            "the graph output {:?} is made by no node (the file is incomplete or damaged)",
            missing.name
        );
    }
    Ok(())
}

/// The one graph input that is not an initialiser: an image classifier takes one image
/// tensor.
fn single_input(graph: &GraphProto) -> anyhow::Result<&ValueInfoProto> {
    let initialised: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initialised.contains(i.name.as_str()))
        .collect();
    match inputs[..] {
        [input] => Ok(input),
        [] => bail!("the graph has no input"),
        _ => bail!(
            "the graph has {} inputs ({}); an image classifier takes one image tensor",
            inputs.len(),
            inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The input's batch dimension and the rest, checked: float32, rank 4.
fn input_shape(input: &ValueInfoProto) -> anyhow::Result<(Option<u64>, InputShape)> {
    let name = &input.name;
    let Some(TypeValue::TensorType(tensor)) = input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        bail!("the graph input {name:?} is not a tensor");
    };
    if tensor.elem_type != FLOAT {
        bail!(
            "the graph input {name:?} has element type {} ({}); only float32 image inputs are \
             served",
            tensor.elem_type,
            elem_type_name(tensor.elem_type)
        );
    }
    let shape = tensor
        .shape
        .as_ref()
        .with_context(|| format!("the graph input {name:?} has no shape"))?;
    let dims: Vec<Option<u64>> = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(DimValue::DimValue(v)) if v > 0 => Some(v as u64),
            _ => None,
        })
        .collect();
    let [batch, a, b, c] = dims[..] else {
        bail!(
            "the graph input {name:?} has rank {} (shape [{}]); an image classifier takes \
             [batch, channels, height, width] (NCHW) or [batch, height, width, channels] (NHWC)",
            dims.len(),
            dims.iter()
                .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let is_channels = |d: Option<u64>| matches!(d, Some(1 | 3));
    let layout = match (is_channels(a), is_channels(c)) {
        (true, false) => Some(Layout::NCHW),
        (false, true) => Some(Layout::NHWC),
        // Both or neither look like a channel axis (e.g. a 3x3 input): leave it to
        // model.toml, or to NCHW when only the first could be.
        (true, true) => Some(Layout::NCHW),
        (false, false) => None,
    };
    let shape = InputShape {
        layout,
        dims: [a, b, c],
    };
    tracing::debug!(input = %name, shape = %show_dims(&shape.dims), ?batch, "ONNX input");
    Ok((batch, shape))
}

fn elem_type_name(t: i32) -> &'static str {
    match t {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        6 => "int32",
        7 => "int64",
        10 => "float16",
        11 => "float64",
        16 => "bfloat16",
        _ => "not float32",
    }
}
