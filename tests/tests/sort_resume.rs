//! `client-app classify --sort-into / --move / --min-confidence / --resume`, driving the
//! real binary on the embedded broker: where every file lands (per the results file),
//! that nothing is overwritten or lost, and that a resumed run sends only what is new.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use client_app::sort::safe_component;
use integration_tests::{
    copy_examples, files_under, parse_summary, read_json_lines, run_client, summary_number,
    write_bad_inputs,
};

/// A work folder with `in/` (two example images per class and the bad inputs in
/// `in/bad/`), and where the results file and `out/` go.
struct Work {
    dir: tempfile::TempDir,
    images: usize,
    bad: Vec<(&'static str, &'static str)>,
}

impl Work {
    fn new(per_class: usize) -> Work {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = copy_examples(&dir.path().join("in"), per_class);
        let bad = write_bad_inputs(&dir.path().join("in/bad"));
        Work { dir, images, bad }
    }
    fn input(&self) -> PathBuf {
        self.dir.path().join("in")
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn results(&self) -> PathBuf {
        self.dir.path().join("results.jsonl")
    }
    fn files(&self) -> usize {
        self.images + self.bad.len()
    }
    /// Runs `classify in --output results.jsonl` with `extra` arguments.
    fn classify(&self, extra: &[&str]) -> (Output, String) {
        let (input, results) = (self.input(), self.results());
        let (input, results) = (input.to_string_lossy(), results.to_string_lossy());
        let mut args = vec!["classify", &input, "--output", &results, "--quiet"];
        args.extend_from_slice(extra);
        let output = run_client(&args, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output, format!("{stdout}\n--- stderr ---\n{stderr}"))
    }
    /// Every file of `in/`, by path below it, with its bytes.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        files_under(&self.input())
            .into_iter()
            .map(|path| {
                let bytes = std::fs::read(self.input().join(&path)).expect("read input");
                (path, bytes)
            })
            .collect()
    }
}

/// Where `--sort-into` must put each file (path below `in/` → path below `out/`),
/// per the results file: `<class>/<path>` (`_uncertain/<class>/<path>` when its
/// probability is below `min_confidence`) or `_errors/<code>/<path>`.
fn expected_places(results: &Path, min_confidence: Option<f64>) -> BTreeMap<PathBuf, PathBuf> {
    read_json_lines(results)
        .iter()
        .map(|row| {
            let file = row["file"].as_str().expect("file column");
            // `in/coat/x.png` → `coat/x.png`: the path below the folder argument.
            let relative: PathBuf = Path::new(file).components().skip(1).collect();
            let folder = match row["status"].as_str() {
                Some("classified") => {
                    let class = safe_component(row["predicted_class"].as_str().expect("class"));
                    let probability = row["probability"].as_f64().expect("probability");
                    match min_confidence {
                        Some(min) if probability < min => Path::new("_uncertain").join(class),
                        _ => PathBuf::from(class),
                    }
                }
                Some("error") => {
                    Path::new("_errors").join(row["error_code"].as_str().expect("error code"))
                }
                other => panic!("{file} was not answered: {other:?}"),
            };
            (relative.clone(), folder.join(relative))
        })
        .collect()
}

/// The summary's `sorted (…) into …:` numbers: by class, uncertain, errors, failed.
fn sorted_counts(stdout: &str) -> [usize; 4] {
    ["by class ", "uncertain ", "errors ", "failed "].map(|label| {
        let line = stdout
            .lines()
            .find(|line| line.contains("sorted ("))
            .unwrap_or_else(|| panic!("no sorting line in\n{stdout}"));
        summary_number(line, label).unwrap_or_else(|| panic!("no {label:?} in {line}"))
    })
}

/// `--sort-into` copies: every input file appears exactly once below OUT, in the folder
/// of its predicted class (per the results file) or of its error code, with the same
/// bytes; the sources all stay.
#[test]
fn sort_into_copies_every_file_once_into_its_class_folder() {
    let work = Work::new(2);
    let before = work.snapshot();
    let out = work.out();
    let (output, log) = work.classify(&["--sort-into", &out.to_string_lossy()]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "bad inputs are errors: {log}"
    );
    let summary = parse_summary(&log);
    assert_eq!(
        (summary.classified, summary.errors),
        (work.images, work.bad.len()),
        "{log}"
    );
    assert_eq!(
        sorted_counts(&log),
        [work.images, 0, work.bad.len(), 0],
        "{log}"
    );

    let expected = expected_places(&work.results(), None);
    assert_eq!(expected.len(), work.files(), "one row per file");
    let placed: Vec<PathBuf> = expected.values().cloned().collect();
    let mut placed_sorted = placed.clone();
    placed_sorted.sort();
    assert_eq!(
        files_under(&out),
        placed_sorted,
        "exactly the inputs, each once"
    );
    for (source, place) in &expected {
        assert_eq!(
            std::fs::read(out.join(place)).expect("sorted copy"),
            before[source],
            "{} is a faithful copy",
            place.display()
        );
    }
    assert!(
        out.join("_errors/CORRUPT_IMAGE/bad/truncated.jpg")
            .is_file(),
        "the truncated JPEG is filed under its code: {:?}",
        files_under(&out)
    );
    // The class folders are the predicted classes, named safely: `T-shirt/top` is one
    // folder, `T-shirt-top`, not two.
    assert!(files_under(&out)
        .iter()
        .all(|p| !p.starts_with("T-shirt/top")));
    assert_eq!(work.snapshot(), before, "copying leaves the sources alone");
}

/// `--move`: the sources are gone, and every one of them is below OUT, byte for byte.
#[test]
fn sort_into_with_move_moves_every_file_intact() {
    let work = Work::new(1);
    let before = work.snapshot();
    let out = work.out();
    let (output, log) = work.classify(&["--sort-into", &out.to_string_lossy(), "--move"]);
    assert_eq!(output.status.code(), Some(2), "{log}");
    assert_eq!(
        sorted_counts(&log),
        [work.images, 0, work.bad.len(), 0],
        "{log}"
    );
    assert!(
        files_under(&work.input()).is_empty(),
        "every source was moved: {:?}",
        files_under(&work.input())
    );
    let expected = expected_places(&work.results(), None);
    assert_eq!(expected.len(), before.len());
    for (source, place) in &expected {
        assert_eq!(
            std::fs::read(out.join(place)).expect("moved file"),
            before[source],
            "{} moved intact",
            place.display()
        );
    }
    assert_eq!(files_under(&out).len(), before.len(), "nothing else in OUT");
}

/// Sorting into the same OUT twice: the second run's files get `(1)` names and the
/// first run's files are untouched (one of them was changed in between, and stays so).
#[test]
fn sorting_twice_into_the_same_folder_never_overwrites() {
    let work = Work::new(1);
    let before = work.snapshot();
    let out = work.out();
    let out_arg = out.to_string_lossy().into_owned();
    let (output, log) = work.classify(&["--sort-into", &out_arg]);
    assert_eq!(output.status.code(), Some(2), "{log}");
    let first = expected_places(&work.results(), None);
    let marked = out.join(first.values().next().expect("a sorted file"));
    std::fs::write(&marked, b"changed after the first run").expect("mark a sorted file");

    let (output, log) = work.classify(&["--sort-into", &out_arg]);
    assert_eq!(output.status.code(), Some(2), "{log}");
    assert_eq!(
        sorted_counts(&log),
        [work.images, 0, work.bad.len(), 0],
        "{log}"
    );
    let second = expected_places(&work.results(), None);
    assert_eq!(
        first, second,
        "the same model puts the files in the same folders"
    );
    assert_eq!(
        std::fs::read(&marked).expect("marked file"),
        b"changed after the first run",
        "the first run's file was not overwritten"
    );
    for (source, place) in &second {
        let name = place.file_name().expect("name").to_string_lossy();
        let numbered = match name.rsplit_once('.') {
            Some((stem, ext)) => format!("{stem} (1).{ext}"),
            None => format!("{name} (1)"),
        };
        let copy = out.join(place.with_file_name(numbered));
        assert_eq!(
            std::fs::read(&copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display())),
            before[source]
        );
    }
    assert_eq!(
        files_under(&out).len(),
        2 * before.len(),
        "{:?}",
        files_under(&out)
    );
}

/// `--min-confidence 1`: every classified file whose top probability is below 1 goes
/// to `_uncertain/<class>/`, the others to their class; out-of-range values and the
/// sorting flags without `--sort-into` are refused.
#[test]
fn min_confidence_sends_unsure_files_to_uncertain() {
    let work = Work::new(2);
    let out = work.out();
    let (output, log) = work.classify(&[
        "--sort-into",
        &out.to_string_lossy(),
        "--min-confidence",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(2), "{log}");
    let expected = expected_places(&work.results(), Some(1.0));
    let mut places: Vec<PathBuf> = expected.values().cloned().collect();
    places.sort();
    assert_eq!(files_under(&out), places, "{log}");
    let uncertain = places
        .iter()
        .filter(|p| p.starts_with("_uncertain"))
        .count();
    assert!(uncertain > 0, "some prediction is below 100%: {places:?}");
    assert_eq!(
        sorted_counts(&log),
        [work.images - uncertain, uncertain, work.bad.len(), 0],
        "{log}"
    );

    for bad in [
        vec!["--sort-into", "x", "--min-confidence", "1.5"],
        vec!["--sort-into", "x", "--min-confidence", "high"],
        vec!["--min-confidence", "0.5"],
        vec!["--move"],
    ] {
        let (output, log) = work.classify(&bad);
        assert!(!output.status.success(), "{bad:?} is refused: {log}");
        assert!(
            log.contains("probability")
                || log.contains("not a number")
                || log.contains("--sort-into"),
            "{bad:?}: {log}"
        );
    }
}

/// `--resume`: after a run, new files are added; the resumed run sends only those (and
/// the one the results file says went unanswered), keeps the old rows, and a third run
/// sends nothing. `--resume` without `--output` is a clear error.
#[test]
fn resume_sends_only_what_was_not_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in");
    let first_batch = copy_examples(&input, 1);
    let results = dir.path().join("results.jsonl");
    let (input_arg, results_arg) = (input.to_string_lossy(), results.to_string_lossy());
    let run = |resume: bool| {
        let mut args = vec![
            "classify",
            &*input_arg,
            "--output",
            &*results_arg,
            "--quiet",
        ];
        if resume {
            args.push("--resume");
        }
        let output = run_client(&args, &[]);
        let log = format!(
            "{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output, log)
    };

    let (output, log) = run(false);
    assert_eq!(output.status.code(), Some(0), "{log}");
    assert_eq!(read_json_lines(&results).len(), first_batch);
    // Pretend one file went unanswered (a timeout): it must be sent again.
    let text = std::fs::read_to_string(&results).expect("results");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let retried: serde_json::Value = serde_json::from_str(&lines[0]).expect("row");
    let retried_file = retried["file"].as_str().expect("file").to_string();
    lines[0] = serde_json::json!({"file": retried_file, "status": "unanswered"}).to_string();
    std::fs::write(&results, lines.join("\n") + "\n").expect("rewrite results");

    // Add files: a second image per class, and the bad inputs.
    let all_images = copy_examples(&input, 2);
    let bad = write_bad_inputs(&input.join("bad"));
    let new_files = all_images - first_batch + bad.len();
    let (output, log) = run(true);
    assert_eq!(
        output.status.code(),
        Some(2),
        "the bad inputs are errors: {log}"
    );
    let summary = parse_summary(&log);
    assert_eq!(
        summary.files,
        new_files + 1,
        "only new files and the retry: {log}"
    );
    assert_eq!(
        summary_number(&log, "skipped (already answered): "),
        Some(first_batch - 1),
        "{log}"
    );
    let rows = read_json_lines(&results);
    assert_eq!(
        rows.len(),
        first_batch + new_files + 1,
        "old rows kept, new appended"
    );
    let retried_rows: Vec<_> = rows
        .iter()
        .filter(|row| row["file"] == retried_file.as_str())
        .map(|row| row["status"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(retried_rows, ["unanswered", "classified"], "{rows:?}");

    // Everything is answered now (errors on bad images are final): nothing is sent.
    let (output, log) = run(true);
    assert_eq!(output.status.code(), Some(0), "{log}");
    assert_eq!(parse_summary(&log).files, 0, "{log}");
    assert_eq!(
        summary_number(&log, "skipped (already answered): "),
        Some(all_images + bad.len()),
        "{log}"
    );
    assert_eq!(read_json_lines(&results).len(), rows.len(), "no new rows");

    let output = run_client(&["classify", &input_arg, "--resume"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--resume needs --output"), "{stderr}");
}

/// A file that cannot be sorted (here its `_errors/` folder is taken by a plain file) is
/// reported by name with the reason and stays where it was; the others are sorted, and
/// the exit status says so (4).
#[test]
fn files_that_cannot_be_sorted_are_reported_and_stay() {
    let work = Work::new(1);
    let out = work.out();
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("_errors"), b"in the way").expect("block _errors/");
    let (output, log) = work.classify(&["--sort-into", &out.to_string_lossy(), "--move"]);
    assert_eq!(output.status.code(), Some(4), "{log}");
    assert_eq!(
        sorted_counts(&log),
        [work.images, 0, 0, work.bad.len()],
        "{log}"
    );
    assert!(log.contains("not sorted (left where they were):"), "{log}");
    for (name, _) in &work.bad {
        let source = work.input().join("bad").join(name);
        assert!(source.is_file(), "{} stays", source.display());
        assert!(
            log.lines()
                .any(|line| line.contains(&*source.to_string_lossy())
                    && line.contains("cannot move")),
            "{name} is reported: {log}"
        );
    }
    assert_eq!(
        files_under(&work.input()).len(),
        work.bad.len(),
        "the classified files were moved"
    );
}
