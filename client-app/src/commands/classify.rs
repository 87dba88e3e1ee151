//! `client-app classify`: classify files and folders, with progress, a summary, and the
//! files a user can open (results, sorted folders, an HTML report).
//!
//! The steps, in order: the files to send ([`files_to_send`]: the walk, less what an
//! earlier run answered), a worker thread that writes each result's row and sorts its
//! file as it arrives ([`ResultsWorker`]), the job itself ([`crate::classify_files`]),
//! then the unanswered rows, the summary, the report and the exit status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use anyhow::Context;
use classifier_app::{cancel_on_signals, AppConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{shown, Common, ServerFlags};
use crate::inputs::{walk_inputs, InputFile, Skipped};
use crate::job::{FileOutcome, FileResult, JobReport, NoProgress, Progress};
use crate::report::{self, Accuracy, Counts, ResultsWriter};
use crate::resume::Answered;
use crate::sort::{SortOptions, Sorter, Transfer};
use crate::ClassifyOutcome;

/// Exit status when some files were answered with errors (bad or unsupported images)
/// or not sent (not regular files, unreadable folders).
pub const EXIT_SOME_FAILED: u8 = 2;
/// Exit status when some files were unanswered before the timeout.
pub const EXIT_UNANSWERED: u8 = 3;
/// Exit status when some files could not be sorted (`--sort-into`; they stay where
/// they were).
pub const EXIT_NOT_SORTED: u8 = 4;

/// What `client-app classify` does.
// The fields' docs are clap's --help text, written for a terminal: `<class>` is a
// placeholder there, not an HTML tag.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// Files and folders to classify.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Write results to FILE: CSV if it ends in .csv, JSON Lines otherwise. One row per
    /// file, written as the results arrive (unanswered files last), so an interrupted
    /// run keeps what it got (see --resume).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Skip the files that the --output file of an earlier run already answered, and
    /// add the new rows to that file (its old rows are kept). Answered means classified,
    /// or an error the same bytes would get again (UNSUPPORTED_FORMAT, CORRUPT_IMAGE,
    /// EMPTY_IMAGE, IMAGE_TOO_LARGE, MESSAGE_TOO_LARGE); unanswered files and other
    /// errors (INTERNAL, UNREADABLE_FILE, FILE_TOO_LARGE, ...) are sent again. Files are
    /// matched by the path shown (the `file` column), so give the folders as before.
    /// Skipped files are not sorted again.
    #[arg(long)]
    pub resume: bool,
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
    pub sort_into: Option<PathBuf>,
    /// With --sort-into: move the files instead of copying them. Each file's new copy
    /// (or hard link) is made durable (fsync of file and folder) before the source is
    /// removed, so a crash never loses a file.
    #[arg(long = "move", requires = "sort_into")]
    pub move_files: bool,
    /// With --sort-into: classified files whose top probability is below P (0 to 1) go
    /// to OUT/_uncertain/<class>/<path> instead.
    #[arg(long, value_name = "P", requires = "sort_into", value_parser = parse_probability)]
    pub min_confidence: Option<f32>,
    /// The `[client]` settings: window, timeout, predictions, model name, request size.
    #[command(flatten)]
    pub client: ClientFlags,
    /// The servers' request topic and the in-process server's model.
    #[command(flatten)]
    pub server: ServerFlags,
    /// Write a self-contained HTML page about the run to FILE: summary, confusion
    /// matrix, per-class precision and recall, the least confident predictions as
    /// thumbnails, and the errors.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Print only the summary, not one line per file.
    #[arg(long, short)]
    pub quiet: bool,
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

/// The flags of `classify` that set `[client]` settings, serialized under the field
/// names of the config file (see [`classifier_app::AppConfig::apply_client_flags`]).
#[derive(Debug, Default, clap::Args, Serialize)]
pub struct ClientFlags {
    /// Requests in flight at most.
    #[arg(long)]
    pub window: Option<usize>,
    /// Seconds to wait without any reply before giving up.
    #[arg(long)]
    #[serde(rename = "reply_timeout_secs")]
    pub timeout: Option<u64>,
    /// Predictions per image.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Ask the servers for their model of this name (one served with `classifier-server
    /// --model NAME=DIR`); default: their default model. A name they do not serve is
    /// answered with UNKNOWN_MODEL and the names they do.
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// Send requests of at most this many bytes (default: the broker's limit, e.g.
    /// 10 MB on Pub/Sub); larger images are FILE_TOO_LARGE, or downscaled with
    /// --resize-to.
    #[arg(long, value_name = "BYTES")]
    #[serde(rename = "max_request_bytes")]
    pub max_bytes: Option<usize>,
    /// Downscale images too large to send so they fit PIXELS×PIXELS (aspect ratio
    /// kept) and send them as PNG, instead of reporting FILE_TOO_LARGE.
    #[arg(long, value_name = "PIXELS", value_parser = clap::value_parser!(u32).range(1..))]
    pub resize_to: Option<u32>,
}

/// `client-app classify`: sends the files, shows progress, writes what was asked for and
/// returns the exit status (see [`EXIT_SOME_FAILED`] and its neighbours).
pub async fn classify(common: &Common, args: &ClassifyArgs) -> anyhow::Result<ExitCode> {
    let config = args.config(common)?;
    let mut to_send = files_to_send(args)?;
    let (results, worker) = ResultsWorker::start(args)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let (interactive, quiet) = (std::io::stderr().is_terminal(), args.quiet);
    let outcome = crate::classify_files(
        &config,
        std::mem::take(&mut to_send.files),
        |total| -> Box<dyn Progress> {
            Box::new(Tee {
                display: display(interactive, quiet, total),
                results,
            })
        },
        &shutdown,
    )
    .await;
    let mut after = worker.join()?;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => return Err(after.keep_what_arrived(args, error)),
    };
    after.write_unanswered(&outcome);
    let accuracy = report::accuracy(&outcome.report, &outcome.model_classes);
    print_summary(args, &to_send, &after, &outcome.report, accuracy.as_ref());
    let sort_failed = after.sorter.as_ref().is_some_and(|s| s.counts().failed > 0);
    after.finish_writing()?;
    if let Some(path) = &args.output {
        println!("results written to {}", shown(path));
    }
    if let Some(path) = &args.report {
        crate::html_report::write_html_report(&outcome.report, accuracy.as_ref(), path)?;
        println!("report written to {}", shown(path));
    }
    Ok(exit_status(&outcome, &to_send, sort_failed))
}

impl ClassifyArgs {
    /// The config with the environment, `--broker` and this command's flags applied.
    fn config(&self, common: &Common) -> anyhow::Result<AppConfig> {
        let mut config = common.config()?;
        config.apply_server_flags(&self.server)?;
        config.apply_client_flags(&self.client)?;
        Ok(config)
    }
}

/// The files of one run: those to send, and those that are not.
struct ToSend {
    /// Files to classify.
    files: Vec<InputFile>,
    /// Entries of the walk that are not sent (not regular files, unreadable folders).
    not_sent: Vec<Skipped>,
    /// Files an earlier run already answered (`--resume`).
    answered_before: usize,
}

/// Walks the paths, and with `--resume` leaves out what the results file answered.
fn files_to_send(args: &ClassifyArgs) -> anyhow::Result<ToSend> {
    let walk = walk_inputs(&args.paths)?;
    let (files, answered_before) = match (&args.output, args.resume) {
        (None, true) => anyhow::bail!(
            "--resume needs --output FILE: the results file of the earlier run, which says \
             what was answered (and gets the new results)"
        ),
        (Some(path), true) => answered_by(path)?.remaining(walk.files),
        (_, false) => (walk.files, 0),
    };
    Ok(ToSend {
        files,
        not_sent: walk.skipped,
        answered_before,
    })
}

/// What the results file of an earlier run answered, saying so when it has nothing.
fn answered_by(path: &Path) -> anyhow::Result<Answered> {
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
    Ok(answered)
}

/// How progress is shown: a bar on a terminal, else one line per file (none with
/// `--quiet`).
fn display(interactive: bool, quiet: bool, total: usize) -> Box<dyn Progress> {
    if interactive {
        Box::new(Bar::new(total, quiet))
    } else if quiet {
        Box::new(NoProgress)
    } else {
        Box::new(Lines)
    }
}

/// Prints the summary, with the notes on skipped, not sent and sorted files.
fn print_summary(
    args: &ClassifyArgs,
    to_send: &ToSend,
    after: &AfterEach,
    job: &JobReport,
    accuracy: Option<&Accuracy>,
) {
    let mut notes = Vec::new();
    if let (true, Some(path)) = (args.resume, &args.output) {
        notes.push(format!(
            "skipped (already answered): {}   (in {})",
            to_send.answered_before,
            shown(path)
        ));
    }
    notes.extend(report::skipped_notes(&to_send.not_sent));
    if let Some(sorter) = &after.sorter {
        notes.extend(sort_notes(sorter));
    }
    println!("{}", report::summary_with_notes(job, accuracy, &notes));
}

/// The exit status: unanswered files first, then files not sorted, then failures.
fn exit_status(outcome: &ClassifyOutcome, to_send: &ToSend, sort_failed: bool) -> ExitCode {
    let counts = Counts::of(&outcome.report);
    let lost_in_walk = to_send.not_sent.iter().any(|entry| entry.reason.is_error());
    if counts.unanswered > 0 {
        ExitCode::from(EXIT_UNANSWERED)
    } else if sort_failed {
        ExitCode::from(EXIT_NOT_SORTED)
    } else if counts.failed > 0 || lost_in_walk {
        ExitCode::from(EXIT_SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// The thread that writes results and sorts files as they arrive, so file system work
/// never holds up the replies.
struct ResultsWorker(JoinHandle<AfterEach>);

impl ResultsWorker {
    /// Starts the worker with the results file and sorter `args` ask for, and returns
    /// its queue: `None` when there is nothing to do with results (a clone and a
    /// wake-up per file for nothing).
    fn start(args: &ClassifyArgs) -> anyhow::Result<(Option<Sender<FileResult>>, Self)> {
        let sorter = match &args.sort_into {
            Some(out) => Some(Sorter::new(sort_options(args, out)?)),
            None => None,
        };
        let writer = match &args.output {
            Some(path) => Some(ResultsWriter::create(path, args.resume)?),
            None => None,
        };
        let (results_tx, results_rx) = std::sync::mpsc::channel::<FileResult>();
        let results_tx = (writer.is_some() || sorter.is_some()).then_some(results_tx);
        let mut after = AfterEach {
            writer,
            sorter,
            write_error: None,
        };
        let thread = std::thread::spawn(move || {
            for burst in report::bursts(&results_rx) {
                // Rows reach the file before their files are moved: a client killed in
                // between leaves rows for files still in place, never moved files
                // without rows (which `--resume` could not find again).
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
        Ok((results_tx, ResultsWorker(thread)))
    }

    /// Waits for the worker to finish the results it was given (its queue closes when
    /// the job's progress is dropped).
    fn join(self) -> anyhow::Result<AfterEach> {
        self.0
            .join()
            .map_err(|_| anyhow::anyhow!("the thread writing results and sorting files panicked"))
    }
}

/// The `--sort-into` options, with OUT created and checked not to be inside a folder
/// being classified (its files would be classified and sorted again next time).
fn sort_options(args: &ClassifyArgs, out: &Path) -> anyhow::Result<SortOptions> {
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
pub(super) struct Tee {
    pub(super) display: Box<dyn Progress>,
    /// The worker thread's queue; `None` when it has nothing to do with results.
    pub(super) results: Option<Sender<FileResult>>,
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

impl AfterEach {
    /// Unanswered files are known only when the job ends: their rows go last.
    fn write_unanswered(&mut self, outcome: &ClassifyOutcome) {
        for result in &outcome.report.results {
            if result.outcome == FileOutcome::Unanswered {
                self.write_row(result);
                self.sort(result);
            }
        }
    }

    /// The job failed: keeps the rows that arrived, says how to go on, and returns the
    /// job's error.
    fn keep_what_arrived(&mut self, args: &ClassifyArgs, error: anyhow::Error) -> anyhow::Error {
        if let Some(path) = &args.output {
            if self.finish().is_ok() {
                eprintln!(
                    "the results so far are in {}; run again with --resume to go on",
                    shown(path)
                );
            }
        }
        error
    }

    /// The first write failure if there was one, else the results file flushed and
    /// synced.
    fn finish_writing(&mut self) -> anyhow::Result<()> {
        if let Some(error) = self.write_error.take() {
            return Err(error);
        }
        self.finish()
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `client-app classify`'s arguments, parsed as the binary parses them.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: ClassifyArgs,
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("client-app").chain(args.iter().copied()))
    }

    fn examples() -> String {
        format!("{}/../examples", env!("CARGO_MANIFEST_DIR"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn classify_writes_results_and_sorts_every_example() {
        let dir = tempfile::tempdir().expect("temp dir");
        let results = dir.path().join("results.csv");
        let sorted = dir.path().join("sorted");
        let cli = parse(&[
            &examples(),
            "--quiet",
            "--top-k",
            "1",
            "--output",
            results.to_str().expect("utf-8 path"),
            "--sort-into",
            sorted.to_str().expect("utf-8 path"),
        ]);
        let code = classify(&cli.common, &cli.args).await.expect("classifies");
        assert_eq!(code, ExitCode::SUCCESS);
        let rows = std::fs::read_to_string(&results).expect("results file");
        assert_eq!(
            rows.lines().count(),
            1 + 200,
            "a header and one row per example"
        );
        let sorted_files = walk_inputs(&[sorted]).expect("sorted folder").files;
        assert_eq!(
            sorted_files.len(),
            200,
            "every example copied into a class folder"
        );
    }

    #[tokio::test]
    async fn resume_without_a_results_file_is_a_clear_error() {
        let cli = parse(&[&examples(), "--resume"]);
        let error = classify(&cli.common, &cli.args).await.expect_err("refused");
        assert!(
            format!("{error:#}").contains("--resume needs --output"),
            "{error:#}"
        );
    }

    #[test]
    fn flags_land_in_the_config_under_their_setting() {
        let cli = parse(&[
            "x",
            "--window",
            "7",
            "--timeout",
            "9",
            "--max-bytes",
            "1234",
            "--request-topic",
            "elsewhere",
            "--model",
            "models/other",
        ]);
        let config = cli.args.config(&cli.common).expect("config");
        assert_eq!(config.client.window, 7);
        assert_eq!(config.client.reply_timeout_secs, 9);
        assert_eq!(config.client.max_request_bytes, Some(1234));
        assert_eq!(config.client.top_k, AppConfig::default().client.top_k);
        assert_eq!(config.server.request_topic, "elsewhere");
        assert_eq!(config.server.model_dir, Some(PathBuf::from("models/other")));
    }

    #[test]
    fn exit_status_puts_unanswered_before_unsorted_before_failed() {
        let result = |outcome| FileResult {
            input: InputFile {
                path: PathBuf::from("a.png"),
                display_name: "a.png".into(),
                folder: None,
                relative: PathBuf::from("a.png"),
            },
            request_id: String::new(),
            outcome,
            server_id: String::new(),
            latency: None,
        };
        let outcome = |results: Vec<FileResult>| ClassifyOutcome {
            report: JobReport {
                job_id: String::new(),
                results,
                duplicate_replies: 0,
                rejected_replies: 0,
                elapsed: std::time::Duration::ZERO,
                answered_by: Default::default(),
            },
            model_classes: Vec::new(),
        };
        let to_send = ToSend {
            files: Vec::new(),
            not_sent: Vec::new(),
            answered_before: 0,
        };
        let unanswered = outcome(vec![result(FileOutcome::Unanswered)]);
        assert_eq!(
            exit_status(&unanswered, &to_send, true),
            ExitCode::from(EXIT_UNANSWERED)
        );
        let empty = outcome(Vec::new());
        assert_eq!(
            exit_status(&empty, &to_send, true),
            ExitCode::from(EXIT_NOT_SORTED)
        );
        assert_eq!(exit_status(&empty, &to_send, false), ExitCode::SUCCESS);
    }
}
