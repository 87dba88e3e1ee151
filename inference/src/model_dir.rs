//! The files of a model directory as they were at one moment ([`DirSnapshot`]): what a
//! server compares to notice a new model, taken by [`crate::Classifier::load`] before it
//! reads anything, so that a change made while a model loads is never mistaken for the
//! loaded state.

use std::path::Path;
use std::time::SystemTime;

use crate::model::{METADATA_FILE, WEIGHTS_FILE};
use crate::onnx::{DESCRIPTION_FILE, LABELS_FILE, ONNX_FILE};

/// Every file a model directory may hold, for either engine.
pub const MODEL_DIR_FILES: [&str; 5] = [
    ONNX_FILE,
    DESCRIPTION_FILE,
    LABELS_FILE,
    WEIGHTS_FILE,
    METADATA_FILE,
];

/// Modification time and length of each of [`MODEL_DIR_FILES`] (`None` where absent or
/// unreadable), in that order. Two snapshots differ when any file appeared, vanished or
/// changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirSnapshot([Option<(SystemTime, u64)>; 5]);

impl DirSnapshot {
    /// The files of `dir` now.
    pub fn of(dir: &Path) -> DirSnapshot {
        DirSnapshot(MODEL_DIR_FILES.map(|name| {
            let meta = std::fs::metadata(dir.join(name)).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        }))
    }

    /// Whether the files make a model (`model.onnx`, or `model.safetensors` with
    /// `metadata.json`): a directory that holds none is not worth loading.
    pub fn holds_model(&self) -> bool {
        let [onnx, _, _, weights, metadata] = &self.0;
        onnx.is_some() || (weights.is_some() && metadata.is_some())
    }
}
