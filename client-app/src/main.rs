//! `client-app`: classify files and folders through the broker.

mod bench;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use classifier_server::{cancel_on_signals, init_tracing, AppConfig};
use client_app::job::{FileOutcome, FileResult, NoProgress, Progress};
use client_app::report::{self, Counts, ResultsWriter};
use client_app::resume::Answered;
use client_app::sort::{SortOptions, Sorter, Transfer};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// Sends images to the classifier servers over a message broker and reports the results.
///
/// Exit status: 0 every file classified; 2 some files answered with errors (bad or
/// unsupported images), or not sent (not regular files, unreadable folders); 3 some
/// files unanswered before the timeout; 4 some files could not be sorted (--sort-into;
/// they stay where they were); 1 the run failed.
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
    /// Write results to FILE: CSV if it ends in .csv, JSON Lines otherwise. One row per
    /// file, written as the results arrive (unanswered files last), so an interrupted
    /// run keeps what it got (see --resume).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Skip the files that the --output file of an earlier run already answered, and
    /// add the new rows to that file (its old rows are kept). Answered means classified,
    /// or an error the same bytes would get again (UNSUPPORTED_FORMAT, CORRUPT_IMAGE,
    /// EMPTY_IMAGE, IMAGE_TOO_LARGE, MESSAGE_TOO_LARGE); unanswered files and other
    /// errors (INTERNAL, UNREADABLE_FILE, FILE_TOO_LARGE, ...) are sent again. Files are
    /// matched by the path shown (the `file` column), so give the folders as before.
    /// Skipped files are not sorted again.
    #[arg(long)]
    resume: bool,
    /// Copy each answered file into OUT: a classified one to OUT/<class>/<path>, one
    /// answered with an error to OUT/_errors/<CODE>/<path>, where <path> is the file's
    /// path below the folder argument (just its name for a file argument) and <class>
    /// the predicted class with `/` and other unsafe characters turned into `-`
    /// (`T-shirt/top` → `T-shirt-top`). Unanswered files stay where they are. An existing
    /// file is never overwritten: the new one becomes `name (1).png`, `name (2).png`, ...
    /// Files are sorted as their results arrive; one that cannot be (e.g. permission
    /// denied) is reported and stays where it was, and the others carry on. OUT must
    /// not be inside a folder being classified.
    #[arg(long, value_name = "OUT")]
    sort_into: Option<PathBuf>,
    /// With --sort-into: move the files instead of copying them. Each file's new copy
    /// (or hard link) is made durable (fsync of file and folder) before the source is
    /// removed, so a crash never loses a file.
    #[arg(long = "move", requires = "sort_into")]
    move_files: bool,
    /// With --sort-into: classified files whose top probability is below P (0 to 1) go
    /// to OUT/_uncertain/<class>/<path> instead.
    #[arg(long, value_name = "P", requires = "sort_into", value_parser = parse_probability)]
    min_confidence: Option<f32>,
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
    /// Ask the servers for their model of this name (one served with `classifier-server
    /// --model NAME=DIR`); default: their default model. A name they do not serve is
    /// answered with UNKNOWN_MODEL and the names they do.
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,
    /// Write a self-contained HTML page about the run to FILE: summary, confusion
    /// matrix, per-class precision and recall, the least confident predictions as
    /// thumbnails, and the errors.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
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

/// A probability for `--min-confidence`: a number from 0 to 1.
fn parse_probability(text: &str) -> Result<f32, String> {
    let value: f32 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a probability (0 to 1)"))
    }
}

/// How long the end of the program waits for work still on the blocking thread pool.
const BLOCKING_WAIT_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    init_tracing("warn");
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
    if let Some(name) = &args.model_name {
        config.client.model_name = name.clone();
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
    let walk = client_app::inputs::walk_inputs(&args.paths)?;
    let (files, not_sent) = (walk.files, walk.skipped);
    let (files, skipped) = match (&args.output, args.resume) {
        (None, true) => anyhow::bail!(
            "--resume needs --output FILE: the results file of the earlier run, which says \
             what was answered (and gets the new results)"
        ),
        (Some(path), true) => {
            let answered = Answered::read(path)?;
            if !path.exists() {
                eprintln!(
                    "note: {} does not exist yet: nothing to resume, every file is sent",
                    shown(path)
                );
            }
            if answered.unreadable_rows > 0 {
                eprintln!(
                    "warning: {} row(s) of {} could not be read; their files are sent again",
                    answered.unreadable_rows,
                    shown(path)
                );
            }
            answered.remaining(files)
        }
        (_, false) => (files, 0),
    };
    let sorter = match &args.sort_into {
        Some(out) => Some(Sorter::new(sort_options(args, out)?)),
        None => None,
    };
    let writer = match &args.output {
        Some(path) => Some(ResultsWriter::create(path, args.resume)?),
        None => None,
    };
    // Results are written and files sorted on a thread of their own as they arrive,
    // so file system work never holds up the replies. Without either, results are not
    // handed over at all (a clone and a wake-up per file for nothing).
    let (results_tx, results_rx) = std::sync::mpsc::channel::<FileResult>();
    let results_tx = (writer.is_some() || sorter.is_some()).then_some(results_tx);
    let mut after = AfterEach {
        writer,
        sorter,
        write_error: None,
    };
    let worker = std::thread::spawn(move || {
        for burst in report::bursts(&results_rx) {
            // Rows reach the file before their files are moved: a client killed in
            // between leaves rows for files still in place, never moved files without
            // rows (which `--resume` could not find again).
            for result in &burst {
                after.write_row(result);
            }
            after.flush();
            for result in &burst {
                after.sort(result);
            }
        }
        after
    });

    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let interactive = std::io::stderr().is_terminal();
    let quiet = args.quiet;
    let outcome = client_app::classify_files(
        &config,
        files,
        |total| -> Box<dyn Progress> {
            let display: Box<dyn Progress> = if interactive {
                Box::new(Bar::new(total, quiet))
            } else if quiet {
                Box::new(NoProgress)
            } else {
                Box::new(Lines)
            };
            Box::new(Tee {
                display,
                results: results_tx,
            })
        },
        &shutdown,
    )
    .await;
    let mut after = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the thread writing results and sorting files panicked"))?;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            if let Some(path) = &args.output {
                if after.finish().is_ok() {
                    eprintln!(
                        "the results so far are in {}; run again with --resume to go on",
                        shown(path)
                    );
                }
            }
            return Err(error);
        }
    };
    let report = &outcome.report;
    // Unanswered files are known only now: their rows go last.
    for result in &report.results {
        if result.outcome == FileOutcome::Unanswered {
            after.write_row(result);
            after.sort(result);
        }
    }
    let mut notes = Vec::new();
    if let (true, Some(path)) = (args.resume, &args.output) {
        notes.push(format!(
            "skipped (already answered): {skipped}   (in {})",
            shown(path)
        ));
    }
    notes.extend(report::skipped_notes(&not_sent));
    if let Some(sorter) = &after.sorter {
        notes.extend(sort_notes(sorter));
    }
    let accuracy = report::accuracy(report, &outcome.model_classes);
    println!(
        "{}",
        report::summary_with_notes(report, accuracy.as_ref(), &notes)
    );
    let sort_failed = after.sorter.as_ref().is_some_and(|s| s.counts().failed > 0);
    if let Some(error) = after.write_error.take() {
        return Err(error);
    }
    after.finish()?;
    if let Some(path) = &args.output {
        println!("results written to {}", shown(path));
    }
    if let Some(path) = &args.report {
        client_app::html_report::write_html_report(report, accuracy.as_ref(), path)?;
        println!("report written to {}", shown(path));
    }
    let counts = Counts::of(report);
    let lost_in_walk = not_sent.iter().any(|entry| entry.reason.is_error());
    Ok(if counts.unanswered > 0 {
        ExitCode::from(3)
    } else if sort_failed {
        ExitCode::from(4)
    } else if counts.failed > 0 || lost_in_walk {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The `--sort-into` options, with OUT created and checked not to be inside a folder
/// being classified (its files would be classified and sorted again next time).
fn sort_options(args: &ClassifyArgs, out: &std::path::Path) -> anyhow::Result<SortOptions> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the --sort-into folder {}", out.display()))?;
    let out_real = out
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", out.display()))?;
    for input in &args.paths {
        if let Ok(input_real) = input.canonicalize() {
            anyhow::ensure!(
                input_real.is_file() || !out_real.starts_with(&input_real),
                "--sort-into {} is inside {}, which is being classified: choose a folder \
                 outside it",
                out.display(),
                input.display()
            );
        }
    }
    Ok(SortOptions {
        out: out.to_path_buf(),
        transfer: if args.move_files {
            Transfer::Move
        } else {
            Transfer::Copy
        },
        min_confidence: args.min_confidence,
    })
}

/// The summary lines saying where `--sort-into` put the files, and what it could not.
fn sort_notes(sorter: &Sorter) -> Vec<String> {
    let counts = sorter.counts();
    let options = sorter.options();
    let verb = match options.transfer {
        Transfer::Copy => "copied",
        Transfer::Move => "moved",
    };
    let mut notes = vec![format!(
        "sorted ({verb}) into {}: by class {}, uncertain {}, errors {}, failed {}, left unanswered {}",
        shown(&options.out),
        counts.by_class,
        counts.uncertain,
        counts.errors,
        counts.failed,
        counts.unanswered,
    )];
    if !sorter.failures().is_empty() {
        notes.push("not sorted (left where they were):".to_string());
        for failure in sorter.failures() {
            notes.push(format!(
                "  {}: {}",
                shown(&failure.file),
                report::printable(&failure.reason)
            ));
        }
    }
    notes
}

/// What happens to each result as it arrives, on the worker thread: its row is
/// written to the results file, then its file sorted.
struct AfterEach {
    writer: Option<ResultsWriter>,
    sorter: Option<Sorter>,
    /// The first failure writing results (later rows are not attempted).
    write_error: Option<anyhow::Error>,
}

impl AfterEach {
    /// Writes the result's row (buffered until [`AfterEach::flush`]).
    fn write_row(&mut self, result: &FileResult) {
        self.with_writer(|writer| writer.write(result));
    }

    /// Runs `step` on the results file unless there is none or it already failed; the
    /// first failure is reported and kept (later steps are not attempted).
    fn with_writer(&mut self, step: impl FnOnce(&mut ResultsWriter) -> anyhow::Result<()>) {
        if let (Some(writer), None) = (&mut self.writer, &self.write_error) {
            if let Err(error) = step(writer) {
                eprintln!("error: {}", report::printable(&format!("{error:#}")));
                self.write_error = Some(error);
            }
        }
    }

    /// Sorts the result's file (`--sort-into`).
    fn sort(&mut self, result: &FileResult) {
        if let Some(sorter) = &mut self.sorter {
            if let Err(failure) = sorter.sort(result) {
                eprintln!(
                    "warning: {} not sorted: {} (it stays where it was)",
                    shown(&failure.file),
                    report::printable(&failure.reason)
                );
            }
        }
    }

    /// Hands the rows written so far to the results file.
    fn flush(&mut self) {
        self.with_writer(ResultsWriter::flush);
    }

    /// Flushes and syncs the results file.
    fn finish(&mut self) -> anyhow::Result<()> {
        match self.writer.take() {
            Some(writer) => writer.finish(),
            None => Ok(()),
        }
    }
}

/// Shows progress and hands every result to the worker thread.
struct Tee {
    display: Box<dyn Progress>,
    /// The worker thread's queue; `None` when it has nothing to do with results.
    results: Option<std::sync::mpsc::Sender<FileResult>>,
}

impl Progress for Tee {
    fn file_done(&self, result: &FileResult) {
        self.display.file_done(result);
        if let Some(results) = &self.results {
            // The worker ends only after the sender is dropped: it is there.
            let _ = results.send(result.clone());
        }
    }
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
            // Ids, reasons and topics are a peer's: escaped.
            println!("{}", report::printable(&dead_letters::letter_line(letter)));
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
            eprintln!(
                "no dead letter with request id {} was read; nothing re-published for it",
                report::printable(id)
            );
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

/// A path as printed: control characters escaped (see [`report::printable`]).
fn shown(path: &std::path::Path) -> String {
    report::printable(&path.to_string_lossy()).into_owned()
}
