//! The features a backbone gives for a folder's images, computed once and cached: what
//! fine-tuning trains its head on (see [`crate::finetune`]).
//!
//! Each image is decoded and preprocessed with the backbone's own preprocessing; a
//! training image also gives `copies` augmented versions (a random crop keeping 85–100%
//! of each side, mirrored at random when asked), each a row of features of its own. The
//! images are decoded on the rayon pool and run through the backbone's engine in batches.
//!
//! The cache is one safetensors file per (backbone, cut, preprocessing, files with their
//! sizes and modification times, splits, augmentation, seed), named by the SHA-256 of all
//! of that: change any of it and the features are computed again; train a second head
//! with other settings and they are read back in a moment.

use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use anyhow::Context;
use candle_core::{Device, Tensor};
use classifier_inference::{Backbone, DirSnapshot};
use image::DynamicImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::data::{decode_image, FolderListing};

/// Changes whenever what a cache file holds or how it is computed changes.
const CACHE_FORMAT: &str = "features v1";
/// Files decoded and run through the backbone per trip.
const FILES_PER_TRIP: usize = 64;
/// The smallest share of each side a random crop keeps.
const MIN_CROP_SIDE: f64 = 0.85;

/// Rows of features with their labels.
#[derive(Clone, Debug, Default)]
pub struct Features {
    /// `labels.len() × width` values.
    pub values: Vec<f32>,
    /// One label per row.
    pub labels: Vec<u32>,
    /// Values per row.
    pub width: usize,
}

impl Features {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Which files go where, and how training images are augmented.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// The folder's files and labels.
    pub listing: &'a FolderListing,
    /// Indices into the listing: training, validation and test images.
    pub splits: [&'a [usize]; 3],
    /// Augmented copies per training image (besides the image itself).
    pub copies: usize,
    /// Whether augmented copies may be mirrored left-right.
    pub flip: bool,
    /// Seed of the augmentation.
    pub seed: u64,
}

/// The features of the three splits, and how they were obtained.
#[derive(Debug)]
pub struct FeatureSets {
    /// Training rows (each image and its augmented copies).
    pub train: Features,
    /// Validation rows.
    pub val: Features,
    /// Test rows.
    pub test: Features,
    /// Files that could not be decoded (none listed when the cache answered).
    pub skipped: Vec<PathBuf>,
    /// The cache file, and whether it answered.
    pub cache: Option<(PathBuf, bool)>,
    /// Wall time spent computing (or reading) them.
    pub seconds: f64,
}

/// The features of `plan`'s images, read from `cache_dir` when an earlier run computed
/// them (and written there otherwise; `None`: no cache).
pub fn features(
    backbone: &Backbone,
    plan: &Plan<'_>,
    cache_dir: Option<&Path>,
) -> anyhow::Result<FeatureSets> {
    let start = Instant::now();
    let cache_file =
        cache_dir.map(|d| d.join(format!("{}.safetensors", cache_key(backbone, plan))));
    if let Some(path) = cache_file.as_deref().filter(|p| p.is_file()) {
        match read_cache(path, backbone.feature_len()) {
            Ok([train, val, test]) => {
                return Ok(FeatureSets {
                    train,
                    val,
                    test,
                    skipped: Vec::new(),
                    cache: Some((path.to_path_buf(), true)),
                    seconds: start.elapsed().as_secs_f64(),
                })
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "unreadable feature cache: computing again")
            }
        }
    }
    let mut skipped = Vec::new();
    let mut sets = Vec::with_capacity(3);
    for (k, split) in plan.splits.iter().enumerate() {
        let copies = if k == 0 { plan.copies } else { 0 };
        sets.push(split_features(backbone, plan, split, copies, &mut skipped)?);
    }
    let [train, val, test]: [Features; 3] = sets
        .try_into()
        .map_err(|_| anyhow::anyhow!("three splits"))?;
    if let Some(path) = &cache_file {
        if let Err(e) = write_cache(path, [&train, &val, &test]) {
            tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "could not write the feature cache");
        }
    }
    Ok(FeatureSets {
        train,
        val,
        test,
        skipped,
        cache: cache_file.map(|p| (p, false)),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The features of the files at `indices`, each with `copies` augmented versions.
fn split_features(
    backbone: &Backbone,
    plan: &Plan<'_>,
    indices: &[usize],
    copies: usize,
    skipped: &mut Vec<PathBuf>,
) -> anyhow::Result<Features> {
    let pre = backbone.preprocessor();
    let mut out = Features {
        width: backbone.feature_len(),
        ..Features::default()
    };
    for trip in indices.chunks(FILES_PER_TRIP) {
        let decoded: Vec<(usize, anyhow::Result<Vec<f32>>)> = trip
            .par_iter()
            .map(|&i| {
                let inputs = decode_image(&plan.listing.files[i])
                    .map(|img| inputs_with_copies(pre, &img, copies, plan, i));
                (i, inputs)
            })
            .collect();
        let mut batch = Vec::new();
        for (i, inputs) in decoded {
            match inputs {
                Ok(values) => {
                    batch.extend(values);
                    let label = plan.listing.labels[i];
                    out.labels.extend(std::iter::repeat_n(label, copies + 1));
                }
                Err(e) => {
                    let file = &plan.listing.files[i];
                    tracing::warn!(file = %file.display(), error = %e, "skipping unreadable file");
                    skipped.push(file.clone());
                }
            }
        }
        let n = batch.len() / pre.input_len();
        out.values.extend(backbone.features(&batch, n)?);
    }
    Ok(out)
}

/// The image's model input followed by `copies` augmented ones (module docs), the random
/// choices seeded by the plan's seed and the file's index.
fn inputs_with_copies(
    pre: &classifier_inference::Preprocessor,
    img: &DynamicImage,
    copies: usize,
    plan: &Plan<'_>,
    file: usize,
) -> Vec<f32> {
    let mut out = pre.to_input(img);
    let mut rng =
        StdRng::seed_from_u64(plan.seed ^ (file as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for _ in 0..copies {
        let (w, h) = (img.width(), img.height());
        let cw = ((w as f64 * rng.random_range(MIN_CROP_SIDE..=1.0)).round() as u32).clamp(1, w);
        let ch = ((h as f64 * rng.random_range(MIN_CROP_SIDE..=1.0)).round() as u32).clamp(1, h);
        let (x, y) = (rng.random_range(0..=w - cw), rng.random_range(0..=h - ch));
        let mut copy = img.crop_imm(x, y, cw, ch);
        if plan.flip && rng.random::<bool>() {
            copy = copy.fliph();
        }
        pre.append_input(&copy, &mut out);
    }
    out
}

/// The SHA-256 (hex) of everything the features depend on (module docs).
fn cache_key(backbone: &Backbone, plan: &Plan<'_>) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    put(CACHE_FORMAT);
    put(&backbone.describe());
    put(backbone.engine_name());
    put(&format!("{:?}", DirSnapshot::of(backbone.dir())));
    put(&format!("{:?}", backbone.preprocessor()));
    put(&format!(
        "copies {} flip {} seed {}",
        plan.copies, plan.flip, plan.seed
    ));
    for split in plan.splits {
        put(&format!("split {}", split.len()));
        for &i in split {
            let file = &plan.listing.files[i];
            let stamp = std::fs::metadata(file).ok().map(|m| {
                let modified = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                (m.len(), modified)
            });
            put(&format!(
                "{} {} {:?}",
                file.display(),
                plan.listing.labels[i],
                stamp
            ));
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

const SPLIT_NAMES: [&str; 3] = ["train", "val", "test"];

fn write_cache(path: &Path, sets: [&Features; 3]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut map = std::collections::HashMap::new();
    for (name, set) in SPLIT_NAMES.iter().zip(sets) {
        let rows = set.len();
        map.insert(
            name.to_string(),
            Tensor::from_slice(&set.values, (rows, set.width), &Device::Cpu)?,
        );
        map.insert(
            format!("{name}.labels"),
            Tensor::from_slice(&set.labels, rows, &Device::Cpu)?,
        );
    }
    // Written beside and renamed, so a reader never sees half a file.
    let partial = path.with_extension("partial");
    candle_core::safetensors::save(&map, &partial)?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}

fn read_cache(path: &Path, width: usize) -> anyhow::Result<[Features; 3]> {
    let mut map = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut take = |name: &str| -> anyhow::Result<Features> {
        let values = map
            .remove(name)
            .with_context(|| format!("no tensor {name}"))?;
        let labels = map
            .remove(&format!("{name}.labels"))
            .with_context(|| format!("no tensor {name}.labels"))?;
        let (rows, w) = values.dims2()?;
        anyhow::ensure!(
            w == width && labels.dims() == [rows],
            "shapes do not match the backbone"
        );
        Ok(Features {
            values: values.flatten_all()?.to_vec1()?,
            labels: labels.to_vec1()?,
            width,
        })
    };
    Ok([take("train")?, take("val")?, take("test")?])
}
