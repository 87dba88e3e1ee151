//! The image classifier's models as their users need them: the native CNN's format
//! ([`model`]: weights in `model.safetensors`, description in `metadata.json`, and the
//! network [`model::Net`]), ONNX image classifiers ([`onnx`]: `model.onnx` with optional
//! `model.toml` and `labels.txt`, run by tract), the image → model input conversion
//! ([`Preprocessor`]) and CPU inference behind one interface for both ([`Classifier`]).
//!
//! Why a crate of its own: the classifier server, the client (through the server) and the
//! fuzz targets need to load a model and run it, not to train one; the trainer needs the
//! same format and network to write what they read. Here both sides share one definition,
//! and the server does not depend on the trainer (nor on its command line, random numbers,
//! gzip and logging set-up).
//!
//! Layout: [`model`] (format and network), [`backbone`] (a served model as a pretrained
//! feature extractor, and a fine-tuned model written from it), [`onnx`] (the ONNX directory format and
//! engine), [`model_dir`] (snapshots of a model directory's files, for reloads),
//! [`classifier`] ([`Classifier`]), [`preprocess`] ([`Preprocessor`] and the ONNX
//! [`PreprocessRecipe`]), [`simd`] (the run-time choice of SIMD level, [`simd_level`], and
//! the measured FMA peak), [`threads`] (the thread that calls the model as a worker of the
//! compute pool); privately `ops` (the candle custom op of the network's convolution
//! layers, with the backward pass training needs), `fast` (the fast inference path),
//! `kernels` (the slice kernels both of those share) and, in tests, `reference` (the
//! candle-generic oracles the kernels are checked against).

pub mod backbone;
pub mod classifier;
mod fast;
mod kernels;
pub mod model;
pub mod model_dir;
pub mod onnx;
mod ops;
pub mod preprocess;
#[cfg(test)]
mod reference;
pub mod simd;
pub mod threads;

pub use backbone::{Backbone, Dense};
pub use classifier::Classifier;
pub use model::{ModelMetadata, Normalization};
pub use model_dir::DirSnapshot;
pub use onnx::EngineChoice;
pub use preprocess::{PreprocessRecipe, Preprocessor};
pub use simd::{simd_level, SimdLevel};
