//! An ONNX classifier cut at its feature layer, and a new head put on the cut (for
//! fine-tuning: `trainer train --from`). Both work on the graph itself, so every engine
//! that runs the original runs the results.
//!
//! **The cut.** The feature layer is the input of the last linear layer: from the graph's
//! output, walk back through what only reshapes or squashes the scores (`Softmax`,
//! `Flatten`, `Identity`, …) to the first linear layer met: a `Gemm` (torchvision, timm:
//! `… → GlobalAveragePool → Flatten → Gemm`), a `MatMul` by a constant plus an `Add` of a
//! constant (Keras through tf2onnx: `… → ReduceMean → MatMul → Add → Softmax`), or a 1×1
//! `Conv` by a constant. Its data input is the feature tensor.
//! Anything else is an error that asks for `--feature-node` and lists the last tensors.
//!
//! **The features graph** ([`features_model`]): the same graph with that tensor as its only
//! output and every node it does not need removed.
//!
//! **The new head** ([`with_head`]): the features graph, then `Flatten` (axis 1) and a
//! `Gemm` per layer (PyTorch `Linear` weights, `transB = 1`) with `Relu` between layers;
//! the output `head.logits` holds one row of class logits per image (`head_1.…` when
//! the backbone already has `head.…` names, as a model fine-tuned here does).

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context};
use tract_onnx::pb::{type_proto, GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto};

use super::export::{int, node, tensor, value_info, FLOAT};
use super::graph::opset;

/// Ops between the last linear layer and the output that only reshape or squash the
/// scores: the walk back from the output passes through them.
const PASS_THROUGH: [&str; 10] = [
    "Softmax",
    "LogSoftmax",
    "Sigmoid",
    "Identity",
    "Dropout",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Cast",
];

/// How many tensor names an error about a missing feature layer lists.
const LISTED_TENSORS: usize = 8;

/// One dense layer of a head: `outputs × inputs` weights (row per output, PyTorch
/// `Linear` layout) and `outputs` biases.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Row-major `(outputs, inputs)` weights.
    pub weight: Vec<f32>,
    /// One bias per output.
    pub bias: Vec<f32>,
    /// Values per input row.
    pub inputs: usize,
}

impl Dense {
    /// Number of outputs (the bias length).
    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// A layer from its `(outputs, inputs)` weight and `(outputs)` bias tensors.
    pub fn from_tensors(
        weight: &candle_core::Tensor,
        bias: &candle_core::Tensor,
    ) -> anyhow::Result<Dense> {
        let (_, inputs) = weight.dims2()?;
        Ok(Dense {
            weight: weight.flatten_all()?.to_vec1()?,
            bias: bias.to_vec1()?,
            inputs,
        })
    }

    /// Checks that the weights are `outputs × inputs` and every value is finite.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.bias.is_empty() || self.inputs == 0 {
            bail!("a dense layer needs inputs and outputs");
        }
        if self.weight.len() != self.outputs() * self.inputs {
            bail!(
                "a dense layer of {} inputs and {} outputs has {} weights",
                self.inputs,
                self.outputs(),
                self.weight.len()
            );
        }
        if !self.weight.iter().chain(&self.bias).all(|v| v.is_finite()) {
            bail!("a dense layer holds a value that is not finite");
        }
        Ok(())
    }
}

/// Where a graph is cut: the tensor that holds the features, and how it was found.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Cut {
    /// Name of the feature tensor.
    pub feature: String,
    /// How it was found, for logs and the model's metadata.
    pub found: String,
}

/// Finds the feature tensor of `graph`: the tensor `named` (a tensor, or a node whose
/// first output is taken), else the input of the last linear layer (module docs).
pub(crate) fn find_cut(graph: &GraphProto, named: Option<&str>) -> anyhow::Result<Cut> {
    match named {
        Some(name) => named_cut(graph, name),
        None => last_linear_input(graph),
    }
}

fn named_cut(graph: &GraphProto, name: &str) -> anyhow::Result<Cut> {
    if graph
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == name))
    {
        return Ok(Cut {
            feature: name.to_string(),
            found: format!("the tensor {name:?}, as asked"),
        });
    }
    let by_node = graph
        .node
        .iter()
        .find(|n| n.name == name)
        .and_then(|n| n.output.first());
    match by_node {
        Some(output) => Ok(Cut {
            feature: output.clone(),
            found: format!("the output {output:?} of node {name:?}, as asked"),
        }),
        None => bail!(
            "the model has no tensor or node named {name:?}; its last tensors are {}",
            last_tensors(graph)
        ),
    }
}

/// The input of the last linear layer, walking back from the graph's first output.
fn last_linear_input(graph: &GraphProto) -> anyhow::Result<Cut> {
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let constants = constants(graph);
    let is_const = |name: &str| constants.contains(name);
    let output = graph.output.first().context("the graph has no output")?;
    let mut tensor = output.name.as_str();
    // Each step moves to an earlier node, so the walk ends within the node count.
    for _ in 0..=graph.node.len() {
        let node = producers
            .get(tensor)
            .with_context(|| format!("no node computes {tensor:?}"))?;
        let data_input = || node.input.iter().find(|i| !is_const(i));
        let found = |what: &str, feature: &str| Cut {
            feature: feature.to_string(),
            found: format!(
                "the input of the last linear layer ({what} node {:?})",
                node.name
            ),
        };
        match node.op_type.as_str() {
            op if PASS_THROUGH.contains(&op) => {
                tensor = node.input.first().context("a node without input")?;
            }
            "Gemm" if node.input.len() >= 2 && is_const(&node.input[1]) && !trans_a(node) => {
                return Ok(found("Gemm", &node.input[0]));
            }
            "MatMul" if node.input.len() == 2 && is_const(&node.input[1]) => {
                return Ok(found("MatMul", &node.input[0]));
            }
            "Conv" if node.input.len() >= 2 && is_const(&node.input[1]) && is_1x1(node) => {
                return Ok(found("1×1 Conv", &node.input[0]));
            }
            "Add" if node.input.iter().filter(|i| is_const(i)).count() == 1 => {
                tensor = data_input().context("an Add of two constants")?;
                let below = producers.get(tensor).map(|n| n.op_type.as_str());
                if !matches!(below, Some("MatMul" | "Gemm" | "Conv")) {
                    bail!(no_linear_layer(graph, node));
                }
            }
            _ => bail!(no_linear_layer(graph, node)),
        }
    }
    bail!("the graph's output depends on itself")
}

/// The error for a graph whose output does not come out of a linear layer.
fn no_linear_layer(graph: &GraphProto, node: &NodeProto) -> String {
    format!(
        "could not find the last linear layer: the output comes from a {} node ({:?}), not \
         a Gemm, MatMul or 1×1 Conv; name the feature tensor with --feature-node (the last \
         tensors are {})",
        node.op_type,
        node.name,
        last_tensors(graph)
    )
}

/// Whether a `Gemm` node transposes its data input (`transA = 1`): then its input
/// holds the features as columns, not rows, and is no cut.
fn trans_a(node: &NodeProto) -> bool {
    node.attribute
        .iter()
        .any(|a| a.name == "transA" && a.i != 0)
}

/// Whether a `Conv` node has a 1×1 kernel (by its `kernel_shape` attribute).
fn is_1x1(node: &NodeProto) -> bool {
    node.attribute
        .iter()
        .find(|a| a.name == "kernel_shape")
        .is_some_and(|a| a.ints.iter().all(|&k| k == 1))
}

/// Names of initializers and of `Constant` node outputs.
fn constants(graph: &GraphProto) -> HashSet<&str> {
    let initializers = graph.initializer.iter().map(|t| t.name.as_str());
    let constant_nodes = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .flat_map(|n| n.output.iter().map(String::as_str));
    initializers.chain(constant_nodes).collect()
}

/// The outputs of the graph's last few nodes, quoted, for error messages.
fn last_tensors(graph: &GraphProto) -> String {
    let names: Vec<String> = graph
        .node
        .iter()
        .rev()
        .filter(|n| n.op_type != "Constant")
        .filter_map(|n| n.output.first())
        .take(LISTED_TENSORS)
        .map(|o| format!("{o:?}"))
        .collect();
    names.join(", ")
}

/// `model` with `cut.feature` as its only output and only the nodes and initializers it
/// needs.
pub(crate) fn features_model(model: &ModelProto, cut: &Cut) -> anyhow::Result<ModelProto> {
    let mut model = model.clone();
    let graph = model.graph.as_mut().context("the file holds no graph")?;
    prune_to(graph, &cut.feature);
    graph.output = vec![float_output(&cut.feature)];
    graph.value_info.clear();
    Ok(model)
}

/// `model` cut at `cut` with `layers` on top (module docs); the labels in its metadata
/// (which named the old classes) are replaced by `class_names`, and `backbone` records
/// where it came from.
pub(crate) fn with_head(
    model: &ModelProto,
    cut: &Cut,
    layers: &[Dense],
    class_names: &[String],
    backbone: &str,
) -> anyhow::Result<ModelProto> {
    let old_gemm = opset(model) < 7;
    let list_initializers_as_inputs = model.ir_version < 4;
    let mut model = features_model(model, cut)?;
    let graph = model.graph.as_mut().context("the file holds no graph")?;
    if let Some(t) = graph
        .initializer
        .iter()
        .find(|t| t.data_location == Some(EXTERNAL_DATA))
    {
        bail!(
            "the backbone keeps weights ({:?}) in an external file: a fine-tuned model is \
             written as one self-contained file, so re-export the backbone with its weights \
             inside",
            t.name
        );
    }
    let prefix = free_prefix(graph);
    let name = |part: &str| format!("{prefix}.{part}");
    let mut x = node(
        graph,
        "Flatten",
        &name("flatten"),
        &[&cut.feature],
        vec![int("axis", 1)],
    );
    for (i, layer) in layers.iter().enumerate() {
        layer.check()?;
        if i > 0 {
            x = node(graph, "Relu", &name(&format!("{i}.relu")), &[&x], vec![]);
        }
        let (w, b) = (name(&format!("{i}.weight")), name(&format!("{i}.bias")));
        let dims = [layer.outputs() as i64, layer.inputs as i64];
        graph
            .initializer
            .push(tensor(&w, &dims, layer.weight.clone()));
        graph
            .initializer
            .push(tensor(&b, &dims[..1], layer.bias.clone()));
        if list_initializers_as_inputs {
            graph
                .input
                .push(value_info(&w, &[Some(dims[0]), Some(dims[1])]));
            graph.input.push(value_info(&b, &[Some(dims[0])]));
        }
        let mut attrs = vec![int("transB", 1)];
        if old_gemm {
            attrs.push(int("broadcast", 1));
        }
        x = node(graph, "Gemm", &name(&i.to_string()), &[&x, &w, &b], attrs);
    }
    let output = name("logits");
    if let Some(last) = graph.node.last_mut() {
        last.output = vec![output.clone()];
    }
    let classes = layers.last().map_or(0, Dense::outputs) as i64;
    graph.output = vec![value_info(&output, &[None, Some(classes)])];
    model
        .metadata_props
        .retain(|p| !super::LABEL_KEYS.contains(&p.key.as_str()) && p.key != "backbone");
    for (key, value) in [
        ("labels", serde_json::to_string(class_names)?),
        ("backbone", backbone.to_string()),
    ] {
        model
            .metadata_props
            .push(tract_onnx::pb::StringStringEntryProto {
                key: key.into(),
                value,
            });
    }
    Ok(model)
}

/// ONNX `TensorProto.DataLocation` of weights kept in a file beside the model.
const EXTERNAL_DATA: i32 = 1;

/// The first of `head`, `head_1`, `head_2`, … that no tensor of `graph` starts with
/// (followed by a dot): the new head's names never clash with the backbone's, even when
/// the backbone was itself fine-tuned here.
fn free_prefix(graph: &GraphProto) -> String {
    let names: Vec<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(std::iter::once(&n.name)))
        .chain(graph.initializer.iter().map(|t| &t.name))
        .chain(graph.input.iter().map(|i| &i.name))
        .map(String::as_str)
        .collect();
    (0..)
        .map(|k| {
            if k == 0 {
                "head".to_string()
            } else {
                format!("head_{k}")
            }
        })
        .find(|p| !names.iter().any(|n| n.starts_with(&format!("{p}."))))
        .unwrap_or_else(|| "head".to_string())
}

/// Removes from `graph` every node and initializer that `tensor` does not depend on.
fn prune_to(graph: &mut GraphProto, tensor: &str) {
    let mut needed: HashSet<String> = HashSet::from([tensor.to_string()]);
    let mut keep = vec![false; graph.node.len()];
    // Nodes are in topological order (the ONNX rule), so one backward pass suffices.
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
            // An If or Loop body may read the outer graph's values by name.
            subgraph_reads(node, &mut needed);
        }
    }
    let mut flags = keep.into_iter();
    graph.node.retain(|_| flags.next().unwrap_or(false));
    graph.initializer.retain(|t| needed.contains(&t.name));
    // Old files list initializers as inputs too: the cut ones go with them.
    graph.input.retain(|i| needed.contains(&i.name));
}

/// Adds every value the subgraphs of `node` (and theirs) read, by name.
fn subgraph_reads(node: &NodeProto, needed: &mut HashSet<String>) {
    let graphs = node
        .attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()));
    for graph in graphs {
        for inner in &graph.node {
            needed.extend(inner.input.iter().filter(|s| !s.is_empty()).cloned());
            subgraph_reads(inner, needed);
        }
    }
}

/// A float output of unknown shape (the engines work it out).
fn float_output(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: FLOAT,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
