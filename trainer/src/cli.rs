//! The `trainer` command line: its arguments (clap) and one function per command, so that
//! `main.rs` only parses and dispatches and every command can be called (and tested) from
//! the library: [`run`] takes a parsed [`Cli`].

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use classifier_inference::SimdLevel;

use crate::evaluate;
use crate::finetune::{FineTuneOptions, HeadKind};
use crate::train::{self, ImageFolderOptions, RunOptions, TrainConfig};

/// Command line of the trainer.
#[derive(Parser, Debug)]
#[command(
    name = "trainer",
    about = "Train and evaluate the image classifier CNN"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Sub-commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model and write its directory: our CNN from scratch, or (with --from) a
    /// new head on a pretrained model.
    Train(Box<TrainArgs>),
    /// Evaluate a saved model on Fashion-MNIST's test set or on a folder of class folders:
    /// accuracy, per-class precision and recall, and the confusion matrix.
    Evaluate {
        /// Model directory (model.safetensors + metadata.json).
        #[arg(long, default_value = "models/fashion-mnist")]
        model: PathBuf,
        /// Fashion-MNIST's t10k set, or a folder of class folders named like the model's
        /// classes.
        #[command(flatten)]
        data: Dataset,
    },
    /// Benchmark inference, training and decoding; prints tables of medians.
    Bench(BenchArgs),
    /// Write a model as ONNX: a model directory (model.onnx, labels.txt, model.toml)
    /// that ONNX Runtime, other ONNX tools and the server's ONNX engine run.
    Export {
        /// Model directory (model.safetensors + metadata.json).
        #[arg(long, default_value = "models/fashion-mnist")]
        model: PathBuf,
        /// Output directory for the ONNX model directory (created if missing).
        #[arg(long)]
        onnx: PathBuf,
    },
    /// Write test-set images as PNGs into class folders.
    ExportSamples {
        /// Directory with the Fashion-MNIST idx files (.gz or raw).
        #[arg(long)]
        fashion_mnist: PathBuf,
        /// Images per class.
        #[arg(long, default_value_t = 20)]
        per_class: usize,
        /// Output directory (class folders are created inside).
        #[arg(long)]
        output: PathBuf,
    },
}

/// Options of `trainer bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model directory (model.safetensors + metadata.json).
    #[arg(long, default_value = "models/fashion-mnist")]
    model: PathBuf,
    /// Fashion-MNIST idx files: real test images for inference, data for the training
    /// benchmark (skipped without it).
    #[arg(long)]
    fashion_mnist: Option<PathBuf>,
    /// Runs per figure (medians are printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Minimum seconds of work per inference or decode run.
    #[arg(long, default_value_t = 0.3)]
    min_seconds: f64,
    /// Inference batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,512")]
    batch_sizes: Vec<usize>,
    /// Training steps of 128 images per training run (0 skips training).
    #[arg(long, default_value_t = 60)]
    train_batches: usize,
    /// Do not time candle's reference forward pass beside the fast inference path.
    #[arg(long)]
    no_candle: bool,
    /// Run only these parts (comma separated): peak, inference, agreement, training, decode.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also time ONNX Runtime on the same CNN shape (the --peer-command), between two
    /// rounds of ours at each SIMD level, and print the ratios ours / ORT per batch size.
    #[arg(long)]
    peer: bool,
    /// The peer command: takes comma-separated batch sizes, prints `ort batch B: N images/s`.
    #[arg(long, default_value = "scripts/ort-peer.sh")]
    peer_command: PathBuf,
    /// SIMD levels timed beside the peer (comma separated: avx512, avx2, portable);
    /// default: every level this CPU supports.
    #[arg(long, value_delimiter = ',', value_parser = parse_simd_level)]
    simd_levels: Vec<SimdLevel>,
}

/// Parses a `--simd-levels` entry.
fn parse_simd_level(s: &str) -> Result<SimdLevel, String> {
    SimdLevel::parse(s).ok_or_else(|| format!("{s:?} is not one of avx512, avx2, portable"))
}

/// The images to train or evaluate on: exactly one of the two sources.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct Dataset {
    /// Directory with the Fashion-MNIST idx files (.gz or raw).
    #[arg(long)]
    fashion_mnist: Option<PathBuf>,
    /// A folder of class folders, one per class, named like the class.
    #[arg(long)]
    image_folder: Option<PathBuf>,
}

/// Which source a [`Dataset`] names.
enum Source<'a> {
    FashionMnist(&'a Path),
    ImageFolder(&'a Path),
}

impl Dataset {
    /// The one source given (clap enforces exactly one; this says so again if not).
    fn source(&self) -> anyhow::Result<Source<'_>> {
        match (&self.fashion_mnist, &self.image_folder) {
            (Some(dir), None) => Ok(Source::FashionMnist(dir)),
            (None, Some(dir)) => Ok(Source::ImageFolder(dir)),
            _ => bail!("give exactly one of --fashion-mnist or --image-folder"),
        }
    }
}

/// Options of `trainer train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Fashion-MNIST's training set, or a folder of class folders.
    #[command(flatten)]
    data: Dataset,
    /// Passes over the training data (at most: early stopping may end sooner). Default:
    /// from the data size, enough for 3,000 steps, between 15 and 100 epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many epochs without a better validation accuracy (the best epoch's
    /// weights are kept). Default: a quarter of the epochs, at least 5.
    #[arg(long)]
    patience: Option<usize>,
    /// Images per optimisation step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak AdamW learning rate (after the warm-up; cosine decayed).
    #[arg(long, default_value_t = 2e-3)]
    learning_rate: f64,
    /// Fraction of the steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.03)]
    warmup: f64,
    /// Label smoothing of the loss (0 = plain cross-entropy).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Dropout probability before the output layer.
    #[arg(long, default_value_t = 0.3)]
    dropout: f32,
    /// Seed of all random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Fraction of the training data held out (per class) for per-epoch validation and
    /// early stopping.
    #[arg(long, default_value_t = 0.1)]
    validation_split: f64,
    /// Training augmentations, comma separated: shift (random translation by up to
    /// --max-shift pixels), flip (left-right mirror: only for data where a mirror image is
    /// the same class), erase (blank a random rectangle), or none.
    #[arg(long, default_value = "shift")]
    augment: String,
    /// Largest random translation in pixels of `--augment shift`.
    #[arg(long, default_value_t = train::Augment::DEFAULT_SHIFT)]
    max_shift: usize,
    /// Output model directory.
    #[arg(long, default_value = "models/fashion-mnist")]
    output: PathBuf,
    /// Model name recorded in the metadata (default: fashion-cnn; with --from, the
    /// output directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Model version recorded in the metadata.
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// Image folder only: images are resized to this square size.
    #[arg(long, default_value_t = 28)]
    image_size: u32,
    /// Image folder only: 1 (grayscale) or 3 (RGB).
    #[arg(long, default_value_t = 1)]
    channels: u32,
    /// Image folder only: fraction of images held out as the test set.
    #[arg(long, default_value_t = 0.2)]
    test_split: f64,
    /// Fine-tune: start from this model directory (any model the server serves: an ONNX
    /// classifier or our CNN), cut at its feature layer, and train a new head on
    /// --image-folder. --image-size and --channels are the backbone's then.
    #[arg(long, value_name = "MODEL", requires = "image_folder")]
    from: Option<PathBuf>,
    /// Fine-tune: the tensor (or node) whose output is the features; default: the input
    /// of the model's last linear layer (`fc1.relu` for our CNN; `flatten` is its
    /// convolution features).
    #[arg(long, requires = "from")]
    feature_node: Option<String>,
    /// Fine-tune: the new head, `linear` or `mlp` (linear → ReLU → dropout → linear).
    #[arg(long, default_value = "linear", requires = "from")]
    head: String,
    /// Fine-tune: hidden units of `--head mlp`.
    #[arg(long, default_value_t = 256, requires = "from")]
    head_hidden: usize,
    /// Fine-tune: also train the last N layers of a native CNN backbone below its head,
    /// from their trained weights: 1 (its hidden layer, on cached features), 2 or 3 (one
    /// or both convolutions as well: the network trains on the images, augmented by
    /// --augment; --augment-copies does not apply). A linear head only.
    #[arg(long, default_value_t = 0, requires = "from")]
    unfreeze: usize,
    /// Fine-tune: augmented copies of each training image whose features are computed
    /// (random crops; mirrored too when --augment has flip).
    #[arg(long, default_value_t = 2, requires = "from")]
    augment_copies: usize,
    /// Fine-tune: where computed features are cached (default: $XDG_CACHE_HOME or
    /// ~/.cache, under image-classifier/features).
    #[arg(long, requires = "from")]
    feature_cache: Option<PathBuf>,
    /// Fine-tune: compute the features again and cache nothing.
    #[arg(long, requires = "from")]
    no_feature_cache: bool,
}

impl TrainArgs {
    /// The head `--head` and `--head-hidden` (or `--unfreeze`) describe.
    fn head_kind(&self) -> anyhow::Result<HeadKind> {
        match self.head.as_str() {
            "linear" => Ok(HeadKind::Linear),
            "mlp" => Ok(HeadKind::Mlp {
                hidden: self.head_hidden.max(1),
            }),
            other => bail!("--head {other:?}: use linear or mlp"),
        }
    }

    /// `--name`, or its default.
    fn model_name(&self) -> String {
        let from_output = || {
            let name = self.output.file_name()?.to_str()?;
            Some(name.to_string())
        };
        match (&self.name, &self.from) {
            (Some(name), _) => name.clone(),
            (None, Some(_)) => from_output().unwrap_or_else(|| "fine-tuned".to_string()),
            (None, None) => "fashion-cnn".to_string(),
        }
    }

    /// The feature cache directory, unless `--no-feature-cache`.
    fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_feature_cache {
            return None;
        }
        self.feature_cache.clone().or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("image-classifier").join("features"))
        })
    }
}

/// Quotes an argument for the recorded command line when the shell would need it.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Runs the command `cli` names; `command_line` is recorded in a trained model's metadata.
pub fn run(cli: Cli, command_line: String) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => train(*a, command_line),
        Command::Evaluate { model, data } => evaluate(&model, &data),
        Command::Bench(a) => bench(a),
        Command::Export { model, onnx } => export_onnx(&model, &onnx),
        Command::ExportSamples {
            fashion_mnist,
            per_class,
            output,
        } => export_samples(&fashion_mnist, per_class, &output),
    }
}

/// The process's command line, quoted for a shell, as a model's metadata records it.
pub fn quoted_command_line() -> String {
    std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `trainer train`: trains on Fashion-MNIST or an image folder (or fine-tunes a model on
/// it) and writes the model.
fn train(a: TrainArgs, command_line: String) -> anyhow::Result<()> {
    let augment = train::Augment::parse(&a.augment, a.max_shift)
        .map_err(|e| anyhow::anyhow!("--augment: {e}"))?;
    let opts = RunOptions {
        config: TrainConfig {
            epochs: a.epochs,
            patience: a.patience,
            batch_size: a.batch_size,
            learning_rate: a.learning_rate,
            warmup_fraction: a.warmup,
            weight_decay: a.weight_decay,
            dropout: a.dropout,
            label_smoothing: a.label_smoothing,
            seed: a.seed,
            augment: augment.clone(),
            ..TrainConfig::default()
        },
        validation_split: a.validation_split,
        output: a.output.clone(),
        name: a.model_name(),
        version: a.version.clone(),
        command: command_line,
    };
    if let Some(from) = &a.from {
        let Source::ImageFolder(dir) = a.data.source()? else {
            bail!("--from fine-tunes on --image-folder, not on Fashion-MNIST");
        };
        let ft = FineTuneOptions {
            from: from.clone(),
            feature_node: a.feature_node.clone(),
            head: a.head_kind()?,
            unfreeze: a.unfreeze,
            copies: a.augment_copies,
            flip: augment.flip,
            cache_dir: a.cache_dir(),
            test_split: a.test_split,
        };
        return fine_tune(dir, &ft, &opts);
    }
    let outcome = match a.data.source()? {
        Source::FashionMnist(dir) => train::train_fashion_mnist(dir, &opts, train::print_epoch)?,
        Source::ImageFolder(dir) => {
            let folder = ImageFolderOptions {
                image_size: a.image_size,
                channels: a.channels,
                test_split: a.test_split,
            };
            train::train_image_folder(dir, &folder, &opts, train::print_epoch)?
        }
    };
    let meta = outcome.classifier.metadata();
    let per_epoch: Vec<String> = outcome
        .epochs
        .iter()
        .map(|e| format!("{:.1}", e.seconds))
        .collect();
    println!(
        "\ntest set, with the weights of epoch {}:\n{}",
        meta.best_epoch, outcome.test
    );
    println!(
        "test accuracy {:.2}% on {} images; training {:.1}s ({} epochs: {} s); model written to {}",
        meta.test_accuracy * 100.0,
        meta.test_samples,
        meta.training_seconds,
        meta.epochs,
        per_epoch.join(", "),
        a.output.display()
    );
    Ok(())
}

/// `trainer train --from`: fine-tunes and reports what it did.
fn fine_tune(dir: &Path, ft: &FineTuneOptions, opts: &RunOptions) -> anyhow::Result<()> {
    let outcome = crate::finetune::fine_tune(dir, ft, opts, train::print_epoch)?;
    let meta = outcome.classifier.metadata();
    println!("\nbackbone: {}", meta.backbone);
    if let Some(sets) = &outcome.features {
        print_features(sets);
    }
    println!(
        "\ntest set, with the head of epoch {}:\n{}",
        meta.best_epoch, outcome.test
    );
    let agreement = match outcome.disagreements {
        Some(d) => format!(
            "; the written model answers {} of the {} test images as the head did",
            meta.test_samples.saturating_sub(d),
            meta.test_samples
        ),
        None => String::new(),
    };
    println!(
        "test accuracy {:.2}% on {} images; trained in {:.1}s ({} epochs){agreement}; {:?} \
         model written to {} ({})",
        meta.test_accuracy * 100.0,
        meta.test_samples,
        outcome.head_seconds,
        meta.epochs,
        outcome.format,
        opts.output.display(),
        meta.architecture
    );
    Ok(())
}

/// Where fine-tuning's features came from, and how many there are.
fn print_features(sets: &crate::features::FeatureSets) {
    let cache = match &sets.cache {
        Some((path, true)) => format!("read from the cache {}", path.display()),
        Some((path, false)) => format!("computed and cached in {}", path.display()),
        None => "computed (not cached)".to_string(),
    };
    if !sets.skipped.is_empty() {
        println!(
            "skipped {} files that are not readable images",
            sets.skipped.len()
        );
    }
    println!(
        "features: {} training rows (with augmented copies), {} validation, {} test; {cache} \
         in {:.1}s",
        sets.train.labels.len(),
        sets.val.len(),
        sets.test.len(),
        sets.seconds
    );
}

/// `trainer evaluate`: accuracy, per-class precision and recall, confusion matrix.
fn evaluate(model: &Path, data: &Dataset) -> anyhow::Result<()> {
    let evaluation = match data.source()? {
        Source::FashionMnist(dir) => evaluate::evaluate_fashion_mnist(model, dir)?,
        Source::ImageFolder(dir) => {
            let result = evaluate::evaluate_image_folder(model, dir)?;
            if !result.skipped.is_empty() {
                println!(
                    "skipped {} files that are not readable images",
                    result.skipped.len()
                );
            }
            result.evaluation
        }
    };
    println!("{evaluation}");
    Ok(())
}

/// `trainer bench`: the inference, training and decode benchmarks.
fn bench(a: BenchArgs) -> anyhow::Result<()> {
    crate::bench::run(&crate::bench::BenchOptions {
        model: a.model,
        fashion_mnist: a.fashion_mnist,
        runs: a.runs,
        min_seconds: a.min_seconds,
        batch_sizes: a.batch_sizes,
        train_batches: a.train_batches,
        candle_reference: !a.no_candle,
        sections: a.only,
        peer: a.peer.then_some(a.peer_command),
        simd_levels: a.simd_levels,
    })
}

/// `trainer export --onnx`: a native model written as an ONNX model directory.
fn export_onnx(model: &Path, onnx: &Path) -> anyhow::Result<()> {
    let classifier = classifier_inference::Classifier::load(model)?;
    classifier.export_onnx(onnx)?;
    println!(
        "wrote {} as ONNX to {} (model.onnx, labels.txt, model.toml); serve it with \
         classifier-server --model NAME={}",
        model.display(),
        onnx.display(),
        onnx.display()
    );
    Ok(())
}

/// `trainer export-samples`: test-set images as PNGs in class folders.
fn export_samples(fashion_mnist: &Path, per_class: usize, output: &Path) -> anyhow::Result<()> {
    let n = train::export_samples(fashion_mnist, per_class, output)?;
    println!("wrote {n} images to {}", output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("trainer").chain(args.iter().copied()))
    }

    #[test]
    fn export_onnx_runs_from_the_library() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist");
        let out = tempfile::tempdir().expect("tempdir");
        let onnx = out.path().join("onnx");
        let cli = parse(&[
            "export",
            "--model",
            shipped.to_str().expect("utf-8 path"),
            "--onnx",
            onnx.to_str().expect("utf-8 path"),
        ])
        .expect("parses");
        run(cli, String::new()).expect("exports");
        for file in ["model.onnx", "labels.txt", "model.toml"] {
            assert!(onnx.join(file).is_file(), "{file} written");
        }
    }

    #[test]
    fn a_dataset_is_exactly_one_source() {
        assert!(parse(&["evaluate"]).is_err(), "no source");
        let both = parse(&["evaluate", "--fashion-mnist", "a", "--image-folder", "b"]);
        assert!(both.is_err(), "two sources");
        assert!(parse(&["evaluate", "--image-folder", "b"]).is_ok());
    }

    #[test]
    fn arguments_the_shell_would_split_are_quoted() {
        assert_eq!(shell_quote("--epochs=3"), "--epochs=3");
        assert_eq!(shell_quote("my photos"), "'my photos'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
