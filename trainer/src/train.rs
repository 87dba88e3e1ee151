//! Training loop (AdamW with warm-up and cosine decay, optional flip/shift/erase
//! augmentation, dropout, label smoothing, early stopping that keeps the best validation
//! epoch) and the end-to-end "train on a dataset and write a model directory" drivers used
//! by the CLI.

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
use crate::evaluate::Evaluation;

/// Random changes applied to each training image every time it is used. All off by
/// default: what is harmless for one dataset is wrong for another (a mirrored garment is
/// still a garment, a mirrored letter or arrow is another class).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augment {
    /// Mirror images left-right with probability 1/2.
    pub flip: bool,
    /// Translate by up to this many pixels in each direction (edge pixels are replicated;
    /// 0 = off).
    pub max_shift: usize,
    /// Random erasing: with probability 1/2, blank a random rectangle of 2–25% of the image
    /// to the dataset mean.
    pub erase: bool,
}

impl Augment {
    /// Shift amount `--augment shift` uses unless `--max-shift` says otherwise.
    pub const DEFAULT_SHIFT: usize = 1;

    /// Parses the `--augment` list: `flip`, `shift`, `erase` (comma separated) or `none`.
    pub fn parse(list: &str, max_shift: usize) -> Result<Augment, String> {
        let mut a = Augment::default();
        for kind in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            match kind {
                "none" => {}
                "flip" => a.flip = true,
                "shift" => a.max_shift = max_shift,
                "erase" => a.erase = true,
                other => {
                    return Err(format!(
                        "unknown augmentation {other:?} (known: flip, shift, erase, none)"
                    ))
                }
            }
        }
        Ok(a)
    }

    /// The `--augment` list that gives this (recorded in the metadata).
    pub fn describe(&self) -> String {
        let mut kinds = Vec::new();
        if self.flip {
            kinds.push("flip".to_string());
        }
        if self.max_shift > 0 {
            kinds.push(format!("shift({}px)", self.max_shift));
        }
        if self.erase {
            kinds.push("erase".to_string());
        }
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(",")
        }
    }
}

/// How many epochs to run when the caller does not say: enough for at least this many
/// optimisation steps, so a dataset of a few thousand images converges as well as
/// Fashion-MNIST's 60,000 do in [`MIN_AUTO_EPOCHS`] epochs...
pub const AUTO_MIN_STEPS: usize = 3000;
/// ...and never fewer epochs than this...
pub const MIN_AUTO_EPOCHS: usize = 15;
/// ...nor more than this (early stopping usually ends a small dataset's run before).
pub const MAX_AUTO_EPOCHS: usize = 100;

/// Hyper-parameters of one training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Passes over the training set; `None` picks them from the data size (see
    /// [`TrainConfig::epochs_for`]).
    pub epochs: Option<usize>,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Peak learning rate of AdamW (reached after the warm-up, then cosine decayed per step
    /// to `learning_rate * final_lr_fraction`).
    pub learning_rate: f64,
    /// Final learning rate as a fraction of the peak.
    pub final_lr_fraction: f64,
    /// Fraction of all steps spent warming the learning rate up linearly from near 0.
    pub warmup_fraction: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Dropout probability on the hidden layer.
    pub dropout: f32,
    /// Label smoothing ε: the target is `1 - ε` on the true class plus `ε / classes` on
    /// every class (0 = plain cross-entropy).
    pub label_smoothing: f32,
    /// Stop when the validation accuracy has not improved for this many epochs (`None`:
    /// a quarter of the epochs, at least 5). The best epoch's weights are kept either way.
    pub patience: Option<usize>,
    /// Seed for initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Training-time augmentation.
    pub augment: Augment,
    /// Channels of the first convolution.
    pub conv1_channels: usize,
    /// Channels of the second convolution.
    pub conv2_channels: usize,
    /// Units of the hidden linear layer.
    pub hidden: usize,
    /// Start from a pretrained network instead of random weights (fine-tuning with
    /// `--unfreeze 2` or more); its layer sizes then replace the three above.
    pub start: Option<Pretrained>,
}

/// A pretrained network to start from, and how much of it to keep fixed.
#[derive(Clone, Debug)]
pub struct Pretrained {
    /// The network; its output layer is replaced by a new one for the new classes.
    pub net: Net,
    /// Leading layers (of conv1, conv2, fc1) kept as they are.
    pub frozen_layers: usize,
    /// What the model's metadata records as its backbone.
    pub backbone: String,
    /// Whether the backbone inverts its input (kept in the new model's metadata).
    pub invert: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: None,
            batch_size: 128,
            learning_rate: 2e-3,
            final_lr_fraction: 0.02,
            warmup_fraction: 0.03,
            weight_decay: 1e-4,
            dropout: 0.3,
            label_smoothing: 0.0,
            patience: None,
            seed: 42,
            augment: Augment {
                max_shift: Augment::DEFAULT_SHIFT,
                ..Augment::default()
            },
            conv1_channels: 32,
            conv2_channels: 64,
            hidden: 128,
            start: None,
        }
    }
}

impl TrainConfig {
    /// The epochs to run on `train_len` images: the given number, or enough for
    /// [`AUTO_MIN_STEPS`] steps within [`MIN_AUTO_EPOCHS`]..=[`MAX_AUTO_EPOCHS`].
    pub fn epochs_for(&self, train_len: usize) -> usize {
        self.epochs.unwrap_or_else(|| {
            let steps_per_epoch = train_len.div_ceil(self.batch_size.max(1)).max(1);
            AUTO_MIN_STEPS
                .div_ceil(steps_per_epoch)
                .clamp(MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS)
        })
    }

    /// AdamW over `vars` with this run's peak learning rate and weight decay.
    pub(crate) fn optimizer(&self, vars: Vec<Var>) -> candle_core::Result<AdamW> {
        AdamW::new(
            vars,
            ParamsAdamW {
                lr: self.learning_rate,
                weight_decay: self.weight_decay,
                ..Default::default()
            },
        )
    }

    /// Epochs without improvement after which training stops, for a run of `epochs`.
    pub fn patience_for(&self, epochs: usize) -> usize {
        self.patience.unwrap_or((epochs / 4).max(5))
    }
}

/// Metrics of one epoch, reported to the caller as training progresses.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Epochs this run will do at most.
    pub of_epochs: usize,
    /// Mean training loss (label-smoothed, if smoothing is on) over the epoch's batches.
    pub train_loss: f32,
    /// Accuracy on the (augmented, dropout) training batches.
    pub train_accuracy: f32,
    /// Accuracy on the validation set, if there is one.
    pub val_accuracy: Option<f32>,
    /// Mean plain cross-entropy on the validation set, if there is one.
    pub val_loss: Option<f32>,
    /// Whether this epoch is the best so far on the validation set (its weights are kept).
    pub best: bool,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
    /// Learning rate at the end of the epoch.
    pub learning_rate: f64,
}

/// A finished training run: the kept weights and where they came from.
#[derive(Debug)]
pub(crate) struct TrainedNet {
    /// Weights of the best epoch on the validation set (the last epoch without one).
    pub net: Net,
    /// The epoch `net` comes from.
    pub best_epoch: usize,
    /// Epochs actually run (fewer than planned when early stopping ended the run).
    pub epochs_run: usize,
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
        let (c1, c2, hid) = match &cfg.start {
            Some(start) => layer_sizes(&start.net)?,
            None => (cfg.conv1_channels, cfg.conv2_channels, cfg.hidden),
        };
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
        if let Some(start) = &cfg.start {
            return Self::from_pretrained(start, vars);
        }
        let net = net_in_order(|i| vars[i].as_tensor().clone());
        Ok(Params { vars, net })
    }

    /// The pretrained network's layers with the new output layer of `fresh` (random
    /// weights for every layer, of the same sizes): the frozen layers as plain tensors,
    /// the rest as variables.
    fn from_pretrained(start: &Pretrained, fresh: Vec<Var>) -> anyhow::Result<Self> {
        let n = &start.net;
        let pretrained = [
            &n.conv1_w, &n.conv1_b, &n.conv2_w, &n.conv2_b, &n.fc1_w, &n.fc1_b,
        ];
        let mut vars = Vec::new();
        let mut tensors = Vec::new();
        for (i, t) in pretrained.into_iter().enumerate() {
            if i / 2 < start.frozen_layers {
                tensors.push(t.detach());
            } else {
                let var = Var::from_tensor(&t.detach().copy()?)?;
                tensors.push(var.as_tensor().clone());
                vars.push(var);
            }
        }
        for var in fresh.into_iter().skip(6) {
            tensors.push(var.as_tensor().clone());
            vars.push(var);
        }
        let net = net_in_order(|i| tensors[i].clone());
        Ok(Params { vars, net })
    }
}

/// A network from its eight tensors in [`Net::named`]'s order (conv1, conv2, fc1, fc2;
/// weight then bias), `t(i)` giving the i-th.
fn net_in_order(t: impl Fn(usize) -> Tensor) -> Net {
    Net {
        conv1_w: t(0),
        conv1_b: t(1),
        conv2_w: t(2),
        conv2_b: t(3),
        fc1_w: t(4),
        fc1_b: t(5),
        fc2_w: t(6),
        fc2_b: t(7),
    }
}

/// Channels of a network's two convolutions and units of its hidden layer.
fn layer_sizes(net: &Net) -> anyhow::Result<(usize, usize, usize)> {
    Ok((
        net.conv1_w.dims2()?.1,
        net.conv2_w.dims2()?.1,
        net.fc1_w.dims2()?.0,
    ))
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

/// A rectangle of an image, `(top, left, height, width)`.
type Rect = (usize, usize, usize, usize);

/// Picks the rectangle random erasing blanks: 2–25% of the area, aspect ratio 1/3–3.
fn erase_rect(rng: &mut StdRng, h: usize, w: usize) -> Rect {
    let area = (h * w) as f64 * rng.random_range(0.02..0.25);
    let aspect: f64 = rng.random_range((1.0f64 / 3.0).ln()..3.0f64.ln()).exp();
    let eh = ((area * aspect).sqrt().round() as usize).clamp(1, h);
    let ew = ((area / aspect).sqrt().round() as usize).clamp(1, w);
    (
        rng.random_range(0..=h - eh),
        rng.random_range(0..=w - ew),
        eh,
        ew,
    )
}

/// Sets every channel of `rect` of an HWC image to 0 (the dataset mean, once normalised).
fn erase(dst: &mut [f32], (c, _h, w): (usize, usize, usize), (top, left, eh, ew): Rect) {
    for y in top..top + eh {
        dst[(y * w + left) * c..(y * w + left + ew) * c].fill(0.0);
    }
}

/// Inverted dropout multipliers for an `(rows, cols)` activation: each 0 with probability
/// `dropout`, else `1 / (1 - dropout)`; `None` when `dropout` is 0.
pub(crate) fn dropout_mask(
    rng: &mut StdRng,
    (rows, cols): (usize, usize),
    dropout: f32,
) -> candle_core::Result<Option<Tensor>> {
    if dropout <= 0.0 {
        return Ok(None);
    }
    let keep = 1.0 - dropout.clamp(0.0, 0.99);
    let m: Vec<f32> = (0..rows * cols)
        .map(|_| {
            if rng.random::<f32>() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    Ok(Some(Tensor::from_vec(m, (rows, cols), &Device::Cpu)?))
}

/// Learning rate at `step` of `total`: linear warm-up over the first `warmup_fraction` of
/// the steps, then cosine decay to `learning_rate * final_lr_fraction`.
pub(crate) fn scheduled_lr(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    let warmup = (total as f64 * cfg.warmup_fraction).round() as usize;
    if step < warmup {
        return cfg.learning_rate * (step + 1) as f64 / warmup as f64;
    }
    let lo = cfg.learning_rate * cfg.final_lr_fraction;
    let t = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    lo + 0.5 * (cfg.learning_rate - lo) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Cross-entropy of `logits` against labels `y`, with label smoothing `eps`.
pub(crate) fn training_loss(logits: &Tensor, y: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if eps <= 0.0 {
        return candle_nn::loss::cross_entropy(logits, y);
    }
    let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = candle_nn::loss::nll(&log_probs, y)?;
    // The uniform part of the target: the mean over classes (and the batch) of -log p.
    let uniform = log_probs.mean_all()?;
    nll.affine(1.0 - eps as f64, 0.0)? - uniform.affine(eps as f64, 0.0)?
}

/// Predicted labels of `net` on `ds` and its mean cross-entropy there (evaluation mode,
/// batches of 500).
pub(crate) fn predict_dataset(net: &Net, ds: &Dataset) -> anyhow::Result<(Vec<u32>, f32)> {
    let len = ds.image_len();
    let mut preds = Vec::with_capacity(ds.len());
    let mut loss_sum = 0f64;
    for (chunk, labels) in ds.images.chunks(500 * len).zip(ds.labels.chunks(500)) {
        let x = chw_batch_to_nhwc(chunk, labels.len(), ds.channels, ds.height, ds.width)?;
        let logits = net.forward(&x, None)?;
        let y = Tensor::from_slice(labels, labels.len(), &Device::Cpu)?;
        loss_sum += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64
            * labels.len() as f64;
        preds.extend(logits.argmax(1)?.to_vec1::<u32>()?);
    }
    Ok((preds, (loss_sum / ds.len().max(1) as f64) as f32))
}

/// A copy of `net`'s weights that later optimiser steps do not change.
fn snapshot(net: &Net) -> candle_core::Result<Net> {
    let copy = |t: &Tensor| t.detach().copy();
    Ok(Net {
        conv1_w: copy(&net.conv1_w)?,
        conv1_b: copy(&net.conv1_b)?,
        conv2_w: copy(&net.conv2_w)?,
        conv2_b: copy(&net.conv2_b)?,
        fc1_w: copy(&net.fc1_w)?,
        fc1_b: copy(&net.fc1_b)?,
        fc2_w: copy(&net.fc2_w)?,
        fc2_b: copy(&net.fc2_b)?,
    })
}

/// Fills `batch` with the augmented images `idx` of `train` (HWC each).
fn fill_batch(
    train: &Dataset,
    idx: &[usize],
    augment: &Augment,
    rng: &mut StdRng,
    batch: &mut [f32],
) {
    let dims = (train.channels, train.height, train.width);
    let len = train.image_len();
    let shift = augment.max_shift as i64;
    for (k, &i) in idx.iter().enumerate() {
        let flip = augment.flip && rng.random::<bool>();
        let (dy, dx) = if shift > 0 {
            (
                rng.random_range(-shift..=shift) as isize,
                rng.random_range(-shift..=shift) as isize,
            )
        } else {
            (0, 0)
        };
        let dst = &mut batch[k * len..(k + 1) * len];
        augment_into(train.image(i), dst, dims, flip, dy, dx);
        if augment.erase && rng.random::<bool>() {
            let rect = erase_rect(rng, train.height, train.width);
            erase(dst, dims, rect);
        }
    }
}

/// The best epoch so far on the validation set (accuracy, then loss) and a copy of its
/// weights: what early stopping keeps and when it stops.
pub(crate) struct BestEpoch<T> {
    best: Option<(usize, f32, f32, T)>,
    patience: usize,
}

impl<T> BestEpoch<T> {
    /// No epoch yet; training stops after `patience` epochs without a better one.
    pub(crate) fn new(patience: usize) -> Self {
        BestEpoch {
            best: None,
            patience,
        }
    }

    /// Records `epoch`'s validation result (if there was a validation set); when it is the
    /// best so far, keeps `weights()` and returns true.
    pub(crate) fn offer(
        &mut self,
        epoch: usize,
        validation: Option<(f32, f32)>,
        weights: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<bool> {
        let Some((acc, loss)) = validation else {
            return Ok(false);
        };
        let improved = match &self.best {
            None => true,
            Some((_, best_acc, best_loss, _)) => {
                acc > *best_acc || (acc == *best_acc && loss < *best_loss)
            }
        };
        if improved {
            self.best = Some((epoch, acc, loss, weights()?));
        }
        Ok(improved)
    }

    /// Whether a run of `epochs` should stop after `epoch` (no better epoch for the
    /// patience); logs why.
    pub(crate) fn should_stop(&self, epoch: usize, epochs: usize) -> bool {
        let Some((best_epoch, ..)) = &self.best else {
            return false;
        };
        let stop = epoch - best_epoch >= self.patience && epoch < epochs;
        if stop {
            tracing::info!(
                epoch,
                best_epoch,
                patience = self.patience,
                "stopping early: no better validation accuracy for the patience"
            );
        }
        stop
    }

    /// The weights to keep and their epoch: the best validated epoch's, or (no
    /// validation) the last epoch's, `last()`, after `epochs_run`.
    pub(crate) fn kept(
        self,
        epochs_run: usize,
        last: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, usize)> {
        match self.best {
            Some((epoch, _, _, weights)) => Ok((weights, epoch)),
            None => Ok((last()?, epochs_run)),
        }
    }
}

/// Trains a fresh network on `train`, reporting each epoch to `on_epoch`. With a
/// validation set, the weights of its best epoch (accuracy, then loss) are kept and the run
/// stops early once it has not improved for the patience.
pub(crate) fn train_net(
    train: &Dataset,
    val: Option<&Dataset>,
    classes: usize,
    cfg: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<TrainedNet> {
    if train.is_empty() {
        bail!("no training images");
    }
    if cfg.batch_size == 0 {
        bail!("batch size must be positive");
    }
    let val = val.filter(|v| !v.is_empty());
    let (c, h, w) = (train.channels, train.height, train.width);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let params = Params::init(cfg, c, h, w, classes, &mut rng)?;
    let mut opt = cfg.optimizer(params.vars.clone())?;
    let epochs = cfg.epochs_for(train.len());
    let patience = cfg.patience_for(epochs);
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * epochs;
    tracing::info!(
        epochs,
        steps = total_steps,
        patience,
        augment = %cfg.augment.describe(),
        "training schedule"
    );
    let len = train.image_len();
    let hidden = params.net.fc1_w.dims2()?.0;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut batch = vec![0f32; cfg.batch_size * len];
    let mut step = 0usize;
    let mut best = BestEpoch::new(patience);
    let mut epochs_run = 0;
    for epoch in 1..=epochs {
        let start = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for idx in order.chunks(cfg.batch_size) {
            let n = idx.len();
            fill_batch(train, idx, &cfg.augment, &mut rng, &mut batch);
            let x = Tensor::from_slice(&batch[..n * len], (n, h, w, c), &Device::Cpu)?;
            let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
            let y = Tensor::from_vec(labels.clone(), n, &Device::Cpu)?;
            let mask = dropout_mask(&mut rng, (n, hidden), cfg.dropout)?;
            opt.set_learning_rate(scheduled_lr(cfg, step, total_steps));
            let logits = params.net.forward(&x, mask.as_ref())?;
            let loss = training_loss(&logits, &y, cfg.label_smoothing)?;
            opt.backward_step(&loss)?;
            step += 1;
            loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        }
        let seconds = start.elapsed().as_secs_f64();
        epochs_run = epoch;
        let (val_accuracy, val_loss) = match val {
            Some(v) => {
                let (preds, loss) = predict_dataset(&params.net, v)?;
                let right = preds.iter().zip(&v.labels).filter(|(p, l)| p == l).count();
                (Some(right as f32 / v.len() as f32), Some(loss))
            }
            None => (None, None),
        };
        let improved = best.offer(epoch, val_accuracy.zip(val_loss), || {
            Ok(snapshot(&params.net)?)
        })?;
        let stats = EpochStats {
            epoch,
            of_epochs: epochs,
            train_loss: (loss_sum / train.len() as f64) as f32,
            train_accuracy: correct as f32 / train.len() as f32,
            val_accuracy,
            val_loss,
            best: improved,
            seconds,
            learning_rate: opt.learning_rate(),
        };
        tracing::debug!(?stats, "epoch done");
        on_epoch(&stats);
        if best.should_stop(epoch, epochs) {
            break;
        }
    }
    let (net, best_epoch) = best.kept(epochs_run, || Ok(params.net.detach()))?;
    Ok(TrainedNet {
        net,
        best_epoch,
        epochs_run,
    })
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
    /// The kept weights' results on the test set, class by class.
    pub test: Evaluation,
}

/// Prints one epoch line on stdout (the CLI's progress report).
pub fn print_epoch(s: &EpochStats) {
    let val = s
        .val_accuracy
        .map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "epoch {:>3}/{}: train loss {:.4}  train acc {:.2}%  val acc {}{}  lr {:.2e}  {:.1}s",
        s.epoch,
        s.of_epochs,
        s.train_loss,
        s.train_accuracy * 100.0,
        val,
        if s.best { " (best)" } else { "" },
        s.learning_rate,
        s.seconds
    );
}

/// Human readable layer list for the metadata.
fn architecture(
    (c1, c2, hid): (usize, usize, usize),
    dropout: f32,
    (c, h, w): (usize, usize, usize),
    classes: usize,
) -> String {
    format!(
        "input {h}x{w}x{c} (NHWC) -> conv3x3 pad1 {c}->{c1} -> maxpool2 -> ReLU -> conv3x3 pad1 {c1}->{c2} -> maxpool2 -> ReLU -> flatten(h,w,c) {flat} -> linear {flat}->{hid} -> ReLU -> dropout {p} -> linear {hid}->{classes} -> softmax",
        flat = (h / 4) * (w / 4) * c2,
        p = dropout,
    )
}

/// Shared tail of the drivers: split validation, train, test, write the model directory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_and_save(
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
        data::stratified_split(&full_train.labels, opts.validation_split, cfg.seed ^ 0x5eed);
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
    let trained = train_net(&train, Some(&val), class_names.len(), cfg, |s| {
        on_epoch(s);
        epochs.push(s.clone());
    })?;
    let training_seconds = start.elapsed().as_secs_f64();
    let net = trained.net;
    let mut evaluation = Evaluation::new(class_names.clone());
    for (p, &t) in predict_dataset(&net, test)?.0.iter().zip(&test.labels) {
        evaluation.record(t as usize, *p as usize);
    }
    let test_accuracy = evaluation.accuracy() as f32;
    let (c, h, w) = (full_train.channels, full_train.height, full_train.width);
    let meta = ModelMetadata {
        name: opts.name.clone(),
        version: opts.version.clone(),
        architecture: architecture(
            layer_sizes(&net)?,
            cfg.dropout,
            (c, h, w),
            class_names.len(),
        ),
        input_width: w as u32,
        input_height: h as u32,
        input_channels: c as u32,
        normalization: norm,
        invert: cfg.start.as_ref().is_some_and(|s| s.invert),
        class_names,
        class_dirs,
        dataset,
        test_accuracy,
        test_samples: test.len(),
        training_seconds,
        epochs: trained.epochs_run,
        command: opts.command.clone(),
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        learning_rate: cfg.learning_rate,
        tensor_layout: "NHWC".into(),
        created_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        augment: cfg.augment.describe(),
        label_smoothing: cfg.label_smoothing,
        best_epoch: trained.best_epoch,
        backbone: cfg
            .start
            .as_ref()
            .map_or_else(String::new, |s| s.backbone.clone()),
    };
    meta.validate()?;
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("creating {}", opts.output.display()))?;
    net.save(&opts.output.join(WEIGHTS_FILE))?;
    meta.save(&opts.output)?;
    Ok(TrainOutcome {
        classifier: Classifier::from_parts(meta, net)?,
        epochs,
        test: evaluation,
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
        data::stratified_split(&loaded.data.labels, folder.test_split, opts.config.seed);
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
    fn schedule_warms_up_then_decays_to_its_floor() {
        let cfg = TrainConfig {
            warmup_fraction: 0.1,
            ..TrainConfig::default()
        };
        let lr = |step| scheduled_lr(&cfg, step, 100);
        assert!((lr(0) - cfg.learning_rate / 10.0).abs() < 1e-12);
        assert!(lr(4) < lr(5) && lr(5) < lr(9));
        assert!((lr(9) - cfg.learning_rate).abs() < 1e-12);
        assert!((lr(10) - cfg.learning_rate).abs() < 1e-12);
        assert!(lr(50) < lr(10) && lr(99) < lr(50));
        let end = scheduled_lr(&cfg, 100, 100);
        assert!((end - cfg.learning_rate * cfg.final_lr_fraction).abs() < 1e-12);
        // No warm-up: the peak at step 0.
        let plain = TrainConfig {
            warmup_fraction: 0.0,
            ..TrainConfig::default()
        };
        assert!((scheduled_lr(&plain, 0, 100) - plain.learning_rate).abs() < 1e-12);
    }

    #[test]
    fn epochs_follow_the_data_size_unless_given() {
        let cfg = TrainConfig::default();
        // Fashion-MNIST sized: the floor.
        assert_eq!(cfg.epochs_for(57_000), MIN_AUTO_EPOCHS);
        // 4,320 images = 34 steps per epoch: enough epochs for AUTO_MIN_STEPS.
        assert_eq!(cfg.epochs_for(4_320), AUTO_MIN_STEPS.div_ceil(34));
        assert_eq!(cfg.epochs_for(10), MAX_AUTO_EPOCHS);
        let fixed = TrainConfig {
            epochs: Some(5),
            ..TrainConfig::default()
        };
        assert_eq!(fixed.epochs_for(10), 5);
        assert_eq!(cfg.patience_for(100), 25);
        assert_eq!(cfg.patience_for(15), 5);
    }

    #[test]
    fn augment_lists_parse_and_describe() {
        let a = Augment::parse("flip,shift,erase", 2).unwrap();
        assert_eq!(
            a,
            Augment {
                flip: true,
                max_shift: 2,
                erase: true
            }
        );
        assert_eq!(a.describe(), "flip,shift(2px),erase");
        assert_eq!(Augment::parse("none", 1).unwrap().describe(), "none");
        assert_eq!(Augment::parse("", 1).unwrap(), Augment::default());
        assert!(Augment::parse("rotate", 1).unwrap_err().contains("rotate"));
        // The default is safe for any folder: no mirroring.
        assert!(!TrainConfig::default().augment.flip);
    }

    #[test]
    fn erasing_blanks_a_rectangle_inside_the_image() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let (top, left, eh, ew) = erase_rect(&mut rng, 28, 20);
            assert!(eh >= 1 && ew >= 1 && top + eh <= 28 && left + ew <= 20);
        }
        let mut img = vec![1f32; 2 * 3 * 4]; // 2 channels, 3x4, HWC
        erase(&mut img, (2, 3, 4), (1, 1, 2, 2));
        let zeros: Vec<usize> = (0..img.len()).filter(|&i| img[i] == 0.0).collect();
        // Pixels (1,1), (1,2), (2,1), (2,2), both channels each.
        assert_eq!(zeros, vec![10, 11, 12, 13, 18, 19, 20, 21]);
    }

    #[test]
    fn label_smoothing_is_cross_entropy_at_zero_and_mixes_in_uniform() -> anyhow::Result<()> {
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.5, 0.5, 3.0]], &Device::Cpu)?;
        let y = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        let plain = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        let at_zero = training_loss(&logits, &y, 0.0)?.to_scalar::<f32>()?;
        assert_eq!(plain, at_zero);
        // By hand: -(1-e) log p_true - e/3 sum log p, averaged over the two rows.
        let lp = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f32>()?;
        let e = 0.1f32;
        let want = ((0..2)
            .map(|r| {
                let t = [0, 2][r];
                -(1.0 - e) * lp[r][t] - e / 3.0 * lp[r].iter().sum::<f32>()
            })
            .sum::<f32>())
            / 2.0;
        let got = training_loss(&logits, &y, e)?.to_scalar::<f32>()?;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        Ok(())
    }
}
