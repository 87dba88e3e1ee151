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
    /// List what the servers dead-lettered (requests that can never succeed, with code
    /// and reason), and re-publish chosen ones to where they came from after a fix.
    DeadLetters(DeadLettersArgs),
}

#[derive(Debug, clap::Args)]
struct DeadLettersArgs {
    /// Stop reading after this many seconds without a new letter (a Kafka group's
    /// first join takes a few seconds).
    #[arg(long, default_value_t = 10)]
    wait: u64,
    /// Read at most this many letters.
    #[arg(long, default_value_t = 1000)]
    max: usize,
    /// Only letters with this error code (e.g. IMAGE_TOO_LARGE).
    #[arg(long)]
    code: Option<String>,
    /// Re-publish the letters with these request ids (repeatable).
    #[arg(long = "republish", value_name = "REQUEST_ID")]
    republish: Vec<String>,
    /// Re-publish every letter listed (after --code filtering).
    #[arg(long, conflicts_with = "republish")]
    republish_all: bool,
    /// Re-publish to this topic instead of each letter's source topic.
    #[arg(long)]
    to_topic: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
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
    /// Send requests of at most this many bytes (default: the broker's limit, e.g.
    /// 10 MB on Pub/Sub); larger images are FILE_TOO_LARGE, or downscaled with
    /// --resize-to.
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<usize>,
    /// Downscale images too large to send so they fit PIXELS×PIXELS (aspect ratio
    /// kept) and send them as PNG, instead of reporting FILE_TOO_LARGE.
    #[arg(long, value_name = "PIXELS", value_parser = clap::value_parser!(u32).range(1..))]
    resize_to: Option<u32>,
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

/// The config file (or defaults) with the environment and `--broker` applied.
fn base_config(cli: &Cli) -> anyhow::Result<AppConfig> {
    let mut config = AppConfig::load(cli.config.as_deref())?;
    if let Some(backend) = &cli.broker {
        config.select_backend(backend)?;
        config.broker.apply_env(&|name| std::env::var(name).ok());
    }
    Ok(config)
}

fn config(cli: &Cli, args: &ClassifyArgs) -> anyhow::Result<AppConfig> {
    let mut config = base_config(cli)?;
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
        config.server.model_dir = Some(model.clone());
    }
    if let Some(bytes) = args.max_bytes {
        config.client.max_request_bytes = Some(bytes);
    }
    if let Some(side) = args.resize_to {
        config.client.resize_to = Some(side);
    }
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let args = match &cli.command {
        Command::Classify(args) => args,
        Command::Bench(args) => return run_bench(&cli, args).await,
        Command::DeadLetters(args) => return run_dead_letters(&cli, args).await,
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
    let config = base_config(cli)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    bench::run(config, args, &shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `client-app dead-letters`: list the dead-letter topic, re-publish chosen letters.
async fn run_dead_letters(cli: &Cli, args: &DeadLettersArgs) -> anyhow::Result<ExitCode> {
    use client_app::dead_letters::{self, DeadLetterInbox, InboxOptions};

    let config = base_config(cli)?;
    anyhow::ensure!(
        !config.broker.in_process_only(),
        "the {} broker lives inside one process, so no other process can read its dead \
         letters; choose a broker with --broker or --config (the library's \
         client_app::dead_letters reads them in-process)",
        config.broker.backend()
    );
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let broker = classifier_server::connect_with_retry(&config.broker, &shutdown).await?;
    let options = InboxOptions {
        topic: config.server.dead_letter_topic.clone(),
        group: config.server.dead_letter_subscription.clone(),
        idle: std::time::Duration::from_secs(args.wait),
        max_letters: args.max,
    };
    let mut inbox = DeadLetterInbox::open(std::sync::Arc::clone(&broker), &options).await?;
    let wanted = |letter: &dead_letters::DeadLetter| {
        args.code
            .as_deref()
            .is_none_or(|code| letter.code.eq_ignore_ascii_case(code))
    };
    let listed: Vec<_> = inbox.letters().iter().filter(|l| wanted(l)).collect();
    for letter in &listed {
        if args.json {
            println!("{}", dead_letters::letter_json(letter));
        } else {
            println!("{}", dead_letters::letter_line(letter));
        }
    }
    if !args.json {
        println!(
            "{} dead letter(s) on {}{}",
            listed.len(),
            options.topic,
            if args.code.is_some() {
                " with that code"
            } else {
                ""
            }
        );
    }
    for id in &args.republish {
        if !listed.iter().any(|letter| &letter.request_id == id) {
            eprintln!("no dead letter with request id {id} was read; nothing re-published for it");
        }
    }
    let outcome = if args.republish_all || !args.republish.is_empty() {
        inbox
            .republish(
                |letter| {
                    wanted(letter)
                        && (args.republish_all || args.republish.contains(&letter.request_id))
                },
                args.to_topic.as_deref(),
            )
            .await
            .map(|count| eprintln!("re-published {count} letter(s)"))
    } else {
        Ok(())
    };
    inbox.close().await?;
    if let Err(error) = broker.close().await {
        tracing::debug!(%error, "closing the broker client failed");
    }
    outcome?;
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
