//! Fine-tuning (`trainer train --image-folder DIR --from MODEL`): a model the server can
//! serve, cut at its feature layer, with a new head trained on a folder of class folders.
//! A few hundred photos per class are enough because the backbone was trained on far
//! more: only the head (a linear layer, or a small MLP) learns from them.
//!
//! Steps: load and cut the backbone ([`classifier_inference::Backbone`]); split the
//! folder class by class into training, validation and test images; compute every
//! image's features once ([`crate::features`], cached, with augmented copies of the
//! training images); train the head on them (AdamW, cosine schedule, early stopping on
//! the validation accuracy that keeps the best epoch, as [`crate::train`] does for the
//! whole CNN); measure it on the test images; write backbone + head as one model
//! directory; load that directory back as the server would and check that it answers
//! the test images as the head did.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use classifier_inference::backbone::{SavedFormat, NATIVE_FLATTEN};
use classifier_inference::model::{Net, WEIGHTS_FILE};
use classifier_inference::{Backbone, Classifier, Dense, ModelMetadata, Preprocessor};

use crate::data;
use crate::evaluate::Evaluation;
use crate::features::{self, FeatureSets, Features, Plan};
use crate::train::{self, BestEpoch, EpochStats, Pretrained, RunOptions};

/// The new head's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadKind {
    /// One linear layer from the features to the classes.
    Linear,
    /// Linear → ReLU → dropout → linear, with this many hidden units.
    Mlp {
        /// Hidden units.
        hidden: usize,
    },
}

/// What `--from` adds to a training run.
#[derive(Clone, Debug)]
pub struct FineTuneOptions {
    /// The backbone's model directory.
    pub from: PathBuf,
    /// The feature tensor (default: the input of the last linear layer).
    pub feature_node: Option<String>,
    /// The head to train.
    pub head: HeadKind,
    /// Layers of a native CNN backbone trained too: 0 (the head only), 1 (its hidden
    /// layer, on cached features), 2 or 3 (its second or both convolutions as well: the
    /// network is trained on the images, from the backbone's weights).
    pub unfreeze: usize,
    /// Augmented copies of each training image.
    pub copies: usize,
    /// Whether copies may be mirrored left-right.
    pub flip: bool,
    /// Where features are cached (`None`: not cached).
    pub cache_dir: Option<PathBuf>,
    /// Share of each class held out as the test set.
    pub test_split: f64,
}

/// What a fine-tuning run produced.
#[derive(Debug)]
pub struct FineTuneOutcome {
    /// The written model directory, loaded back as a server loads it.
    pub classifier: Classifier,
    /// Native CNN or ONNX.
    pub format: SavedFormat,
    /// Per-epoch metrics of the head's training.
    pub epochs: Vec<EpochStats>,
    /// The head's results on the test images, class by class.
    pub test: Evaluation,
    /// Test images on which the written model's top class differs from the head's
    /// (`None` when the whole network was trained: the model is what was trained).
    pub disagreements: Option<usize>,
    /// The features, their cache and timing (the training rows' values are dropped);
    /// `None` when the whole network was trained on the images (`--unfreeze 2` or 3).
    pub features: Option<FeatureSets>,
    /// Wall time of the head's training.
    pub head_seconds: f64,
}

/// Fine-tunes on the class folders of `dir` (module docs) and writes the model to
/// `opts.output`.
pub fn fine_tune(
    dir: &Path,
    ft: &FineTuneOptions,
    opts: &RunOptions,
    mut on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<FineTuneOutcome> {
    refuse_overwriting_the_backbone(&ft.from, &opts.output)?;
    check_unfreeze(ft)?;
    if ft.unfreeze >= 2 {
        return fine_tune_whole(dir, ft, opts, on_epoch);
    }
    let backbone = load_backbone(ft)?;
    tracing::info!(backbone = %backbone.describe(), "backbone loaded");
    let listing = data::list_image_folder(dir)?;
    if listing.class_dirs.len() < 2 {
        bail!(
            "{} has one class folder; a classifier needs two or more",
            dir.display()
        );
    }
    let seed = opts.config.seed;
    let (rest, test) = data::stratified_split(&listing.labels, ft.test_split, seed);
    let rest_labels: Vec<u32> = rest.iter().map(|&i| listing.labels[i]).collect();
    let (train_pos, val_pos) =
        data::stratified_split(&rest_labels, opts.validation_split, seed ^ 0x5eed);
    let (train, val): (Vec<usize>, Vec<usize>) = (
        train_pos.iter().map(|&k| rest[k]).collect(),
        val_pos.iter().map(|&k| rest[k]).collect(),
    );
    let plan = Plan {
        listing: &listing,
        splits: [&train, &val, &test],
        copies: ft.copies,
        flip: ft.flip,
        seed,
    };
    let mut sets = features::features(&backbone, &plan, ft.cache_dir.as_deref())?;
    if sets.train.is_empty() {
        bail!("{} has no readable training images", dir.display());
    }
    tracing::info!(
        train = sets.train.len(),
        validation = sets.val.len(),
        test = sets.test.len(),
        seconds = sets.seconds,
        "features ready"
    );
    let classes = listing.class_dirs.len();
    let start = Instant::now();
    let init = match ft.unfreeze {
        0 => None,
        _ => backbone.next_layer(),
    };
    let mut epochs = Vec::new();
    let trained = train_head(
        &sets.train,
        Some(&sets.val),
        classes,
        (ft.head, init),
        &opts.config,
        |s| {
            on_epoch(s);
            epochs.push(s.clone());
        },
    )?;
    let head_seconds = start.elapsed().as_secs_f64();
    let (test_eval, head_predictions) =
        evaluate_head(&trained.layers, &sets.test, &listing.class_dirs)?;
    let meta = metadata(
        opts,
        ft,
        &listing,
        dir,
        &test_eval,
        (&trained, head_seconds),
    );
    let format = backbone.save_with_head(&trained.layers, meta, &opts.output)?;
    let classifier = Classifier::load(&opts.output)
        .with_context(|| format!("loading the written model {}", opts.output.display()))?;
    let disagreements = disagreements(
        &classifier,
        &listing,
        &test,
        &sets.skipped,
        &head_predictions,
    )?;
    // More than a rounding-level difference means the written model is not the head.
    if disagreements * 50 > head_predictions.len() {
        bail!(
            "the written model {} answers {disagreements} of {} test images differently \
             from the head it was trained as",
            opts.output.display(),
            head_predictions.len()
        );
    }
    sets.train.values = Vec::new();
    Ok(FineTuneOutcome {
        classifier,
        format,
        epochs,
        test: test_eval,
        disagreements: Some(disagreements),
        features: Some(sets),
        head_seconds,
    })
}

/// `--unfreeze 2` or 3: the native CNN trained on the images (augmented afresh every
/// epoch, as [`train::train_image_folder`] does), starting from the backbone's weights
/// with a new output layer, its first `3 - unfreeze` layers kept as they are.
fn fine_tune_whole(
    dir: &Path,
    ft: &FineTuneOptions,
    opts: &RunOptions,
    on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<FineTuneOutcome> {
    let meta = ModelMetadata::load(&ft.from)?;
    let net = Net::load(&ft.from.join(WEIGHTS_FILE), &meta)?;
    let loaded = data::load_image_folder(dir, &Preprocessor::new(&meta))?;
    if loaded.class_dirs.len() < 2 || loaded.data.len() < 2 {
        bail!(
            "{} needs two or more class folders with images",
            dir.display()
        );
    }
    let (train_idx, test_idx) =
        data::stratified_split(&loaded.data.labels, ft.test_split, opts.config.seed);
    let mut opts = opts.clone();
    opts.config.start = Some(Pretrained {
        net,
        frozen_layers: 3 - ft.unfreeze,
        backbone: format!(
            "{} {} ({}, native CNN): its weights, the last {} of its 3 layers below the head \
             trained too",
            meta.name,
            meta.version,
            ft.from.display(),
            ft.unfreeze
        ),
        invert: meta.invert,
    });
    let start = Instant::now();
    let outcome = train::train_and_save(
        &opts,
        &loaded.data.subset(&train_idx),
        &loaded.data.subset(&test_idx),
        meta.normalization.clone(),
        loaded.class_dirs.clone(),
        loaded.class_dirs,
        format!("image folder {}", dir.display()),
        on_epoch,
    )?;
    Ok(FineTuneOutcome {
        classifier: Classifier::load(&opts.output)?,
        format: SavedFormat::Native,
        epochs: outcome.epochs,
        test: outcome.test,
        disagreements: None,
        features: None,
        head_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writing the model over its own backbone would lose the backbone.
fn refuse_overwriting_the_backbone(from: &Path, output: &Path) -> anyhow::Result<()> {
    let same = match (from.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        bail!(
            "--output {} is the backbone's own directory: write the fine-tuned model elsewhere",
            output.display()
        );
    }
    Ok(())
}

/// The backbone, cut where `--unfreeze` or `--feature-node` says.
fn load_backbone(ft: &FineTuneOptions) -> anyhow::Result<Backbone> {
    let node = match (ft.unfreeze, ft.feature_node.as_deref()) {
        (0, node) => node,
        (_, None | Some(NATIVE_FLATTEN)) => Some(NATIVE_FLATTEN),
        (n, Some(other)) => bail!(
            "--unfreeze {n} starts from the CNN's own layers; it cannot be combined with \
             --feature-node {other:?}"
        ),
    };
    let backbone = Backbone::load(&ft.from, node)?;
    if ft.unfreeze > 0 && backbone.next_layer().is_none() {
        bail!("--unfreeze needs a native CNN backbone (model.safetensors)");
    }
    Ok(backbone)
}

/// Refuses what `--unfreeze` cannot honour: a backbone that is not our CNN (only its
/// layers can be trained here), more layers than it has, or an option it would ignore.
fn check_unfreeze(ft: &FineTuneOptions) -> anyhow::Result<()> {
    if ft.unfreeze == 0 {
        return Ok(());
    }
    if !ft.from.join(WEIGHTS_FILE).is_file() {
        bail!(
            "--unfreeze {} needs a native CNN backbone (model.safetensors); {} is not one",
            ft.unfreeze,
            ft.from.display()
        );
    }
    if ft.unfreeze > 3 {
        bail!(
            "--unfreeze {}: a native CNN has 3 layers below its head (0 to 3)",
            ft.unfreeze
        );
    }
    if ft.head != HeadKind::Linear {
        bail!("--unfreeze trains the CNN's own hidden layer under a linear output layer: leave out --head mlp");
    }
    if ft.unfreeze >= 2 && ft.feature_node.is_some() {
        bail!(
            "--unfreeze {} trains on the images, not on features: leave out --feature-node",
            ft.unfreeze
        );
    }
    Ok(())
}

/// The trained head.
#[derive(Debug)]
pub struct TrainedHead {
    /// Its layers, ReLU between them.
    pub layers: Vec<Dense>,
    /// The epoch they come from.
    pub best_epoch: usize,
    /// Epochs run.
    pub epochs_run: usize,
}

/// A head as candle variables.
struct HeadParams {
    vars: Vec<Var>,
}

impl HeadParams {
    /// He-uniform weights for a hidden layer, LeCun-uniform for the output layer, zero
    /// biases; `init` (for `--unfreeze`) starts the hidden layer from the backbone's.
    fn new(
        inputs: usize,
        classes: usize,
        (kind, init): (HeadKind, Option<Dense>),
        rng: &mut StdRng,
    ) -> anyhow::Result<Self> {
        let uniform =
            |rng: &mut StdRng, rows: usize, cols: usize, bound: f32| -> anyhow::Result<Var> {
                let data: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-bound..=bound))
                    .collect();
                Ok(Var::from_tensor(&Tensor::from_vec(
                    data,
                    (rows, cols),
                    &Device::Cpu,
                )?)?)
            };
        let zeros = |n: usize| Var::zeros(n, DType::F32, &Device::Cpu);
        let mut vars = Vec::new();
        let mut width = inputs;
        if let Some(layer) = init {
            vars.push(Var::from_tensor(&Tensor::from_vec(
                layer.weight.clone(),
                (layer.outputs(), layer.inputs),
                &Device::Cpu,
            )?)?);
            vars.push(Var::from_tensor(&Tensor::from_vec(
                layer.bias.clone(),
                layer.outputs(),
                &Device::Cpu,
            )?)?);
            width = layer.outputs();
        } else if let HeadKind::Mlp { hidden } = kind {
            vars.push(uniform(rng, hidden, inputs, (6.0 / inputs as f32).sqrt())?);
            vars.push(zeros(hidden)?);
            width = hidden;
        }
        vars.push(uniform(rng, classes, width, (3.0 / width as f32).sqrt())?);
        vars.push(zeros(classes)?);
        Ok(HeadParams { vars })
    }

    /// Logits of `x`; `mask` is the dropout of a hidden layer.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        head_forward(
            &self
                .vars
                .iter()
                .map(|v| v.as_tensor().clone())
                .collect::<Vec<_>>(),
            x,
            mask,
        )
    }

    fn hidden(&self) -> Option<usize> {
        (self.vars.len() == 4).then(|| self.vars[1].as_tensor().dims()[0])
    }

    /// The current values as dense layers.
    fn layers(&self) -> anyhow::Result<Vec<Dense>> {
        self.vars
            .chunks(2)
            .map(|wb| Dense::from_tensors(wb[0].as_tensor(), wb[1].as_tensor()))
            .collect()
    }
}

/// Dense layers (weight, bias pairs) with ReLU and the optional dropout `mask` between.
fn head_forward(
    params: &[Tensor],
    x: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for (i, wb) in params.chunks(2).enumerate() {
        if i > 0 {
            h = h.relu()?;
            if let Some(m) = mask {
                h = (h * m)?;
            }
        }
        h = h.matmul(&wb[0].t()?)?.broadcast_add(&wb[1])?;
    }
    Ok(h)
}

/// Trains a head on `train` (AdamW, warm-up and cosine decay, label smoothing, dropout on
/// an MLP's hidden layer), keeping the best epoch on `val` and stopping early as
/// [`train::train_net`] does.
pub fn train_head(
    train: &Features,
    val: Option<&Features>,
    classes: usize,
    shape: (HeadKind, Option<Dense>),
    cfg: &train::TrainConfig,
    mut on_epoch: impl FnMut(&EpochStats),
) -> anyhow::Result<TrainedHead> {
    if train.is_empty() || cfg.batch_size == 0 {
        bail!("no training features, or a batch size of 0");
    }
    let val = val.filter(|v| !v.is_empty());
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let params = HeadParams::new(train.width, classes, shape, &mut rng)?;
    let mut opt = cfg.optimizer(params.vars.clone())?;
    let epochs = cfg.epochs_for(train.len());
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * epochs;
    let mut best = BestEpoch::new(cfg.patience_for(epochs));
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut step, mut epochs_run) = (0usize, 0usize);
    for epoch in 1..=epochs {
        let start = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for idx in order.chunks(cfg.batch_size) {
            let (x, labels) = rows(train, idx)?;
            let y = Tensor::from_slice(&labels, labels.len(), &Device::Cpu)?;
            let mask = match params.hidden() {
                Some(hidden) => train::dropout_mask(&mut rng, (idx.len(), hidden), cfg.dropout)?,
                None => None,
            };
            opt.set_learning_rate(train::scheduled_lr(cfg, step, total_steps));
            let logits = params.forward(&x, mask.as_ref())?;
            let loss = train::training_loss(&logits, &y, cfg.label_smoothing)?;
            opt.backward_step(&loss)?;
            step += 1;
            loss_sum += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        }
        let seconds = start.elapsed().as_secs_f64();
        epochs_run = epoch;
        let validation = match val {
            Some(v) => Some(accuracy_and_loss(&params, v)?),
            None => None,
        };
        let improved = best.offer(epoch, validation, || params.layers())?;
        on_epoch(&EpochStats {
            epoch,
            of_epochs: epochs,
            train_loss: (loss_sum / train.len() as f64) as f32,
            train_accuracy: correct as f32 / train.len() as f32,
            val_accuracy: validation.map(|v| v.0),
            val_loss: validation.map(|v| v.1),
            best: improved,
            seconds,
            learning_rate: opt.learning_rate(),
        });
        if best.should_stop(epoch, epochs) {
            break;
        }
    }
    let (layers, best_epoch) = best.kept(epochs_run, || params.layers())?;
    Ok(TrainedHead {
        layers,
        best_epoch,
        epochs_run,
    })
}

/// The rows `idx` of `set` as a tensor, and their labels.
fn rows(set: &Features, idx: &[usize]) -> anyhow::Result<(Tensor, Vec<u32>)> {
    let mut values = Vec::with_capacity(idx.len() * set.width);
    for &i in idx {
        values.extend_from_slice(&set.values[i * set.width..(i + 1) * set.width]);
    }
    let x = Tensor::from_vec(values, (idx.len(), set.width), &Device::Cpu)?;
    Ok((x, idx.iter().map(|&i| set.labels[i]).collect()))
}

/// Accuracy and mean cross-entropy of the head on `set`.
fn accuracy_and_loss(params: &HeadParams, set: &Features) -> anyhow::Result<(f32, f32)> {
    let x = Tensor::from_slice(&set.values, (set.len(), set.width), &Device::Cpu)?;
    let logits = params.forward(&x, None)?;
    let y = Tensor::from_slice(&set.labels, set.len(), &Device::Cpu)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    let right = pred.iter().zip(&set.labels).filter(|(p, l)| p == l).count();
    Ok((right as f32 / set.len() as f32, loss))
}

/// The head's results on `test`, and its top class for each row.
fn evaluate_head(
    layers: &[Dense],
    test: &Features,
    class_names: &[String],
) -> anyhow::Result<(Evaluation, Vec<u32>)> {
    let mut evaluation = Evaluation::new(class_names.to_vec());
    if test.is_empty() {
        return Ok((evaluation, Vec::new()));
    }
    let params: Vec<Tensor> = layers
        .iter()
        .flat_map(|l| {
            [
                Tensor::from_slice(&l.weight, (l.outputs(), l.inputs), &Device::Cpu),
                Tensor::from_slice(&l.bias, l.outputs(), &Device::Cpu),
            ]
        })
        .collect::<candle_core::Result<_>>()?;
    let x = Tensor::from_slice(&test.values, (test.len(), test.width), &Device::Cpu)?;
    let predictions = head_forward(&params, &x, None)?
        .argmax(1)?
        .to_vec1::<u32>()?;
    for (&p, &t) in predictions.iter().zip(&test.labels) {
        evaluation.record(t as usize, p as usize);
    }
    Ok((evaluation, predictions))
}

/// The written model run on the test images as a server runs it: how many of its top
/// classes differ from the head's (`skipped` files were never featurised).
fn disagreements(
    classifier: &Classifier,
    listing: &data::FolderListing,
    test: &[usize],
    skipped: &[PathBuf],
    head: &[u32],
) -> anyhow::Result<usize> {
    let pre = classifier.preprocessor();
    let mut inputs = Vec::new();
    for &i in test {
        let file = &listing.files[i];
        if skipped.contains(file) {
            continue;
        }
        // Unreadable files gave no features either (after a cache hit, `skipped` is
        // empty: they are skipped here again).
        if let Ok(img) = data::decode_image(file) {
            pre.append_input(&img, &mut inputs);
        }
    }
    let n = inputs.len() / pre.input_len().max(1);
    if n != head.len() {
        bail!(
            "{n} test images decoded now, {} when their features were computed",
            head.len()
        );
    }
    let served = classifier.predict(&inputs, n)?;
    Ok(served
        .iter()
        .zip(head)
        .filter(|(probs, &h)| crate::evaluate::argmax(probs) != h as usize)
        .count())
}

/// The fine-tuned model's metadata: classes from the folder names, the training record.
fn metadata(
    opts: &RunOptions,
    ft: &FineTuneOptions,
    listing: &data::FolderListing,
    dir: &Path,
    test: &Evaluation,
    (trained, seconds): (&TrainedHead, f64),
) -> ModelMetadata {
    let cfg = &opts.config;
    let flip = if ft.flip { " or mirrored" } else { "" };
    ModelMetadata {
        name: opts.name.clone(),
        version: opts.version.clone(),
        class_names: listing.class_dirs.clone(),
        class_dirs: listing.class_dirs.clone(),
        dataset: format!("image folder {}", dir.display()),
        test_accuracy: test.accuracy() as f32,
        test_samples: test.total(),
        training_seconds: seconds,
        epochs: trained.epochs_run,
        command: opts.command.clone(),
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        learning_rate: cfg.learning_rate,
        created_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        augment: format!(
            "{} copies per image, cropped to 85-100% of each side{flip}",
            ft.copies
        ),
        label_smoothing: cfg.label_smoothing,
        best_epoch: trained.best_epoch,
        ..ModelMetadata::default()
    }
}
