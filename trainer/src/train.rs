//! Training loop (AdamW, cosine learning-rate decay, flip/shift augmentation, dropout) and
//! the end-to-end "train on a dataset and write a model directory" drivers used by the CLI.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use classifier_inference::model::{chw_batch_to_nhwc, Net, WEIGHTS_FILE};
use classifier_inference::{Classifier, ModelMetadata, Normalization, Preprocessor};

use crate::data::{self, Dataset};

/// Hyper-parameters of one training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Peak learning rate of AdamW (cosine decayed per step to `learning_rate * final_lr_fraction`).
    pub learning_rate: f64,
    /// Final learning rate as a fraction of the peak.
    pub final_lr_fraction: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Dropout probability on the hidden layer.
    pub dropout: f32,
    /// Seed for initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Randomly mirror images left-right (good for garments, bad for text).
    pub flip: bool,
    /// Maximum random translation in pixels (edge pixels are replicated).
    pub max_shift: usize,
    /// Channels of the first convolution.
    pub conv1_channels: usize,
    /// Channels of the second convolution.
    pub conv2_channels: usize,
    /// Units of the hidden linear layer.
    pub hidden: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 15,
            batch_size: 128,
            learning_rate: 2e-3,
            final_lr_fraction: 0.02,
            weight_decay: 1e-4,
            dropout: 0.3,
            seed: 42,
            flip: true,
            max_shift: 1,
            conv1_channels: 32,
            conv2_channels: 64,
            hidden: 128,
        }
    }
}

/// Metrics of one epoch, reported to the caller as training progresses.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's batches.
    pub train_loss: f32,
    /// Accuracy on the (augmented, dropout) training batches.
    pub train_accuracy: f32,
    /// Accuracy on the validation set, if there is one.
    pub val_accuracy: Option<f32>,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
    /// Learning rate at the end of the epoch.
    pub learning_rate: f64,
}

/// Trainable parameters: candle `Var`s plus the `Net` view over them.
struct Params {
    vars: Vec<Var>,
    net: Net,
}

/// Creates a variable filled with uniform noise in `[-bound, bound]` from the seeded rng.
fn uniform_var(rng: &mut StdRng, shape: &[usize], bound: f32) -> anyhow::Result<Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        data,
        shape,
        &Device::Cpu,
    )?)?)
}

/// A zero-initialised variable.
fn zero_var(shape: &[usize]) -> anyhow::Result<Var> {
    Ok(Var::zeros(shape, DType::F32, &Device::Cpu)?)
}

impl Params {
    /// He-uniform initialisation for ReLU layers, LeCun-uniform for the output layer.
    fn init(
        cfg: &TrainConfig,
        channels: usize,
        height: usize,
        width: usize,
        classes: usize,
        rng: &mut StdRng,
    ) -> anyhow::Result<Self> {
        let (c1, c2, hid) = (cfg.conv1_channels, cfg.conv2_channels, cfg.hidden);
        let flat = (height / 4) * (width / 4) * c2;
        let he = |fan_in: usize| (6.0 / fan_in as f32).sqrt();
        let vars = vec![
            uniform_var(rng, &[9 * channels, c1], he(9 * channels))?,
            zero_var(&[c1])?,
            uniform_var(rng, &[9 * c1, c2], he(9 * c1))?,
            zero_var(&[c2])?,
            uniform_var(rng, &[hid, flat], he(flat))?,
            zero_var(&[hid])?,
            uniform_var(rng, &[classes, hid], (3.0 / hid as f32).sqrt())?,
            zero_var(&[classes])?,
        ];
        let t = |i: usize| vars[i].as_tensor().clone();
        let net = Net {
            conv1_w: t(0),
            conv1_b: t(1),
            conv2_w: t(2),
            conv2_b: t(3),
            fc1_w: t(4),
            fc1_b: t(5),
            fc2_w: t(6),
            fc2_b: t(7),
        };
        Ok(Params { vars, net })
    }
}

/// Writes image `src` (CHW) into `dst` (HWC), mirrored and shifted by `(dy, dx)` with edge
/// replication.
fn augment_into(
    src: &[f32],
    dst: &mut [f32],
    (c, h, w): (usize, usize, usize),
    flip: bool,
    dy: isize,
    dx: isize,
) {
    for y in 0..h {
        let sy = (y as isize - dy).clamp(0, h as isize - 1) as usize;
        for x in 0..w {
            let mut sx = (x as isize - dx).clamp(0, w as isize - 1) as usize;
            if flip {
                sx = w - 1 - sx;
            }
            for ch in 0..c {
                dst[(y * w + x) * c + ch] = src[ch * h * w + sy * w + sx];
            }
        }
    }
}

/// Current learning rate of the per-step cosine schedule.
fn cosine_lr(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    let lo = cfg.learning_rate * cfg.final_lr_fraction;
    let t = step as f64 / total.max(1) as f64;
    lo + 0.5 * (cfg.learning_rate - lo) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Fraction of `ds` that `net` classifies correctly (evaluation mode, batches of 500).
pub(crate) fn accuracy(net: &Net, ds: &Dataset) -> anyhow::Result<f32> {
    if ds.is_empty() {
        return Ok(0.0);
    }
    let len = ds.image_len();
    let mut correct = 0usize;
    for (chunk, labels) in ds.images.chunks(500 * len).zip(ds.labels.chunks(500)) {
        let x = chw_batch_to_nhwc(chunk, labels.len(), ds.channels, ds.height, ds.width)?;
        let pred = net.forward(&x, None)?.argmax(1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    }
    Ok(correct as f32 / ds.len() as f32)
}

/// Trains a fresh network on `train`, reporting each epoch to `on_epoch`.
pub(crate) fn train_net(
    train: &Dataset,
    val: Option<&Dataset>,
    classes: usize,
    cfg: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<Net> {
    if train.is_empty() {
        bail!("no training images");
    }
    if cfg.batch_size == 0 {
        bail!("batch size must be positive");
    }
    let (c, h, w) = (train.channels, train.height, train.width);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let params = Params::init(cfg, c, h, w, classes, &mut rng)?;
    let mut opt = AdamW::new(
        params.vars.clone(),
        ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let len = train.image_len();
    let keep = 1.0 - cfg.dropout.clamp(0.0, 0.99);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut batch = vec![0f32; cfg.batch_size * len];
    let mut step = 0usize;
    let shift = cfg.max_shift as i64;
    for epoch in 1..=cfg.epochs {
        let start = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for idx in order.chunks(cfg.batch_size) {
            let n = idx.len();
            for (k, &i) in idx.iter().enumerate() {
                let flip = cfg.flip && rng.random::<bool>();
                let (dy, dx) = if shift > 0 {
                    (
                        rng.random_range(-shift..=shift) as isize,
                        rng.random_range(-shift..=shift) as isize,
                    )
                } else {
                    (0, 0)
                };
                augment_into(
                    train.image(i),
                    &mut batch[k * len..(k + 1) * len],
                    (c, h, w),
                    flip,
                    dy,
                    dx,
                );
            }
            let x = Tensor::from_slice(&batch[..n * len], (n, h, w, c), &Device::Cpu)?;
            let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
            let y = Tensor::from_vec(labels.clone(), n, &Device::Cpu)?;
            let mask = if cfg.dropout > 0.0 {
                let m: Vec<f32> = (0..n * cfg.hidden)
                    .map(|_| {
                        if rng.random::<f32>() < keep {
                            1.0 / keep
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Some(Tensor::from_vec(m, (n, cfg.hidden), &Device::Cpu)?)
            } else {
                None
            };
            opt.set_learning_rate(cosine_lr(cfg, step, total_steps));
            let logits = params.net.forward(&x, mask.as_ref())?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
            step += 1;
            loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        }
        let seconds = start.elapsed().as_secs_f64();
        let val_accuracy = match val {
            Some(v) if !v.is_empty() => Some(accuracy(&params.net, v)?),
            _ => None,
        };
        let stats = EpochStats {
            epoch,
            train_loss: (loss_sum / train.len() as f64) as f32,
            train_accuracy: correct as f32 / train.len() as f32,
            val_accuracy,
            seconds,
            learning_rate: opt.learning_rate(),
        };
        tracing::debug!(?stats, "epoch done");
        on_epoch(&stats);
    }
    Ok(params.net.detach())
}

/// Options shared by all training drivers.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Fraction of the training set held out for per-epoch validation.
    pub validation_split: f64,
    /// Directory that receives `model.safetensors` and `metadata.json`.
    pub output: PathBuf,
    /// Model name for the metadata.
    pub name: String,
    /// Model version for the metadata.
    pub version: String,
    /// Exact command line, recorded in the metadata.
    pub command: String,
}

/// What a training run produced.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained model, ready to predict.
    pub classifier: Classifier,
    /// Per-epoch metrics.
    pub epochs: Vec<EpochStats>,
}

/// Prints one epoch line on stdout (the CLI's progress report).
pub fn print_epoch(s: &EpochStats) {
    let val = s
        .val_accuracy
        .map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "epoch {:>3}: train loss {:.4}  train acc {:.2}%  val acc {}  lr {:.2e}  {:.1}s",
        s.epoch,
        s.train_loss,
        s.train_accuracy * 100.0,
        val,
        s.learning_rate,
        s.seconds
    );
}

/// Human readable layer list for the metadata.
fn architecture(cfg: &TrainConfig, c: usize, h: usize, w: usize, classes: usize) -> String {
    format!(
        "input {h}x{w}x{c} (NHWC) -> conv3x3 pad1 {c}->{c1} -> maxpool2 -> ReLU -> conv3x3 pad1 {c1}->{c2} -> maxpool2 -> ReLU -> flatten(h,w,c) {flat} -> linear {flat}->{hid} -> ReLU -> dropout {p} -> linear {hid}->{classes} -> softmax",
        c1 = cfg.conv1_channels,
        c2 = cfg.conv2_channels,
        hid = cfg.hidden,
        flat = (h / 4) * (w / 4) * cfg.conv2_channels,
        p = cfg.dropout,
    )
}

/// Shared tail of the drivers: split validation, train, test, write the model directory.
#[allow(clippy::too_many_arguments)]
fn train_and_save(
    opts: &RunOptions,
    full_train: &Dataset,
    test: &Dataset,
    norm: Normalization,
    class_names: Vec<String>,
    class_dirs: Vec<String>,
    dataset: String,
    mut on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<TrainOutcome> {
    let cfg = &opts.config;
    let (train_idx, val_idx) =
        data::seeded_split(full_train.len(), opts.validation_split, cfg.seed ^ 0x5eed);
    let train = full_train.subset(&train_idx);
    let val = full_train.subset(&val_idx);
    tracing::info!(
        train = train.len(),
        validation = val.len(),
        test = test.len(),
        "training"
    );
    let mut epochs = Vec::new();
    let start = Instant::now();
    let net = train_net(&train, Some(&val), class_names.len(), cfg, |s| {
        on_epoch(s);
        epochs.push(s.clone());
    })?;
    let training_seconds = start.elapsed().as_secs_f64();
    let test_accuracy = accuracy(&net, test)?;
    let (c, h, w) = (full_train.channels, full_train.height, full_train.width);
    let meta = ModelMetadata {
        name: opts.name.clone(),
        version: opts.version.clone(),
        architecture: architecture(cfg, c, h, w, class_names.len()),
        input_width: w as u32,
        input_height: h as u32,
        input_channels: c as u32,
        normalization: norm,
        invert: false,
        class_names,
        class_dirs,
        dataset,
        test_accuracy,
        test_samples: test.len(),
        training_seconds,
        epochs: cfg.epochs,
        command: opts.command.clone(),
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        learning_rate: cfg.learning_rate,
        tensor_layout: "NHWC".into(),
        created_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    meta.validate()?;
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("creating {}", opts.output.display()))?;
    net.save(&opts.output.join(WEIGHTS_FILE))?;
    meta.save(&opts.output)?;
    Ok(TrainOutcome {
        classifier: Classifier::from_parts(meta, net)?,
        epochs,
    })
}

/// Trains on Fashion-MNIST from `dir` (idx files, `.gz` or raw); tests on the full t10k set.
pub fn train_fashion_mnist(
    dir: &Path,
    opts: &RunOptions,
    on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<TrainOutcome> {
    let ds = data::load_fashion_mnist(dir)?;
    let norm = data::gray_normalization(&ds.train.pixels);
    let classes = ds.train.labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let (names, dirs): (Vec<String>, Vec<String>) = if classes <= 10 {
        (
            data::FASHION_MNIST_CLASS_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            data::FASHION_MNIST_CLASS_DIRS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    } else {
        bail!(
            "labels go up to {}, Fashion-MNIST has 10 classes",
            classes - 1
        );
    };
    train_and_save(
        opts,
        &ds.train.to_dataset(&norm),
        &ds.test.to_dataset(&norm),
        norm,
        names,
        dirs,
        "Fashion-MNIST".into(),
        on_epoch,
    )
}

/// Image-folder specific options.
#[derive(Clone, Debug)]
pub struct ImageFolderOptions {
    /// Side length images are resized to.
    pub image_size: u32,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: u32,
    /// Fraction of all images held out as the test set.
    pub test_split: f64,
}

/// Trains on a folder of class folders; normalisation is measured on the data.
pub fn train_image_folder(
    dir: &Path,
    folder: &ImageFolderOptions,
    opts: &RunOptions,
    on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<TrainOutcome> {
    if !(folder.channels == 1 || folder.channels == 3) {
        bail!("--channels must be 1 or 3");
    }
    if folder.image_size < 4 {
        bail!("--image-size must be at least 4");
    }
    let c = folder.channels as usize;
    let identity = Normalization {
        mean: vec![0.0; c],
        std: vec![1.0; c],
    };
    let pre = Preprocessor::with_params(
        folder.image_size,
        folder.image_size,
        folder.channels,
        false,
        &identity,
    );
    let mut loaded = data::load_image_folder(dir, &pre)?;
    if loaded.data.len() < 2 {
        bail!(
            "{} has {} readable images; need at least 2",
            dir.display(),
            loaded.data.len()
        );
    }
    if !loaded.skipped.is_empty() {
        tracing::warn!(count = loaded.skipped.len(), "skipped unreadable files");
    }
    // Measure per-channel mean/std on the [0,1] pixels and normalise in place.
    let plane = (folder.image_size * folder.image_size) as usize;
    let mut mean = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for img in loaded.data.images.chunks_exact(c * plane) {
        for ch in 0..c {
            for &v in &img[ch * plane..(ch + 1) * plane] {
                mean[ch] += v as f64;
                sq[ch] += (v as f64) * (v as f64);
            }
        }
    }
    let count = (loaded.data.len() * plane) as f64;
    let norm = Normalization {
        mean: mean.iter().map(|m| (m / count) as f32).collect(),
        std: mean
            .iter()
            .zip(&sq)
            .map(|(m, s)| {
                let mu = m / count;
                ((s / count - mu * mu).max(0.0).sqrt() as f32).max(1e-3)
            })
            .collect(),
    };
    for img in loaded.data.images.chunks_exact_mut(c * plane) {
        for ch in 0..c {
            for v in &mut img[ch * plane..(ch + 1) * plane] {
                *v = (*v - norm.mean[ch]) / norm.std[ch];
            }
        }
    }
    let (train_idx, test_idx) =
        data::seeded_split(loaded.data.len(), folder.test_split, opts.config.seed);
    let train = loaded.data.subset(&train_idx);
    let test = loaded.data.subset(&test_idx);
    train_and_save(
        opts,
        &train,
        &test,
        norm,
        loaded.class_dirs.clone(),
        loaded.class_dirs,
        format!("image folder {}", dir.display()),
        on_epoch,
    )
}

/// Test accuracy of a saved model on Fashion-MNIST's t10k set, fed through the same
/// [`Preprocessor`] as the server uses. Returns (accuracy, number of test images).
pub fn evaluate_fashion_mnist(model_dir: &Path, data_dir: &Path) -> anyhow::Result<(f32, usize)> {
    let clf = Classifier::load(model_dir)?;
    let ds = data::load_fashion_mnist(data_dir)?;
    let pre = Preprocessor::new(clf.metadata());
    let mut correct = 0usize;
    let batch = 500;
    let mut inputs = Vec::with_capacity(batch * pre.input_len());
    for start in (0..ds.test.n).step_by(batch) {
        let end = (start + batch).min(ds.test.n);
        inputs.clear();
        for i in start..end {
            pre.append_input(
                &image::DynamicImage::ImageLuma8(ds.test.gray_image(i)),
                &mut inputs,
            );
        }
        let probs = clf.predict(&inputs, end - start)?;
        for (i, p) in (start..end).zip(probs) {
            if argmax(&p) == ds.test.labels[i] as usize {
                correct += 1;
            }
        }
    }
    Ok((correct as f32 / ds.test.n.max(1) as f32, ds.test.n))
}

/// Index of the largest value (first one on ties); 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Writes up to `per_class` test images per class as PNGs into `out/<class_dir>/<index>.png`
/// (index = position in the t10k set, 5 digits). Returns the number of files written.
pub fn export_samples(data_dir: &Path, per_class: usize, out: &Path) -> anyhow::Result<usize> {
    let ds = data::load_fashion_mnist(data_dir)?;
    let mut counts = [0usize; 10];
    let mut written = 0;
    for i in 0..ds.test.n {
        let label = ds.test.labels[i] as usize;
        let Some(dir_name) = data::FASHION_MNIST_CLASS_DIRS.get(label) else {
            bail!("test label {label} out of range");
        };
        if counts[label] >= per_class {
            continue;
        }
        let dir = out.join(dir_name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{i:05}.png"));
        ds.test
            .gray_image(i)
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        counts[label] += 1;
        written += 1;
        if counts.iter().all(|&c| c >= per_class) {
            break;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augment_identity_flip_and_shift() {
        // 1 channel, 2x3 image: values 0..6
        let src: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let mut dst = vec![0f32; 6];
        augment_into(&src, &mut dst, (1, 2, 3), false, 0, 0);
        assert_eq!(dst, src);
        augment_into(&src, &mut dst, (1, 2, 3), true, 0, 0);
        assert_eq!(dst, vec![2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
        augment_into(&src, &mut dst, (1, 2, 3), false, 0, 1);
        assert_eq!(dst, vec![0.0, 0.0, 1.0, 3.0, 3.0, 4.0]);
        // CHW -> HWC for 2 channels
        let src: Vec<f32> = vec![1.0, 2.0, 10.0, 20.0];
        let mut dst = vec![0f32; 4];
        augment_into(&src, &mut dst, (2, 1, 2), false, 0, 0);
        assert_eq!(dst, vec![1.0, 10.0, 2.0, 20.0]);
    }

    #[test]
    fn cosine_schedule_endpoints() {
        let cfg = TrainConfig::default();
        assert!((cosine_lr(&cfg, 0, 100) - cfg.learning_rate).abs() < 1e-12);
        let end = cosine_lr(&cfg, 100, 100);
        assert!((end - cfg.learning_rate * cfg.final_lr_fraction).abs() < 1e-12);
    }

    #[test]
    fn argmax_picks_first_max() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), 1);
        assert_eq!(argmax(&[]), 0);
    }
}
