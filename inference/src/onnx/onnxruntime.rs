//! ONNX Runtime as the ONNX engine, opened at run time (the `ort` crate's `load-dynamic`:
//! nothing is downloaded or linked at build time). Used when the library is there: the
//! path in `ORT_DYLIB_PATH`, or `libonnxruntime.so` on the loader's search path (the
//! PyPI `onnxruntime` wheel ships one, `scripts/onnxruntime-lib.sh` installs it and
//! prints its path). Otherwise [`super::EngineChoice::Auto`] falls back to tract.
//!
//! Why both engines: ONNX Runtime is the reference for speed (measured 1.7–4× tract on
//! ResNet-18 and MobileNetV3 at 224×224, see the README), tract is pure Rust and always
//! there. Both are behind [`super::Runner`], so the server cannot tell them apart.
//!
//! Threads: one session per model with one intra-op thread per core, spinning off (an
//! idle server must not burn the cores its decode pool needs). A session runs one batch
//! at a time (`Session::run` takes `&mut`): the server's model thread is the only caller
//! on the hot path, so the lock is uncontended.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context};
use ort::environment::Environment;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::TensorRef;

use super::engine::guarded;
use super::Runner;

/// The library file tried on the loader's search path when `ORT_DYLIB_PATH` is unset.
const DEFAULT_LIBRARY: &str = "libonnxruntime.so";

/// The loaded library's environment and the file it came from, or why it could not be
/// loaded: tried once per process.
static LIBRARY: OnceLock<Result<(Environment, String), String>> = OnceLock::new();

/// Loads ONNX Runtime once per process; the outcome is kept (a missing library is not
/// looked for again at every model load). `Ok` names the file.
pub(crate) fn library() -> Result<&'static str, &'static str> {
    loaded().map(|(_, path)| path.as_str())
}

fn loaded() -> Result<&'static (Environment, String), &'static str> {
    LIBRARY
        .get_or_init(|| {
            let path = std::env::var_os("ORT_DYLIB_PATH")
                .filter(|p| !p.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_LIBRARY), PathBuf::from);
            let shown = path.display().to_string();
            guarded("loading ONNX Runtime", || {
                ort::init_from(&path)
                    .map_err(|e| anyhow!("{e}"))?
                    .with_name("image-classifier")
                    .build()
                    .map_err(|e| anyhow!("{e}"))
            })
            .map(|env| (env, shown.clone()))
            .map_err(|e| format!("ONNX Runtime could not be loaded from {shown}: {e:#}"))
        })
        .as_ref()
        .map_err(String::as_str)
}

/// A session builder with this module's settings (see the module docs).
fn builder(env: &Environment, threads: usize) -> anyhow::Result<SessionBuilder> {
    let fail = |e: ort::Error<SessionBuilder>| anyhow!("{e}");
    Session::builder(env)
        .map_err(|e| anyhow!("{e}"))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(fail)?
        .with_intra_threads(threads)
        .map_err(fail)?
        .with_inter_threads(1)
        .map_err(fail)?
        .with_intra_op_spinning(false)
        .map_err(fail)?
        .with_inter_op_spinning(false)
        .map_err(fail)?
        // ONNX Runtime logs every session's options at "info": noise in a server's log.
        .with_log_level(ort::logging::LogLevel::Warning)
        .map_err(fail)
}

/// A model's ONNX Runtime session and what every run needs.
pub(crate) struct OrtRunner {
    session: Mutex<Session>,
    /// One image's input dimensions in the model's layout.
    item_dims: [usize; 3],
    /// The batch size the file fixes, if any (runs are then chunks of it, padded).
    fixed_batch: Option<usize>,
    classes: usize,
}

impl std::fmt::Debug for OrtRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtRunner")
            .field("item_dims", &self.item_dims)
            .field("fixed_batch", &self.fixed_batch)
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

impl OrtRunner {
    /// A session for the ONNX file `bytes`, run once on a blank batch so that a model
    /// ONNX Runtime cannot run is refused here, not at the first request.
    pub(crate) fn new(
        bytes: &[u8],
        item_dims: [usize; 3],
        fixed_batch: Option<usize>,
    ) -> anyhow::Result<OrtRunner> {
        let (env, _) = loaded().map_err(|e| anyhow!("{e}"))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let session = guarded("creating the ONNX Runtime session", || {
            builder(env, threads)?
                .commit_from_memory(bytes)
                .map_err(|e| anyhow!("ONNX Runtime refused the model: {e}"))
        })?;
        let mut runner = OrtRunner {
            session: Mutex::new(session),
            item_dims,
            fixed_batch,
            classes: 0,
        };
        let batch = fixed_batch.unwrap_or(1);
        let blank = vec![0f32; batch * runner.item_len()];
        let values = runner
            .run_batch(&blank, batch)
            .context("running the model once on a blank input")?
            .len();
        if values == 0 || !values.is_multiple_of(batch) {
            bail!("the model gave {values} values for a batch of {batch}");
        }
        runner.classes = values / batch;
        Ok(runner)
    }

    fn item_len(&self) -> usize {
        self.item_dims.iter().product()
    }

    /// Runs `n` images as one batch: the output values, however many there are.
    fn run_batch(&self, images: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let [a, b, c] = self.item_dims;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        guarded(&format!("running a batch of {n}"), || {
            let input =
                TensorRef::from_array_view(([n, a, b, c], images)).map_err(|e| anyhow!("{e}"))?;
            let outputs = session
                .run(ort::inputs![input])
                .map_err(|e| anyhow!("ONNX Runtime failed: {e}"))?;
            let (_, values) = outputs[0]
                .try_extract_tensor::<f32>()
                .map_err(|e| anyhow!("the model's output: {e}"))?;
            Ok(values.to_vec())
        })
    }

    /// [`OrtRunner::run_batch`] with the output size checked against `n × classes`.
    fn checked(&self, images: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let rows = self.run_batch(images, n)?;
        super::check_outputs(rows.len(), n, self.classes)?;
        Ok(rows)
    }
}

impl Runner for OrtRunner {
    fn run(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let len = self.item_len();
        super::check_inputs(inputs, n, len)?;
        let Some(size) = self.fixed_batch else {
            return self.checked(inputs, n);
        };
        let mut rows = Vec::with_capacity(n * self.classes);
        for chunk in inputs.chunks(size * len) {
            let mut out = self.checked(&super::padded(chunk, size * len), size)?;
            out.truncate(chunk.len() / len * self.classes);
            rows.extend(out);
        }
        Ok(rows)
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }

    fn fma_per_image(&self) -> u64 {
        0
    }

    fn name(&self) -> &'static str {
        "ONNX Runtime"
    }
}
