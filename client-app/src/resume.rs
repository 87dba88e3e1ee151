//! `--resume`: which files an earlier run's results file already answered for good.
//!
//! Rows are matched to files by their `file` column (the path as shown, e.g.
//! `examples/coat/1.png`), so the folders must be given the same way as before. A file
//! counts as answered when its last row says `classified`, or `error` with a code that
//! the same bytes would get again ([`is_final`], by [`FailureCode::is_final`]).
//! Unanswered files and transient or client-side errors (`INTERNAL`,
//! `UNREADABLE_FILE`, `FILE_TOO_LARGE`, …) are sent again. Rows that cannot be read (a
//! line cut short by a crash) are skipped.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::failure::FailureCode;
use crate::inputs::InputFile;

/// Whether a row with this `status` (and `error_code`, as written: codes of other
/// versions are kept as [`FailureCode::Other`] and retried) is an answer that sending
/// the file again would not change.
pub fn is_final(status: &str, error_code: Option<&FailureCode>) -> bool {
    match status {
        "classified" => true,
        "error" => error_code.is_some_and(FailureCode::is_final),
        _ => false,
    }
}

/// The columns of a results row that `--resume` reads.
#[derive(Debug, serde::Deserialize)]
struct Seen {
    file: String,
    status: String,
    #[serde(default)]
    error_code: Option<String>,
}

/// What an earlier results file says.
#[derive(Debug, Default)]
pub struct Answered {
    /// Per file (as shown): whether its last row was final.
    last: HashMap<String, bool>,
    /// Rows that could not be read.
    pub unreadable_rows: usize,
}

impl Answered {
    /// Reads the results file at `path` (CSV or JSON Lines, as `--output` writes it). A
    /// missing file answered nothing.
    pub fn read(path: &Path) -> anyhow::Result<Answered> {
        let mut answered = Answered::default();
        if !path.exists() {
            return Ok(answered);
        }
        let mut note = |seen: Option<Seen>| match seen {
            Some(seen) => {
                let code = seen.error_code.as_deref().map(FailureCode::from);
                let last = is_final(&seen.status, code.as_ref());
                answered.last.insert(seen.file, last);
            }
            None => answered.unreadable_rows += 1,
        };
        if crate::report::is_csv(path) {
            let mut reader = csv::ReaderBuilder::new()
                .flexible(true)
                .from_path(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for row in reader.deserialize::<Seen>() {
                note(row.ok());
            }
        } else {
            let text =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.split(|&b| b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                note(serde_json::from_slice(line).ok());
            }
        }
        Ok(answered)
    }

    /// Whether `file` was answered for good.
    pub fn is_answered(&self, file: &InputFile) -> bool {
        self.last.get(&file.display_name).copied().unwrap_or(false)
    }

    /// Splits `files` into those to send and the number skipped as answered.
    pub fn remaining(&self, files: Vec<InputFile>) -> (Vec<InputFile>, usize) {
        let total = files.len();
        let left: Vec<InputFile> = files.into_iter().filter(|f| !self.is_answered(f)).collect();
        let skipped = total - left.len();
        (left, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn input(name: &str) -> InputFile {
        InputFile {
            path: PathBuf::from(name),
            display_name: name.to_string(),
            folder: None,
            relative: PathBuf::from(name),
        }
    }

    #[test]
    fn final_answers_are_classified_and_content_errors() {
        let error = |code: &str| is_final("error", Some(&FailureCode::from(code)));
        assert!(is_final("classified", None));
        assert!(error("CORRUPT_IMAGE"));
        assert!(error("MESSAGE_TOO_LARGE"));
        assert!(!error("INTERNAL"));
        assert!(!error("UNREADABLE_FILE"));
        assert!(!error("FILE_TOO_LARGE"));
        assert!(!error("TIMEOUT"), "a code of another version is retried");
        assert!(!is_final("error", None));
        assert!(!is_final("unanswered", None));
    }

    #[test]
    fn reads_json_lines_last_row_wins_and_bad_rows_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"file\":\"a\",\"status\":\"classified\"}\n",
                "{\"file\":\"b\",\"status\":\"unanswered\",\"error_code\":null}\n",
                "{\"file\":\"c\",\"status\":\"error\",\"error_code\":\"CORRUPT_IMAGE\"}\n",
                "{\"file\":\"d\",\"status\":\"error\",\"error_code\":\"INTERNAL\"}\n",
                "{\"file\":\"b\",\"status\":\"classified\"}\n",
                "{\"file\":\"e\",\"sta",
            ),
        )
        .expect("write");
        let answered = Answered::read(&path).expect("read");
        assert_eq!(answered.unreadable_rows, 1);
        let files = ["a", "b", "c", "d", "e", "f"].map(input).to_vec();
        let (left, skipped) = answered.remaining(files);
        assert_eq!(skipped, 3);
        let names: Vec<_> = left.iter().map(|f| f.display_name.as_str()).collect();
        assert_eq!(names, ["d", "e", "f"]);
    }

    #[test]
    fn reads_csv_as_written_and_a_missing_file_answers_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.csv");
        std::fs::write(
            &path,
            "file,status,predicted_class,probability,top_k,error_code\n\
             a,classified,Coat,0.9,Coat:0.9,\n\
             b,error,,,,TIMEOUT\n\
             c,error,,,,EMPTY_IMAGE\n",
        )
        .expect("write");
        let answered = Answered::read(&path).expect("read");
        let (left, skipped) = answered.remaining(["a", "b", "c"].map(input).to_vec());
        assert_eq!((left.len(), skipped), (1, 2));
        assert_eq!(left[0].display_name, "b");
        let none = Answered::read(&dir.path().join("missing.jsonl")).expect("missing is fine");
        assert_eq!(none.remaining(vec![input("a")]).1, 0);
    }
}
