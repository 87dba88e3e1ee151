//! `trainer` CLI: train the CNN, evaluate a saved model, export sample test images.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use classifier_inference::SimdLevel;
use trainer::train::{self, ImageFolderOptions, RunOptions, TrainConfig};

/// Command line of the trainer.
#[derive(Parser, Debug)]
#[command(
    name = "trainer",
    about = "Train and evaluate the image classifier CNN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Sub-commands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model and write model.safetensors + metadata.json.
    Train(TrainArgs),
    /// Print the test accuracy of a saved model on Fashion-MNIST's test set.
    Evaluate {
        /// Model directory (model.safetensors + metadata.json).
        #[arg(long)]
        model: PathBuf,
        /// Directory with the Fashion-MNIST idx files (.gz or raw).
        #[arg(long)]
        fashion_mnist: PathBuf,
    },
    /// Benchmark inference, training and decoding; prints tables of medians.
    Bench(BenchArgs),
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
struct BenchArgs {
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

/// Options of `trainer train`.
#[derive(Args, Debug)]
struct TrainArgs {
    /// Train on Fashion-MNIST idx files in this directory.
    #[arg(
        long,
        conflicts_with = "image_folder",
        required_unless_present = "image_folder"
    )]
    fashion_mnist: Option<PathBuf>,
    /// Train on a folder of class folders.
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    /// Images per optimisation step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak AdamW learning rate (cosine decayed).
    #[arg(long, default_value_t = 2e-3)]
    learning_rate: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Dropout probability before the output layer.
    #[arg(long, default_value_t = 0.3)]
    dropout: f32,
    /// Seed of all random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Fraction of the training data held out for per-epoch validation.
    #[arg(long, default_value_t = 0.05)]
    validation_split: f64,
    /// Maximum random shift in pixels for augmentation (0 disables).
    #[arg(long, default_value_t = 1)]
    max_shift: usize,
    /// Disable random horizontal flips.
    #[arg(long)]
    no_flip: bool,
    /// Output model directory.
    #[arg(long, default_value = "models/fashion-mnist")]
    output: PathBuf,
    /// Model name recorded in the metadata.
    #[arg(long, default_value = "fashion-cnn")]
    name: String,
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

fn main() -> anyhow::Result<()> {
    // candle's elementwise thread pool spin-waits on its workers; on a 2-core machine that
    // fights the rayon threads running our convolution kernels and costs ~20% of an epoch.
    // Our heavy kernels parallelise themselves, so run candle's own ops on one thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let command_line = std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    match Cli::parse().command {
        Command::Train(a) => {
            let opts = RunOptions {
                config: TrainConfig {
                    epochs: a.epochs,
                    batch_size: a.batch_size,
                    learning_rate: a.learning_rate,
                    weight_decay: a.weight_decay,
                    dropout: a.dropout,
                    seed: a.seed,
                    flip: !a.no_flip,
                    max_shift: a.max_shift,
                    ..TrainConfig::default()
                },
                validation_split: a.validation_split,
                output: a.output.clone(),
                name: a.name,
                version: a.version,
                command: command_line,
            };
            let outcome = match (&a.fashion_mnist, &a.image_folder) {
                (Some(dir), None) => train::train_fashion_mnist(dir, &opts, train::print_epoch)?,
                (None, Some(dir)) => {
                    let folder = ImageFolderOptions {
                        image_size: a.image_size,
                        channels: a.channels,
                        test_split: a.test_split,
                    };
                    train::train_image_folder(dir, &folder, &opts, train::print_epoch)?
                }
                _ => bail!("give exactly one of --fashion-mnist or --image-folder"),
            };
            let meta = outcome.classifier.metadata();
            let per_epoch: Vec<String> = outcome
                .epochs
                .iter()
                .map(|e| format!("{:.1}", e.seconds))
                .collect();
            println!(
                "test accuracy {:.2}% on {} images; training {:.1}s ({} epochs: {} s); model written to {}",
                meta.test_accuracy * 100.0,
                meta.test_samples,
                meta.training_seconds,
                meta.epochs,
                per_epoch.join(", "),
                a.output.display()
            );
        }
        Command::Evaluate {
            model,
            fashion_mnist,
        } => {
            let (acc, n) = train::evaluate_fashion_mnist(&model, &fashion_mnist)?;
            println!("test accuracy {:.2}% on {n} images", acc * 100.0);
        }
        Command::Bench(a) => {
            trainer::bench::run(&trainer::bench::BenchOptions {
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
            })?;
        }
        Command::ExportSamples {
            fashion_mnist,
            per_class,
            output,
        } => {
            let n = train::export_samples(&fashion_mnist, per_class, &output)?;
            println!("wrote {n} images to {}", output.display());
        }
    }
    Ok(())
}
