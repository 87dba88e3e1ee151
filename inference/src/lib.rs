//! The image classifier's CNN as its users need it: the model format ([`model`]: weights in
//! `model.safetensors`, description in `metadata.json`, and the network [`model::Net`]),
//! the image → model input conversion ([`Preprocessor`]) and fast CPU inference
//! ([`Classifier`]).
//!
//! Why a crate of its own: the classifier server, the client (through the server) and the
//! fuzz targets need to load a model and run it, not to train one; the trainer needs the
//! same format and network to write what they read. Here both sides share one definition,
//! and the server does not depend on the trainer (nor on its command line, random numbers,
//! gzip and logging set-up).
//!
//! Layout: [`model`] (format and network), [`classifier`] ([`Classifier`]), [`preprocess`]
//! ([`Preprocessor`]), [`simd`] (the run-time choice of SIMD level, [`simd_level`], and
//! the measured FMA peak); privately `ops` (the candle custom op of the network's convolution
//! layers, with the backward pass training needs), `fast` (the fast inference path),
//! `kernels` (the slice kernels both of those share) and, in tests, `reference` (the
//! candle-generic oracles the kernels are checked against).

pub mod classifier;
mod fast;
mod kernels;
pub mod model;
mod ops;
pub mod preprocess;
#[cfg(test)]
mod reference;
pub mod simd;

pub use classifier::Classifier;
pub use model::{ModelMetadata, Normalization};
pub use preprocess::Preprocessor;
pub use simd::{simd_level, SimdLevel};
