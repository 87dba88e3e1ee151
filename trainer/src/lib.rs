//! The Fashion-MNIST CNN: model format and inference ([`model`], [`preprocess`]) used by the
//! classifier server, plus the data loading and training code behind the `trainer` CLI.

pub mod bench;
pub mod data;
mod infer;
pub mod model;
pub mod ops;
pub mod preprocess;
pub mod train;

pub use model::{Classifier, ModelMetadata, Normalization};
pub use preprocess::Preprocessor;
