//! Turning a [`JobReport`] into what the user reads: one line per file, a summary,
//! accuracy and a confusion matrix when the folders name the classes, and result files
//! (JSON Lines or CSV) to open elsewhere.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::inputs::Skipped;
use crate::job::{FileOutcome, FileResult, JobReport};

/// Counts that decide the exit status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Files in the job.
    pub files: usize,
    /// Classified by a server.
    pub classified: usize,
    /// Answered with an error (by the server or the client).
    pub failed: usize,
    /// Never answered.
    pub unanswered: usize,
}

impl Counts {
    /// Counts the outcomes of a report.
    pub fn of(report: &JobReport) -> Self {
        let mut counts = Counts {
            files: report.results.len(),
            ..Counts::default()
        };
        for result in &report.results {
            match result.outcome {
                FileOutcome::Classified { .. } => counts.classified += 1,
                FileOutcome::Failed { .. } => counts.failed += 1,
                FileOutcome::Unanswered => counts.unanswered += 1,
            }
        }
        counts
    }
}

/// `text` safe to print: control characters (newlines, escape sequences, ...) and the
/// invisible marks that reorder text (bidirectional overrides, zero-width characters)
/// are escaped as `\n`, `\u{1b}`, ... File names, and what servers and peers send
/// back, must not forge lines of the output or drive the terminal. Everything else,
/// including non-ASCII letters, is kept as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' | '\n' | '\r' => out.extend(c.escape_debug()),
            c if needs_escape(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Characters [`printable`] escapes.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

/// One line for one file, safe to print (see [`printable`]).
pub fn result_line(result: &FileResult) -> String {
    let name = printable(&result.input.display_name);
    match &result.outcome {
        FileOutcome::Classified { top_k, .. } => {
            let best = top_k
                .first()
                .map(|c| {
                    format!(
                        "{} ({:.1}%)",
                        printable(&c.class_name),
                        c.probability * 100.0
                    )
                })
                .unwrap_or_else(|| "no prediction".into());
            let others: Vec<String> = top_k
                .iter()
                .skip(1)
                .map(|c| format!("{} {:.1}%", printable(&c.class_name), c.probability * 100.0))
                .collect();
            if others.is_empty() {
                format!("{name}  →  {best}")
            } else {
                format!("{name}  →  {best}   [{}]", others.join(", "))
            }
        }
        FileOutcome::Failed { code, reason } => {
            format!(
                "{name}  ✗  {}: {}",
                printable(code.as_str()),
                printable(reason)
            )
        }
        FileOutcome::Unanswered => format!(
            "{name}  ?  UNANSWERED: no reply before the timeout (request {})",
            result.request_id
        ),
    }
}

/// The summary lines about what the walk found and did not send (`skipped`): a count,
/// then one line per entry with its reason, names escaped (see [`printable`]).
pub fn skipped_notes(skipped: &[Skipped]) -> Vec<String> {
    if skipped.is_empty() {
        return Vec::new();
    }
    let errors = skipped.iter().filter(|s| s.reason.is_error()).count();
    let mut notes = vec![format!(
        "not sent: {}   (not regular files, unreadable folders: {errors}; folders reached twice: {})",
        skipped.len(),
        skipped.len() - errors
    )];
    for entry in skipped {
        notes.push(format!(
            "  {}: {}",
            printable(&entry.display_name),
            printable(&entry.reason.to_string())
        ));
    }
    notes
}

/// Folder and class names compare equal when they agree after lower-casing and turning
/// every run of other characters into one dash: `t-shirt-top` names `T-shirt/top`.
pub fn normalize_class(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Accuracy over files whose folder names one of the model's classes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accuracy {
    /// Class names in matrix order.
    pub classes: Vec<String>,
    /// `matrix[true][predicted]` counts.
    pub matrix: Vec<Vec<usize>>,
    /// Correct top-1 predictions.
    pub correct: usize,
    /// Labelled and classified files.
    pub total: usize,
}

impl Accuracy {
    /// Fraction correct (0 when nothing was labelled).
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Computes accuracy if any classified file sits in a folder named after a class.
/// `known_classes` comes from the model's metadata when the client has it; otherwise the
/// class names seen in the predictions are used.
pub fn accuracy(report: &JobReport, known_classes: &[String]) -> Option<Accuracy> {
    let mut classes: Vec<String> = known_classes.to_vec();
    if classes.is_empty() {
        let mut seen: BTreeSet<(u32, String)> = BTreeSet::new();
        for result in &report.results {
            if let FileOutcome::Classified { top_k, .. } = &result.outcome {
                for score in top_k {
                    seen.insert((score.class_index, score.class_name.clone()));
                }
            }
        }
        classes = seen.into_iter().map(|(_, name)| name).collect();
    }
    let normalized: Vec<String> = classes.iter().map(|c| normalize_class(c)).collect();
    // Folder and class names repeat across thousands of files: each is normalised once.
    let mut known: HashMap<String, Option<usize>> = HashMap::new();
    let mut index_of = |name: &str| -> Option<usize> {
        if let Some(&index) = known.get(name) {
            return index;
        }
        let index = normalized.iter().position(|c| *c == normalize_class(name));
        known.insert(name.to_string(), index);
        index
    };
    let mut accuracy = Accuracy {
        matrix: vec![vec![0; classes.len()]; classes.len()],
        classes: classes.clone(),
        ..Accuracy::default()
    };
    for result in &report.results {
        let FileOutcome::Classified { top_k, .. } = &result.outcome else {
            continue;
        };
        let Some(truth) = result.input.folder.as_deref().and_then(&mut index_of) else {
            continue;
        };
        let Some(predicted) = top_k.first().and_then(|c| index_of(&c.class_name)) else {
            continue;
        };
        accuracy.matrix[truth][predicted] += 1;
        accuracy.total += 1;
        if truth == predicted {
            accuracy.correct += 1;
        }
    }
    (accuracy.total > 0).then_some(accuracy)
}

/// The summary block printed after the per-file lines.
pub fn summary(report: &JobReport, accuracy: Option<&Accuracy>) -> String {
    summary_with_notes(report, accuracy, &[])
}

/// [`summary`] with extra lines (`notes`, e.g. what `--resume` skipped and where
/// `--sort-into` put the files) after the counts and times.
pub fn summary_with_notes(
    report: &JobReport,
    accuracy: Option<&Accuracy>,
    notes: &[String],
) -> String {
    let counts = Counts::of(report);
    let mut out = String::new();
    let _ = writeln!(out, "Summary (job {})", report.job_id);
    let _ = writeln!(
        out,
        "  files: {}   classified: {}   errors: {}   unanswered: {}   duplicate replies: {}",
        counts.files, counts.classified, counts.failed, counts.unanswered, report.duplicate_replies
    );
    if report.rejected_replies > 0 {
        let _ = writeln!(
            out,
            "  rejected replies: {} (not from this job)",
            report.rejected_replies
        );
    }
    let seconds = report.elapsed.as_secs_f64();
    let answered = counts.classified + counts.failed;
    let _ = writeln!(
        out,
        "  time: {seconds:.2} s   throughput: {:.1} images/s",
        if seconds > 0.0 {
            answered as f64 / seconds
        } else {
            0.0
        }
    );
    let mut latencies: Vec<Duration> = report.results.iter().filter_map(|r| r.latency).collect();
    if !latencies.is_empty() {
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        let _ = writeln!(
            out,
            "  latency (send → reply): p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
            ms(pick(0.5)),
            ms(pick(0.99)),
            ms(pick(1.0))
        );
    }
    for note in notes {
        let _ = writeln!(out, "  {note}");
    }
    if report.answered_by.len() > 1 {
        let mut servers: Vec<_> = report.answered_by.iter().collect();
        servers.sort();
        let list: Vec<String> = servers
            .iter()
            .map(|(s, n)| format!("{}: {n}", printable(s)))
            .collect();
        let _ = writeln!(out, "  answered by: {}", list.join(", "));
    }
    let failures: Vec<&FileResult> = report
        .results
        .iter()
        .filter(|r| !matches!(r.outcome, FileOutcome::Classified { .. }))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "  not classified:");
        for result in failures {
            let _ = writeln!(out, "    {}", result_line(result));
        }
    }
    if let Some(accuracy) = accuracy {
        let _ = writeln!(
            out,
            "  accuracy: {}/{} = {:.1}% (files in folders named after classes)",
            accuracy.correct,
            accuracy.total,
            accuracy.ratio() * 100.0
        );
        out.push_str(&confusion_matrix(accuracy));
    }
    out
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The confusion matrix as a text table (rows: true class, columns: predicted).
pub fn confusion_matrix(accuracy: &Accuracy) -> String {
    let short: Vec<String> = accuracy
        .classes
        .iter()
        .map(|c| normalize_class(c).chars().take(7).collect())
        .collect();
    let label_width = short.iter().map(String::len).max().unwrap_or(4).max(4);
    let mut out = format!(
        "  confusion matrix (rows: folder, columns: predicted)\n  {:label_width$}",
        ""
    );
    for name in &short {
        let _ = write!(out, " {name:>7}");
    }
    out.push('\n');
    for (truth, row) in accuracy.matrix.iter().enumerate() {
        if row.iter().all(|&n| n == 0) {
            continue;
        }
        let _ = write!(out, "  {:label_width$}", short[truth]);
        for count in row {
            let _ = write!(out, " {count:>7}");
        }
        out.push('\n');
    }
    out
}

/// One row of a results file.
#[derive(Debug, serde::Serialize)]
struct Row<'a> {
    file: &'a str,
    status: &'a str,
    predicted_class: Option<&'a str>,
    probability: Option<f32>,
    top_k: Option<String>,
    error_code: Option<&'a str>,
    error_reason: Option<&'a str>,
    folder: Option<&'a str>,
    server_id: &'a str,
    latency_ms: Option<f64>,
    request_id: &'a str,
    model: Option<&'a str>,
    model_version: Option<&'a str>,
}

fn row(result: &FileResult) -> Row<'_> {
    let (model, model_version) = match &result.outcome {
        FileOutcome::Classified {
            model,
            model_version,
            ..
        } => (Some(model.as_str()), Some(model_version.as_str())),
        _ => (None, None),
    };
    let (status, predicted, probability, top_k, code, reason) = match &result.outcome {
        FileOutcome::Classified { top_k, .. } => (
            "classified",
            top_k.first().map(|c| c.class_name.as_str()),
            top_k.first().map(|c| c.probability),
            Some(
                top_k
                    .iter()
                    .map(|c| format!("{}:{:.4}", c.class_name, c.probability))
                    .collect::<Vec<_>>()
                    .join(";"),
            ),
            None,
            None,
        ),
        FileOutcome::Failed { code, reason } => (
            "error",
            None,
            None,
            None,
            Some(code.as_str()),
            Some(reason.as_str()),
        ),
        FileOutcome::Unanswered => ("unanswered", None, None, None, None, None),
    };
    Row {
        file: &result.input.display_name,
        status,
        predicted_class: predicted,
        probability,
        top_k,
        error_code: code,
        error_reason: reason,
        folder: result.input.folder.as_deref(),
        server_id: &result.server_id,
        latency_ms: result.latency.map(ms),
        request_id: &result.request_id,
        model,
        model_version,
    }
}

/// Writes the results as CSV (`.csv`) or JSON Lines (anything else, e.g. `.jsonl`).
pub fn write_results(report: &JobReport, path: &Path) -> anyhow::Result<()> {
    let mut writer = ResultsWriter::create(path, false)?;
    for result in &report.results {
        writer.write(result)?;
    }
    writer.finish()
}

/// Whether `path` names a CSV results file (`.csv`); JSON Lines otherwise.
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// A results file written as results arrive: rows are buffered and handed to the file
/// by [`ResultsWriter::flush`] once per burst of results (see [`bursts`]), so a run that
/// is interrupted or crashes leaves the results it had flushed, and `--resume` can carry
/// on from them.
pub struct ResultsWriter {
    path: std::path::PathBuf,
    format: Format,
}

enum Format {
    Csv(Box<csv::Writer<std::fs::File>>),
    JsonLines(std::io::BufWriter<std::fs::File>),
}

impl ResultsWriter {
    /// Opens `path` for results: CSV if it ends in `.csv`, JSON Lines otherwise.
    /// `append` keeps what the file holds and adds rows after it (a CSV header only if
    /// the file was empty; a last line cut short by a crash is ended first); otherwise
    /// the file is created or emptied.
    pub fn create(path: &Path, append: bool) -> anyhow::Result<ResultsWriter> {
        let open = || -> std::io::Result<(std::fs::File, bool)> {
            if append {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .read(true)
                    .open(path)?;
                let len = file.metadata()?.len();
                if len > 0 && !ends_with_newline(&mut file, len)? {
                    file.write_all(b"\n")?;
                }
                Ok((file, len > 0))
            } else {
                Ok((std::fs::File::create(path)?, false))
            }
        };
        let (file, has_rows) = open().with_context(|| format!("cannot open {}", path.display()))?;
        let format = if is_csv(path) {
            Format::Csv(Box::new(
                csv::WriterBuilder::new()
                    .has_headers(!has_rows)
                    .from_writer(file),
            ))
        } else {
            Format::JsonLines(std::io::BufWriter::new(file))
        };
        Ok(ResultsWriter {
            path: path.to_path_buf(),
            format,
        })
    }

    /// Writes the row of one result into the writer's buffer; [`ResultsWriter::flush`]
    /// hands the rows buffered so far to the file. (A write system call per row cost
    /// more than the rest of the row's path through the client.)
    pub fn write(&mut self, result: &FileResult) -> anyhow::Result<()> {
        let written: anyhow::Result<()> = match &mut self.format {
            Format::Csv(writer) => writer.serialize(row(result)).map_err(anyhow::Error::from),
            Format::JsonLines(file) => serde_json::to_writer(&mut *file, &row(result))
                .map_err(anyhow::Error::from)
                .and_then(|()| file.write_all(b"\n").map_err(anyhow::Error::from)),
        };
        written.with_context(|| format!("cannot write to {}", self.path.display()))
    }

    /// Hands the buffered rows to the file (the operating system's, not yet the disk's:
    /// they outlive a crash of this process, not of the machine).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        let flushed = match &mut self.format {
            Format::Csv(writer) => writer.flush(),
            Format::JsonLines(file) => file.flush(),
        };
        flushed.with_context(|| format!("cannot write to {}", self.path.display()))
    }

    /// Flushes and `fsync`s the file.
    pub fn finish(self) -> anyhow::Result<()> {
        let file = match self.format {
            Format::Csv(writer) => writer
                .into_inner()
                .map_err(|error| anyhow::anyhow!("{}", error.error()))
                .with_context(|| format!("cannot write to {}", self.path.display()))?,
            Format::JsonLines(file) => file
                .into_inner()
                .map_err(|error| anyhow::anyhow!("{}", error.error()))
                .with_context(|| format!("cannot write to {}", self.path.display()))?,
        };
        file.sync_all()
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }
}

/// What is sent on `queue` until every sender is gone, a burst at a time: each burst is
/// what was waiting (at least one item; blocks for the first). A writer of results as
/// they arrive flushes once per burst instead of once per row.
pub fn bursts<T>(queue: &std::sync::mpsc::Receiver<T>) -> impl Iterator<Item = Vec<T>> + '_ {
    std::iter::from_fn(move || {
        let mut burst = vec![queue.recv().ok()?];
        burst.extend(queue.try_iter());
        Some(burst)
    })
}

/// Whether the last of the `len` bytes of `file` is a newline.
fn ends_with_newline(file: &mut std::fs::File, len: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::FailureCode;
    use crate::inputs::InputFile;
    use crate::job::ClassScore;
    use classifier_proto::ErrorCode;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn file(folder: &str, name: &str) -> InputFile {
        InputFile {
            path: PathBuf::from(format!("{folder}/{name}")),
            display_name: format!("{folder}/{name}"),
            folder: Some(folder.to_string()),
            relative: PathBuf::from(name),
        }
    }

    fn classified(folder: &str, predicted: &str, index: u32) -> FileResult {
        FileResult {
            input: file(folder, "x.png"),
            request_id: "r".into(),
            outcome: FileOutcome::Classified {
                top_k: vec![ClassScore {
                    class_name: predicted.into(),
                    class_index: index,
                    probability: 0.9,
                }],
                model: "m".into(),
                model_version: "1".into(),
            },
            server_id: "s".into(),
            latency: Some(Duration::from_millis(3)),
        }
    }

    fn report(results: Vec<FileResult>) -> JobReport {
        JobReport {
            job_id: "job".into(),
            results,
            duplicate_replies: 2,
            rejected_replies: 0,
            elapsed: Duration::from_secs(1),
            answered_by: HashMap::new(),
        }
    }

    #[test]
    fn folder_names_match_class_names_after_normalising() {
        assert_eq!(normalize_class("T-shirt/top"), "t-shirt-top");
        assert_eq!(normalize_class("Ankle boot"), "ankle-boot");
        assert_eq!(normalize_class("ankle-boot"), "ankle-boot");
    }

    #[test]
    fn accuracy_and_confusion_count_only_labelled_classified_files() {
        let mut results = vec![
            classified("t-shirt-top", "T-shirt/top", 0),
            classified("t-shirt-top", "Shirt", 6),
            classified("shirt", "Shirt", 6),
            classified("holiday", "Shirt", 6),
        ];
        results.push(FileResult {
            outcome: FileOutcome::Failed {
                code: FailureCode::Server(ErrorCode::CorruptImage),
                reason: "truncated".into(),
            },
            ..classified("shirt", "Shirt", 6)
        });
        let report = report(results);
        let classes: Vec<String> = ["T-shirt/top", "Shirt"].map(String::from).to_vec();
        let accuracy = accuracy(&report, &classes).expect("labelled files exist");
        assert_eq!((accuracy.correct, accuracy.total), (2, 3));
        assert_eq!(accuracy.matrix, vec![vec![1, 1], vec![0, 1]]);
        let text = summary(&report, Some(&accuracy));
        assert!(text.contains("errors: 1"), "{text}");
        assert!(text.contains("duplicate replies: 2"), "{text}");
        assert!(text.contains("66.7%"), "{text}");
        assert!(text.contains("CORRUPT_IMAGE: truncated"), "{text}");
    }

    #[test]
    fn no_accuracy_without_class_folders() {
        let report = report(vec![classified("holiday", "Shirt", 6)]);
        assert_eq!(accuracy(&report, &[]), None);
    }

    #[test]
    fn results_files_are_csv_or_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = report(vec![classified("shirt", "Shirt", 6)]);
        let csv_path = dir.path().join("out.csv");
        write_results(&report, &csv_path).expect("csv");
        let text = std::fs::read_to_string(&csv_path).expect("read");
        assert!(text.starts_with("file,status,predicted_class"), "{text}");
        assert!(text.contains("shirt/x.png,classified,Shirt"), "{text}");
        let json_path = dir.path().join("out.jsonl");
        write_results(&report, &json_path).expect("jsonl");
        let line = std::fs::read_to_string(&json_path).expect("read");
        let value: serde_json::Value = serde_json::from_str(line.trim()).expect("json");
        assert_eq!(value["predicted_class"], "Shirt");
    }

    #[test]
    fn appending_keeps_old_rows_and_mends_a_cut_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = classified("shirt", "Shirt", 6);
        let json_path = dir.path().join("out.jsonl");
        std::fs::write(&json_path, b"{\"file\":\"old\"}\n{\"file\":\"cut").expect("write");
        let mut writer = ResultsWriter::create(&json_path, true).expect("open");
        writer.write(&one).expect("write");
        writer.finish().expect("finish");
        let text = std::fs::read_to_string(&json_path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], "{\"file\":\"cut");
        assert!(lines[2].contains("\"predicted_class\":\"Shirt\""), "{text}");

        let csv_path = dir.path().join("out.csv");
        for _ in 0..2 {
            let mut writer = ResultsWriter::create(&csv_path, true).expect("open");
            writer.write(&one).expect("write");
            writer.finish().expect("finish");
        }
        let text = std::fs::read_to_string(&csv_path).expect("read");
        assert_eq!(text.lines().count(), 3, "one header, two rows: {text}");
        assert_eq!(text.matches("file,status").count(), 1, "{text}");
    }

    #[test]
    fn printed_names_are_escaped() {
        assert_eq!(printable("coat/1.png"), "coat/1.png");
        assert!(matches!(printable("ünïcødé ✓.png"), Cow::Borrowed(_)));
        assert_eq!(printable("a\nb\tc\rd"), "a\\nb\\tc\\rd");
        assert_eq!(printable("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(printable("bell\u{7}\u{9b}"), "bell\\u{7}\\u{9b}");
    }

    #[test]
    fn result_lines_and_the_summary_escape_what_they_print() {
        let mut evil = classified("shirt", "Shirt\u{1b}]0;owned\u{7}", 6);
        evil.input.display_name = "shirt/a\nFORGED LINE\u{1b}[2J.png".into();
        let line = result_line(&evil);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("a\\nFORGED LINE\\u{1b}[2J.png"), "{line}");
        let failed = FileResult {
            outcome: FileOutcome::Failed {
                code: FailureCode::Other("CODE\n".into()),
                reason: "why\u{1b}[1A".into(),
            },
            ..evil.clone()
        };
        let mut report = report(vec![evil, failed]);
        report.rejected_replies = 7;
        report.answered_by = [("s\n1".to_string(), 1), ("s2".to_string(), 1)].into();
        let text = summary(&report, None);
        assert!(
            text.lines().all(|l| !l.chars().any(char::is_control)),
            "{text:?}"
        );
        assert!(
            text.contains("rejected replies: 7 (not from this job)"),
            "{text}"
        );
    }

    #[test]
    fn skipped_entries_are_listed_escaped_with_their_reasons() {
        use crate::inputs::SkipReason;
        let skipped = |name: &str, reason| Skipped {
            path: PathBuf::from(name),
            display_name: name.into(),
            reason,
        };
        let notes = skipped_notes(&[
            skipped("p/pipe\n.png", SkipReason::NotARegularFile("a FIFO")),
            skipped("p/loop", SkipReason::AlreadyWalked),
        ]);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].starts_with("not sent: 2"), "{}", notes[0]);
        assert_eq!(
            notes[1],
            "  p/pipe\\n.png: not a regular file (a FIFO); not opened"
        );
        assert!(skipped_notes(&[]).is_empty());
    }

    /// The results files keep names as they are (a newline, an escape), quoted as their
    /// format wants: read back, they are the same names.
    #[test]
    fn results_files_keep_real_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = "shirt/a\n\u{1b}[31m,\"b\".png";
        let mut one = classified("shirt", "Shirt", 6);
        one.input.display_name = name.into();
        let report = report(vec![one]);
        let csv_path = dir.path().join("out.csv");
        write_results(&report, &csv_path).expect("csv");
        let mut reader = csv::Reader::from_path(&csv_path).expect("csv reader");
        let record = reader
            .records()
            .next()
            .expect("a row")
            .expect("a valid row");
        assert_eq!(&record[0], name);
        let json_path = dir.path().join("out.jsonl");
        write_results(&report, &json_path).expect("jsonl");
        let text = std::fs::read_to_string(&json_path).expect("read");
        assert_eq!(text.lines().count(), 1, "one line per row: {text:?}");
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(value["file"], name);
    }
}
