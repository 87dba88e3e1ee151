//! `client-app`: classify files and folders through the broker. This file only parses
//! the command line and hands each subcommand to its function in
//! [`client_app::commands`].

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use classifier_app::init_tracing;
use client_app::commands::{self, BenchArgs, ClassifyArgs, Common, DeadLettersArgs};
use client_app::report;

/// mimalloc rather than glibc's malloc: messages are allocated on one thread and freed
/// on another many thousand times a second (docs/benchmarks.md, 2026-12-07 night).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sends images to the classifier servers over a message broker and reports the results.
///
/// Exit status: 0 every file classified; 2 some files answered with errors (bad or
/// unsupported images), or not sent (not regular files, unreadable folders); 3 some
/// files unanswered before the timeout; 4 some files could not be sorted (--sort-into;
/// they stay where they were); 1 the run failed.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Classify image files and folders (recursively).
    Classify(ClassifyArgs),
    /// Measure end-to-end throughput, latency and peak memory through the broker.
    Bench(BenchArgs),
    /// List what the servers dead-lettered (requests that can never succeed, with code
    /// and reason), and re-publish chosen ones to where they came from after a fix.
    DeadLetters(DeadLettersArgs),
}

/// How long the end of the program waits for work still on the blocking thread pool.
const BLOCKING_WAIT_AT_EXIT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let _tracing = init_tracing("warn");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", report::printable(&format!("{error:#}")));
            ExitCode::from(1)
        }
    };
    // The summary is out: a read still blocked on the blocking pool (a file that turned
    // into a FIFO, a hung network file system) must not keep the process alive, as
    // dropping the runtime would (it waits for every blocking task).
    runtime.shutdown_timeout(BLOCKING_WAIT_AT_EXIT);
    code
}

/// Hands the subcommand to its function.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Classify(args) => commands::classify(&cli.common, args).await,
        Command::Bench(args) => commands::bench(&cli.common, args).await,
        Command::DeadLetters(args) => commands::dead_letters(&cli.common, args).await,
    }
}
