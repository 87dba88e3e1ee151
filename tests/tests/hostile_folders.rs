//! The client on folders that are hostile or merely odd (issue 28, item 6): symbolic
//! link loops, a FIFO among the images, a folder it may not read, file names with
//! newlines and terminal escapes. Every run must end, promptly, after its summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::{binary, parse_summary, run_client_within, workspace_root};

/// Longest a run on these small folders may take (a debug build starting its
/// in-process server on a busy machine included).
const LIMIT: Duration = Duration::from_secs(120);

/// Copies `count` example images (trousers) into `dir`, named `0.png`, `1.png`, ...
fn images(dir: &Path, count: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("examples/trouser"))
        .expect("examples/trouser")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    examples.sort();
    examples
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, example)| {
            let path = dir.join(format!("{i}.png"));
            std::fs::copy(example, &path).expect("copy example");
            path
        })
        .collect()
}

/// Runs `client-app classify <folder> <extra>` and returns its output; panics if it
/// does not exit within [`LIMIT`].
fn classify(folder: &Path, extra: &[&str]) -> (Output, String) {
    let folder = folder.to_string_lossy();
    let mut args = vec!["classify", folder.as_ref()];
    args.extend_from_slice(extra);
    let output = run_client_within(&args, &[], LIMIT)
        .unwrap_or_else(|| panic!("client-app did not exit within {LIMIT:?}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

/// Output and error output together, for assertion messages.
fn both(output: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A link to its own folder and two folders linking to each other: each image is
/// classified once and the run ends at once (it used to classify one image 41 times,
/// and with two links grow without end until the allocator gave up).
#[test]
fn symlink_loops_classify_each_image_once() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("loops");
    images(&root.join("a"), 2);
    images(&root.join("b"), 2);
    std::os::unix::fs::symlink(".", root.join("a/self")).expect("self link");
    std::os::unix::fs::symlink("../b", root.join("a/to-b")).expect("a → b");
    std::os::unix::fs::symlink("../a", root.join("b/to-a")).expect("b → a");
    let started = std::time::Instant::now();
    let (output, stdout) = classify(&root, &[]);
    let all = both(&output);
    assert_eq!(output.status.code(), Some(0), "loops lose no file: {all}");
    let summary = parse_summary(&stdout);
    assert_eq!((summary.files, summary.classified), (4, 4), "{all}");
    for name in ["a/0.png", "a/1.png", "a/to-b/0.png", "a/to-b/1.png"] {
        let lines = stdout.lines().filter(|l| l.contains(name)).count();
        assert_eq!(lines, 1, "{name} once: {all}");
    }
    assert!(stdout.contains("folders reached twice: 3"), "{all}");
    assert!(started.elapsed() < LIMIT, "took {:?}", started.elapsed());
}

/// A FIFO among the images: skipped with its reason (never opened: opening it would
/// wait for a writer), the images classified, exit status 2 (not everything was sent),
/// and the process exits after the summary.
#[test]
fn a_fifo_is_skipped_and_the_process_exits() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("with-fifo");
    images(&root, 3);
    let fifo = root.join("pipe.png");
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|status| status.success()), "mkfifo");
    let (output, stdout) = classify(&root, &[]);
    let all = both(&output);
    assert_eq!(output.status.code(), Some(2), "{all}");
    let summary = parse_summary(&stdout);
    assert_eq!(
        (summary.files, summary.classified, summary.unanswered),
        (3, 3, 0),
        "{all}"
    );
    assert!(
        stdout.contains("with-fifo/pipe.png: not a regular file (a FIFO); not opened"),
        "{all}"
    );
}

/// Whether `folder` can be listed by a program run as [`without_root_powers`] runs it;
/// `None` if such a program cannot run at all (root, and `setpriv` cannot drop the
/// capabilities here).
fn listable(folder: &Path) -> Option<bool> {
    let quiet = |mut command: Command| {
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if !quiet(without_root_powers(Command::new("true"))) {
        return None;
    }
    let mut ls = Command::new("ls");
    ls.arg(folder);
    Some(quiet(without_root_powers(ls)))
}

/// Whether this process runs as root (the superuser reads every folder).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// `command`, run without the powers that let root read any folder when the tests run
/// as root (`setpriv` drops `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH`); as it is
/// otherwise.
fn without_root_powers(command: Command) -> Command {
    if !running_as_root() {
        return command;
    }
    let mut wrapped = Command::new("setpriv");
    let caps = "-dac_override,-dac_read_search";
    wrapped
        .args(["--inh-caps", caps, "--bounding-set", caps, "--"])
        .arg(command.get_program())
        .args(command.get_args());
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// A subfolder the client may not read: reported by name with the reason, every other
/// image classified, exit status 2 (the README's status for files not classified).
/// Root reads every folder, so as root the client runs without those powers; where
/// that is not possible the test says so and checks nothing (the walk's own test,
/// `an_unreadable_folder_is_reported_and_the_walk_goes_on`, covers it with a listing
/// that fails).
#[test]
fn an_unreadable_subfolder_is_reported_and_the_rest_classified() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("with-locked");
    images(&root.join("a"), 2);
    images(&root.join("locked"), 2);
    images(&root.join("z"), 2);
    let locked = root.join("locked");
    let mode = |bits| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(bits)).expect("chmod");
    };
    mode(0o000);
    if listable(&locked) != Some(false) {
        mode(0o755);
        eprintln!(
            "SKIPPED: a folder with mode 000 is still readable here (running as root, and \
             `setpriv` could not drop CAP_DAC_OVERRIDE); the client-app unit test \
             `an_unreadable_folder_is_reported_and_the_walk_goes_on` covers the walk"
        );
        return;
    }
    let mut client = Command::new(binary("client-app"));
    client
        .args(["classify", &root.to_string_lossy()])
        .current_dir(workspace_root());
    let mut command = without_root_powers(client);
    command
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    let output = command.output().expect("client-app runs");
    mode(0o755);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = both(&output);
    assert_eq!(output.status.code(), Some(2), "{all}");
    let summary = parse_summary(&stdout);
    assert_eq!((summary.files, summary.classified), (4, 4), "{all}");
    assert!(
        stdout.contains("with-locked/locked: cannot list the folder"),
        "{all}"
    );
}

/// A file name with a newline and a terminal escape sequence: every line printed shows
/// it escaped (no forged line, no control character reaches the terminal), and the
/// results file keeps the real name.
#[test]
fn names_with_newlines_and_escapes_are_printed_escaped() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("names");
    let image = images(&root, 1).remove(0);
    let evil = "a\nFORGED LINE \u{1b}[31mred\u{1b}[0m.png";
    std::fs::rename(&image, root.join(evil)).expect("rename");
    let results = work.path().join("results.jsonl");
    let (output, stdout) = classify(&root, &["--output", &results.to_string_lossy()]);
    let all = both(&output);
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(
        !stdout.contains('\u{1b}') && !stdout.lines().any(|l| l.starts_with("FORGED")),
        "{all}"
    );
    assert!(
        stdout.contains("names/a\\nFORGED LINE \\u{1b}[31mred\\u{1b}[0m.png  →  "),
        "{all}"
    );
    let text = std::fs::read_to_string(&results).expect("results file");
    let row: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a row")).expect("JSON");
    assert_eq!(row["file"], format!("names/{evil}"));
}
