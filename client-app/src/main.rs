//! `client-app`: classify files and folders through the broker.

mod bench;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use classifier_server::{cancel_on_signals, init_tracing, AppConfig};
use client_app::job::{FileResult, NoProgress, Progress};
use client_app::report::{self, Counts};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// Sends images to the classifier servers over a message broker and reports the results.
///
/// Exit status: 0 every file classified; 2 some files answered with errors (bad or
/// unsupported images); 3 some files unanswered before the timeout; 1 the run failed.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Config file (TOML with [broker], [server], [client] tables).
    #[arg(long, global = true, env = "CLASSIFIER_CONFIG")]
    config: Option<PathBuf>,
    /// Broker backend: embedded (default), kafka, pubsub or redis.
    #[arg(long, global = true)]
    broker: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Classify image files and folders (recursively).
    Classify(ClassifyArgs),
    /// Measure end-to-end throughput, latency and peak memory through the broker.
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct ClassifyArgs {
    /// Files and folders to classify.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Write results to FILE: CSV if it ends in .csv, JSON Lines otherwise.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Requests in flight at most.
    #[arg(long)]
    window: Option<usize>,
    /// Seconds to wait without any reply before giving up.
    #[arg(long)]
    timeout: Option<u64>,
    /// Predictions per image.
    #[arg(long)]
    top_k: Option<usize>,
    /// Request topic (must match the servers').
    #[arg(long)]
    request_topic: Option<String>,
    /// Model directory for the in-process server (embedded broker only).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print only the summary, not one line per file.
    #[arg(long, short)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing("warn");
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn config(cli: &Cli, args: &ClassifyArgs) -> anyhow::Result<AppConfig> {
    let mut config = AppConfig::load(cli.config.as_deref())?;
    if let Some(backend) = &cli.broker {
        config.select_backend(backend)?;
        config.broker.apply_env(&|name| std::env::var(name).ok());
    }
    if let Some(window) = args.window {
        config.client.window = window;
    }
    if let Some(timeout) = args.timeout {
        config.client.reply_timeout_secs = timeout;
    }
    if let Some(top_k) = args.top_k {
        config.client.top_k = top_k;
    }
    if let Some(topic) = &args.request_topic {
        config.server.request_topic = topic.clone();
    }
    if let Some(model) = &args.model {
        config.server.model_dir = model.clone();
    }
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let args = match &cli.command {
        Command::Classify(args) => args,
        Command::Bench(args) => return run_bench(&cli, args).await,
    };
    let config = config(&cli, args)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let interactive = std::io::stderr().is_terminal();
    let quiet = args.quiet;
    let outcome = client_app::classify(
        &config,
        &args.paths,
        |total| -> Box<dyn Progress> {
            if interactive {
                Box::new(Bar::new(total, quiet))
            } else if quiet {
                Box::new(NoProgress)
            } else {
                Box::new(Lines)
            }
        },
        &shutdown,
    )
    .await?;
    let report = &outcome.report;
    let accuracy = report::accuracy(report, &outcome.model_classes);
    println!("{}", report::summary(report, accuracy.as_ref()));
    if let Some(path) = &args.output {
        report::write_results(report, path)?;
        println!("results written to {}", path.display());
    }
    let counts = Counts::of(report);
    Ok(if counts.unanswered > 0 {
        ExitCode::from(3)
    } else if counts.failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// `client-app bench`: the config as for `classify`, then the benchmark.
async fn run_bench(cli: &Cli, args: &bench::BenchArgs) -> anyhow::Result<ExitCode> {
    let mut config = AppConfig::load(cli.config.as_deref())?;
    if let Some(backend) = &cli.broker {
        config.select_backend(backend)?;
        config.broker.apply_env(&|name| std::env::var(name).ok());
    }
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    bench::run(config, args, &shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Prints one line per file as results arrive (non-interactive output).
struct Lines;

impl Progress for Lines {
    fn file_done(&self, result: &FileResult) {
        println!("{}", report::result_line(result));
    }
}

/// A progress bar on an interactive terminal, with the per-file lines above it.
struct Bar {
    bar: ProgressBar,
    quiet: bool,
}

impl Bar {
    fn new(total: usize, quiet: bool) -> Self {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar { bar, quiet }
    }
}

impl Progress for Bar {
    fn file_done(&self, result: &FileResult) {
        if !self.quiet {
            self.bar.println(report::result_line(result));
        }
        self.bar.inc(1);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
