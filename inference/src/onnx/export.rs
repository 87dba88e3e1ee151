//! Our CNN written as an ONNX model directory (`trainer export --onnx`): `model.onnx`,
//! `labels.txt` and a `model.toml` with the CNN's preprocessing, so that ONNX Runtime,
//! any other ONNX tool, or this server's ONNX engine runs the shipped model.
//!
//! The graph (opset 13, batch dimension dynamic, input `image` NCHW, output `logits`):
//!
//! ```text
//! image [N, C, H, W] ─(Sub: invert, only if the model inverts)→ Conv 3×3 pad 1 → MaxPool 2×2
//!   → Relu → Conv 3×3 pad 1 → MaxPool 2×2 → Relu → Transpose to NHWC → Flatten
//!   → Gemm (fc1, transB) → Relu → Gemm (fc2, transB) → logits [N, classes]
//! ```
//!
//! The Transpose keeps the native flatten order (h, w, c) so fc1's weights are written as
//! they are. MaxPool floors odd sizes (`ceil_mode = 0`), as the native kernels do, and
//! `relu(max_pool(x)) = max_pool(relu(x))`, so the order of those two does not matter.
//!
//! Preprocessing: stretch to the input size with Lanczos3, scale 1/255, the model's
//! mean and std. A model trained on inverted images (`invert`) gets its inversion as
//! the graph's first node: with normalised input `x = (s/255 − m)/σ`, the inverted
//! sample's value is `(1 − s/255 − m)/σ = (1 − 2m)/σ − x`, one `Sub` from a constant.

use std::path::Path;

use anyhow::Context;
use prost::Message;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::config::{ModelToml, OutputKind, PreprocessToml, ResizeMode};
use super::{DESCRIPTION_FILE, LABELS_FILE, ONNX_FILE};
use crate::model::{ModelMetadata, Net, METADATA_FILE};
use crate::preprocess::{ChannelOrder, Interpolation, Layout};

/// ONNX `TensorProto.DataType` of float32.
pub(super) const FLOAT: i32 = 1;
/// The IR version of opset 13 files (ONNX 1.8).
const IR_VERSION: i64 = 7;
/// The operator set the graph is written in.
const OPSET: i64 = 13;

/// Writes `net` with `meta` as an ONNX model directory in `out` (created if missing):
/// `model.onnx`, `labels.txt` and `model.toml`.
pub fn export_native(net: &Net, meta: &ModelMetadata, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let model = model_proto(net, meta)?;
    write_directory(out, &model, &meta.class_names, &description(meta))?;
    // A training record left by an earlier model there would be read as this one's.
    match std::fs::remove_file(out.join(METADATA_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", out.join(METADATA_FILE).display()))
        }
        _ => Ok(()),
    }
}

/// Writes an ONNX model directory's three files: `model.onnx`, `labels.txt` (one class
/// name per line) and `model.toml`.
pub(crate) fn write_directory(
    out: &Path,
    model: &ModelProto,
    class_names: &[String],
    toml: &ModelToml,
) -> anyhow::Result<()> {
    write(&out.join(ONNX_FILE), &model.encode_to_vec())?;
    write(
        &out.join(LABELS_FILE),
        format!("{}\n", class_names.join("\n")).as_bytes(),
    )?;
    let toml = toml::to_string(toml).context("writing model.toml")?;
    write(&out.join(DESCRIPTION_FILE), toml.as_bytes())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The `model.toml` that makes the ONNX engine feed the graph as the native path does.
pub(crate) fn description(meta: &ModelMetadata) -> ModelToml {
    ModelToml {
        name: Some(meta.name.clone()),
        version: Some(meta.version.clone()),
        output: OutputKind::Logits,
        labels_key: None,
        preprocess: PreprocessToml {
            width: Some(meta.input_width),
            height: Some(meta.input_height),
            resize: Some(ResizeMode::Stretch),
            resize_shorter_to: None,
            interpolation: Some(Interpolation::Lanczos3),
            antialias: Some(true),
            scale: Some(1.0 / 255.0),
            mean: Some(meta.normalization.mean.clone()),
            std: Some(meta.normalization.std.clone()),
            channel_order: Some(ChannelOrder::RGB),
            layout: Some(Layout::NCHW),
        },
    }
}

/// The whole ONNX model: graph, opset, producer and the metadata a reader may want
/// (class names as a JSON list under `labels`, where the ONNX engine finds them).
pub(crate) fn model_proto(net: &Net, meta: &ModelMetadata) -> anyhow::Result<ModelProto> {
    let props = [
        ("labels", serde_json::to_string(&meta.class_names)?),
        ("architecture", meta.architecture.clone()),
        ("dataset", meta.dataset.clone()),
        ("test_accuracy", meta.test_accuracy.to_string()),
    ];
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "image-classifier trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        model_version: 1,
        doc_string: format!("{} {}", meta.name, meta.version),
        graph: Some(graph(net, meta)?),
        metadata_props: props
            .into_iter()
            .map(|(key, value)| StringStringEntryProto {
                key: key.into(),
                value,
            })
            .collect(),
        ..Default::default()
    })
}

/// The network as nodes and initialisers (see the module docs for the shape).
fn graph(net: &Net, meta: &ModelMetadata) -> anyhow::Result<GraphProto> {
    let (c, h, w) = (
        meta.input_channels as i64,
        meta.input_height as i64,
        meta.input_width as i64,
    );
    let classes = meta.class_names.len() as i64;
    let mut g = GraphProto {
        name: meta.name.clone(),
        input: vec![value_info("image", &[None, Some(c), Some(h), Some(w)])],
        output: vec![value_info("logits", &[None, Some(classes)])],
        ..Default::default()
    };
    let mut x = "image".to_string();
    if meta.invert {
        let k: Vec<f32> = (meta.normalization.mean.iter())
            .zip(&meta.normalization.std)
            .map(|(m, s)| (1.0 - 2.0 * m) / s)
            .collect();
        let dims = [k.len() as i64, 1, 1];
        g.initializer.push(tensor("invert.k", &dims, k));
        x = node(&mut g, "Sub", "invert", &["invert.k", &x], vec![]);
    }
    x = conv_block(&mut g, "conv1", &x, &net.conv1_w, &net.conv1_b)?;
    x = conv_block(&mut g, "conv2", &x, &net.conv2_w, &net.conv2_b)?;
    x = node(
        &mut g,
        "Transpose",
        "to_nhwc",
        &[&x],
        vec![ints("perm", &[0, 2, 3, 1])],
    );
    x = node(&mut g, "Flatten", "flatten", &[&x], vec![int("axis", 1)]);
    x = linear(&mut g, "fc1", &x, &net.fc1_w, &net.fc1_b)?;
    x = node(&mut g, "Relu", "fc1.relu", &[&x], vec![]);
    linear(&mut g, "fc2", &x, &net.fc2_w, &net.fc2_b)?;
    if let Some(fc2) = g.node.last_mut() {
        fc2.output = vec!["logits".into()];
    }
    Ok(g)
}

/// Conv 3×3 (pad 1) → MaxPool 2×2 → Relu, the weights `w` converted from the native
/// `(9 · c_in, c_out)` rows ordered (ky, kx, c_in) to ONNX's `[c_out, c_in, 3, 3]`.
fn conv_block(
    g: &mut GraphProto,
    name: &str,
    x: &str,
    w: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> anyhow::Result<String> {
    let (rows, c_out) = w.dims2()?;
    let c_in = rows / 9;
    let native = w.flatten_all()?.to_vec1::<f32>()?;
    let mut onnx = vec![0f32; rows * c_out];
    for o in 0..c_out {
        for i in 0..c_in {
            for k in 0..9 {
                onnx[(o * c_in + i) * 9 + k] = native[(k * c_in + i) * c_out + o];
            }
        }
    }
    let dims = [c_out as i64, c_in as i64, 3, 3];
    let (wn, bn) = parameters(g, name, &dims, onnx, b)?;
    let attrs = vec![
        ints("kernel_shape", &[3, 3]),
        ints("pads", &[1, 1, 1, 1]),
        ints("strides", &[1, 1]),
    ];
    let x = node(g, "Conv", name, &[x, &wn, &bn], attrs);
    let pool = vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
    let x = node(g, "MaxPool", &format!("{name}.pool"), &[&x], pool);
    Ok(node(g, "Relu", &format!("{name}.relu"), &[&x], vec![]))
}

/// Gemm with PyTorch `Linear` weights `(out, in)` (`transB = 1`).
fn linear(
    g: &mut GraphProto,
    name: &str,
    x: &str,
    w: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> anyhow::Result<String> {
    let (out, input) = w.dims2()?;
    let weights = w.flatten_all()?.to_vec1::<f32>()?;
    let (wn, bn) = parameters(g, name, &[out as i64, input as i64], weights, b)?;
    Ok(node(
        g,
        "Gemm",
        name,
        &[x, &wn, &bn],
        vec![int("transB", 1)],
    ))
}

/// Adds a layer's weights (`weights` in ONNX order, of shape `dims`, whose first
/// dimension is the output channels) and its bias as initializers `<name>.weight` and
/// `<name>.bias`; returns their names.
fn parameters(
    g: &mut GraphProto,
    name: &str,
    dims: &[i64],
    weights: Vec<f32>,
    b: &candle_core::Tensor,
) -> anyhow::Result<(String, String)> {
    let (wn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
    g.initializer.push(tensor(&wn, dims, weights));
    g.initializer
        .push(tensor(&bn, &dims[..1], b.to_vec1::<f32>()?));
    Ok((wn, bn))
}

/// Appends a node named `name` whose one output is also called `name`; returns it.
pub(super) fn node(
    g: &mut GraphProto,
    op: &str,
    name: &str,
    inputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> String {
    g.node.push(NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![name.into()],
        attribute,
        ..Default::default()
    });
    name.to_string()
}

/// An integer attribute.
pub(super) fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A float32 initialiser.
pub(super) fn tensor(name: &str, dims: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: FLOAT,
        float_data: values,
        ..Default::default()
    }
}

/// A float32 graph input or output; `None` dimensions are the dynamic batch.
pub(super) fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(n) => dimension::Value::DimValue(*n),
                None => dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
