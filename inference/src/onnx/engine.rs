//! Running an ONNX graph with tract: one optimised plan, batches spread over the cores,
//! every engine call guarded so that a fault is an error, never a panic.
//!
//! The plan. tract optimises a graph for a concrete input shape (`into_optimized`: it
//! folds constants, fuses ops, packs the weights for its matrix kernels), once, at load.
//! Its batch size is the one the file fixes, or 1 when the batch is dynamic: measured on
//! an AVX2 EPYC (`examples/onnx-bench.rs`, CPU time per image, so that other load on the
//! machine does not count), tract spends *more* per image in larger batches (MobileNetV3
//! 13 ms at batch 1, 17-18 ms at 4 to 16; ResNet-18 74 ms at 1, 92-105 ms at 4 to 16:
//! its im2col buffers grow with the batch and fall out of the caches), and every plan
//! holds its own packed weights (ResNet-18: 45 MB each). So neither a cache of plans per
//! batch size nor one large plan with padding pays; one batch-1 plan run once per image
//! does, with no padding and one copy of the weights. A file that fixes a batch `B > 1`
//! runs in chunks of `B`, the last one padded with blank images.
//!
//! Threads. A tract run uses one thread. The chunks of a batch run in parallel on the
//! rayon pool (one thread per core), so a batch of two or more uses both cores of a
//! small machine and every core of a big one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use rayon::prelude::*;
use tract_onnx::prelude::{
    tvec, Datum, DatumExt, Framework, InferenceFact, InferenceModel, InferenceModelExt,
    IntoRunnable, Tensor, TypedModel, TypedRunnableModel,
};
use tract_onnx::tract_core::ops::Cost;

type Plan = Arc<TypedRunnableModel>;

/// A graph ready to run: its plan and what every run needs.
pub(crate) struct Engine {
    plan: Plan,
    /// One image's input dimensions, in the model's layout (after the batch axis).
    item_dims: [usize; 3],
    /// Images per run: the batch size fixed by the file, or 1.
    plan_batch: usize,
    /// Whether the file fixes the batch size.
    fixed_batch: bool,
    /// Output values per image.
    classes: usize,
    /// Multiply-adds of one image, as tract counts them (0 if it cannot).
    fma_per_image: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("item_dims", &self.item_dims)
            .field("plan_batch", &self.plan_batch)
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

/// Runs `f`, turning a panic inside the engine into an error that says `what` failed.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(anyhow!("the ONNX engine failed while {what}: {message}"))
        }
    }
}

impl Engine {
    /// Optimises `source` (one input, already checked) for images of `item_dims` and
    /// runs it once on a blank batch, so that a model the engine cannot run is refused
    /// here, not at the first request.
    pub(crate) fn new(
        source: InferenceModel,
        item_dims: [usize; 3],
        fixed_batch: Option<usize>,
    ) -> anyhow::Result<Engine> {
        let plan_batch = fixed_batch.unwrap_or(1).max(1);
        let plan = build_plan(source, item_dims, plan_batch)?;
        let classes = output_values(&plan, plan_batch)?;
        let engine = Engine {
            fma_per_image: fma_count(plan.model()) / plan_batch as u64,
            plan,
            item_dims,
            plan_batch,
            fixed_batch: fixed_batch.is_some(),
            classes,
        };
        let blank = vec![0f32; plan_batch * engine.item_len()];
        engine
            .run_chunk(&blank)
            .context("running the model once on a blank input")?;
        Ok(engine)
    }

    fn item_len(&self) -> usize {
        self.item_dims.iter().product()
    }

    /// Runs the plan on up to `plan_batch` images (padded with blank ones), returning
    /// the rows of the images given.
    fn run_chunk(&self, images: &[f32]) -> anyhow::Result<Vec<f32>> {
        let (size, len) = (self.plan_batch, self.item_len());
        let take = images.len() / len;
        let data = super::padded(images, size * len);
        let [a, b, c] = self.item_dims;
        let mut rows = guarded(&format!("running a batch of {size}"), || {
            let tensor = Tensor::from_shape(&[size, a, b, c], &data)?;
            let outputs = self.plan.run(tvec!(tensor.into()))?;
            let output = outputs.first().context("the model gave no output")?;
            let view = output.to_plain_array_view::<f32>()?;
            super::check_outputs(view.len(), size, self.classes)?;
            Ok(view.iter().copied().collect::<Vec<f32>>())
        })?;
        rows.truncate(take * self.classes);
        Ok(rows)
    }
}

/// `source` with a `size`-image input, optimised and made runnable.
fn build_plan(source: InferenceModel, [a, b, c]: [usize; 3], size: usize) -> anyhow::Result<Plan> {
    let shape = [size, a, b, c];
    guarded(
        &format!("optimising the model for a batch of {size}"),
        || {
            let fact: InferenceFact = f32::fact(shape).into();
            let typed = source.with_input_fact(0, fact)?.into_optimized()?;
            typed.into_runnable()
        },
    )
    .with_context(|| format!("the ONNX engine cannot run this model (input {shape:?})"))
}

/// Values per image of `plan`'s first output (run on batches of `size`): it must be
/// float32 of a fixed shape whose volume is a multiple of the batch.
fn output_values(plan: &Plan, size: usize) -> anyhow::Result<usize> {
    let fact = plan
        .model()
        .output_fact(0)
        .context("the model has no output")?;
    if fact.datum_type != f32::datum_type() {
        bail!(
            "the model's output is {:?}; class scores must be float32",
            fact.datum_type
        );
    }
    let dims = fact
        .shape
        .as_concrete()
        .with_context(|| format!("the model's output shape {:?} is not fixed", fact.shape))?;
    let volume: usize = dims.iter().product();
    if volume == 0 || !volume.is_multiple_of(size) {
        bail!("the model's output shape {dims:?} does not hold one row of scores per image of a batch of {size}");
    }
    Ok(volume / size)
}

/// Multiply-adds of a whole run of `model`, as its operators report them.
fn fma_count(model: &TypedModel) -> u64 {
    let mut total = 0u64;
    for node in model.nodes() {
        let Ok(inputs) = model.node_input_facts(node.id) else {
            continue;
        };
        let Ok(costs) = node.op.cost(&inputs) else {
            continue;
        };
        for (cost, count) in costs {
            if let (Cost::FMA(_), Ok(n)) = (cost, count.to_i64()) {
                total += n.max(0) as u64;
            }
        }
    }
    total
}

/// Parses `bytes` as an ONNX model (`dir` resolves external weight files), guarded.
pub(crate) fn parse(
    onnx: &tract_onnx::Onnx,
    proto: &tract_onnx::pb::ModelProto,
    dir: Option<&str>,
) -> anyhow::Result<InferenceModel> {
    guarded("reading the graph", || {
        let parsed = onnx.parse(proto, dir)?;
        if !parsed.unresolved_inputs.is_empty() {
            bail!(
                "the graph reads values nothing defines: {:?}",
                parsed.unresolved_inputs
            );
        }
        Ok(parsed.model)
    })
}

/// Decodes the protobuf of an ONNX file.
pub(crate) fn decode(
    onnx: &tract_onnx::Onnx,
    bytes: &[u8],
) -> anyhow::Result<tract_onnx::pb::ModelProto> {
    guarded("decoding the file", || {
        onnx.proto_model_for_read(&mut &bytes[..])
            .map_err(|e| anyhow!("{e:#}"))
    })
}

impl super::Runner for Engine {
    /// `n` images (`n × item_len` floats) → `n × classes` raw outputs, the chunks of the
    /// plan's batch size run in parallel.
    fn run(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let len = self.item_len();
        super::check_inputs(inputs, n, len)?;
        let rows: Vec<Vec<f32>> = inputs
            .par_chunks(self.plan_batch * len)
            .map(|chunk| self.run_chunk(chunk))
            .collect::<anyhow::Result<_>>()?;
        Ok(rows.concat())
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch.then_some(self.plan_batch)
    }

    /// Multiply-adds of one image, as tract's operators count them (0 if they do not).
    fn fma_per_image(&self) -> u64 {
        self.fma_per_image
    }

    fn name(&self) -> &'static str {
        "tract"
    }
}
