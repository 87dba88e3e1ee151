//! `--sort-into OUT`: putting each answered file where the answer says.
//!
//! A classified file goes to `OUT/<class>/<relative path>`, one whose top probability is
//! below `--min-confidence` to `OUT/_uncertain/<class>/<relative path>`, a file answered
//! with an error to `OUT/_errors/<CODE>/<relative path>`; the relative path is the file's
//! path below the folder argument it was found under ([`InputFile::relative`]).
//! Unanswered files stay where they are.
//!
//! Two rules hold whatever happens:
//!
//! - **Nothing is overwritten.** A destination name is taken with `create_new` (or a hard
//!   link, which also refuses an existing name), so when `name.png` exists the file
//!   becomes `name (1).png`, `name (2).png`, …, even if another process races us.
//! - **Nothing is lost.** A copy is written, `fsync`ed and its folder `fsync`ed before
//!   anything else; a move is a hard link (same file system) or such a copy (across file
//!   systems), made durable the same way, and only then is the source removed. A crash
//!   at any point leaves the file in its old place, its new place, or both. When the
//!   source cannot be removed, the new copy is removed again and the file stays where it
//!   was.
//!
//! A file that cannot be sorted (permission denied, disk full, …) is reported as a
//! [`SortFailure`]; the others carry on.
//!
//! [`InputFile::relative`]: crate::inputs::InputFile::relative

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::job::{FileOutcome, FileResult};

/// Folder below `OUT` for files answered with an error, one subfolder per code.
pub const ERRORS_DIR: &str = "_errors";
/// Folder below `OUT` for classified files below `--min-confidence`, one subfolder per
/// class.
pub const UNCERTAIN_DIR: &str = "_uncertain";

/// Whether sorting copies files or moves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// Copy: the sources stay.
    Copy,
    /// Move: the sources are removed once their copy is durable.
    Move,
}

/// What `--sort-into`, `--move` and `--min-confidence` asked for.
#[derive(Clone, Debug)]
pub struct SortOptions {
    /// The folder to sort into (`OUT`).
    pub out: PathBuf,
    /// Copy or move.
    pub transfer: Transfer,
    /// Classified files whose top probability is below this go to `_uncertain/`.
    pub min_confidence: Option<f32>,
}

/// How many files went where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SortCounts {
    /// Into `OUT/<class>/`.
    pub by_class: usize,
    /// Into `OUT/_uncertain/<class>/`.
    pub uncertain: usize,
    /// Into `OUT/_errors/<code>/`.
    pub errors: usize,
    /// Could not be sorted (left in place; see [`Sorter::failures`]).
    pub failed: usize,
    /// Not answered, so not sorted (left in place).
    pub unanswered: usize,
}

/// A file that could not be sorted, and why. It is still where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortFailure {
    /// The file.
    pub file: PathBuf,
    /// What went wrong, naming the destination folder.
    pub reason: String,
}

/// Sorts answered files into `OUT`, counting what went where.
#[derive(Debug)]
pub struct Sorter {
    options: SortOptions,
    counts: SortCounts,
    failures: Vec<SortFailure>,
}

impl Sorter {
    /// A sorter into `options.out` (created when the first file is sorted).
    pub fn new(options: SortOptions) -> Sorter {
        Sorter {
            options,
            counts: SortCounts::default(),
            failures: Vec::new(),
        }
    }

    /// The options it sorts by.
    pub fn options(&self) -> &SortOptions {
        &self.options
    }

    /// Copies or moves the file of `result` to its folder. Returns where it went, or
    /// `Ok(None)` for an unanswered file (left in place), or the failure (also
    /// recorded) when it could not be sorted.
    pub fn sort(&mut self, result: &FileResult) -> Result<Option<PathBuf>, SortFailure> {
        let Some((kind, folder)) = target_folder(&result.outcome, self.options.min_confidence)
        else {
            self.counts.unanswered += 1;
            return Ok(None);
        };
        let relative = safe_relative(&result.input.relative, &result.input.path);
        let (Some(name), parent) = (relative.file_name(), relative.parent()) else {
            return Err(self.fail(result, "the file has no name".to_string()));
        };
        let dest_dir = self
            .options
            .out
            .join(&folder)
            .join(parent.unwrap_or(Path::new("")));
        let done =
            ensure_dir(&self.options.out, &dest_dir).and_then(|()| match self.options.transfer {
                Transfer::Copy => copy_no_overwrite(&result.input.path, &dest_dir, name),
                Transfer::Move => move_no_overwrite(&result.input.path, &dest_dir, name),
            });
        match done {
            Ok(dest) => {
                match kind {
                    Kind::Class => self.counts.by_class += 1,
                    Kind::Uncertain => self.counts.uncertain += 1,
                    Kind::Error => self.counts.errors += 1,
                }
                Ok(Some(dest))
            }
            Err(error) => {
                let verb = match self.options.transfer {
                    Transfer::Copy => "copy",
                    Transfer::Move => "move",
                };
                Err(self.fail(
                    result,
                    format!("cannot {verb} it into {}: {error}", dest_dir.display()),
                ))
            }
        }
    }

    fn fail(&mut self, result: &FileResult, reason: String) -> SortFailure {
        let failure = SortFailure {
            file: result.input.path.clone(),
            reason,
        };
        self.counts.failed += 1;
        self.failures.push(failure.clone());
        failure
    }

    /// How many files went where so far.
    pub fn counts(&self) -> SortCounts {
        self.counts
    }

    /// The files that could not be sorted, in the order they were tried.
    pub fn failures(&self) -> &[SortFailure] {
        &self.failures
    }
}

/// Which kind of folder a file goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Class,
    Uncertain,
    Error,
}

/// The folder below `OUT` for an outcome, or `None` for an unanswered file.
fn target_folder(outcome: &FileOutcome, min_confidence: Option<f32>) -> Option<(Kind, PathBuf)> {
    match outcome {
        FileOutcome::Classified { top_k, .. } => {
            let best = top_k.first();
            let class = best.map_or("unknown", |c| c.class_name.as_str());
            let folder = PathBuf::from(safe_component(class));
            let uncertain = match (best, min_confidence) {
                // NaN counts as uncertain.
                (Some(best), Some(min)) => best
                    .probability
                    .partial_cmp(&min)
                    .is_none_or(std::cmp::Ordering::is_lt),
                (None, _) => true,
                (Some(_), None) => false,
            };
            Some(if uncertain {
                (Kind::Uncertain, Path::new(UNCERTAIN_DIR).join(folder))
            } else {
                (Kind::Class, folder)
            })
        }
        FileOutcome::Failed { code, .. } => Some((
            Kind::Error,
            Path::new(ERRORS_DIR).join(safe_component(code.as_str())),
        )),
        FileOutcome::Unanswered => None,
    }
}

/// `name` as one safe path component: path separators and characters that some file
/// systems refuse become `-` (`T-shirt/top` → `T-shirt-top`); leading and trailing
/// dots and spaces are dropped; nothing left (or `.`/`..`) becomes `unnamed`.
pub fn safe_component(name: &str) -> String {
    let replaced: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '-',
            c if c.is_control() => '-',
            c => c,
        })
        .collect();
    let trimmed = replaced.trim_matches(|c: char| c == '.' || c.is_whitespace());
    if trimmed.is_empty() {
        "unnamed".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Only the plain components of `relative` (no root, `.` or `..`), so a file can never
/// be sorted outside `OUT`; the file name of `path` if nothing is left.
fn safe_relative(relative: &Path, path: &Path) -> PathBuf {
    let kept: PathBuf = relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect();
    if kept.as_os_str().is_empty() {
        path.file_name().map(PathBuf::from).unwrap_or_default()
    } else {
        kept
    }
}

/// The `n`-th candidate name for `name`: `name` itself for 0, else `stem (n).ext`
/// (`photo.png` → `photo (2).png`, `README` → `README (2)`).
pub fn numbered(name: &OsStr, n: u32) -> OsString {
    if n == 0 {
        return name.to_os_string();
    }
    let path = Path::new(name);
    let stem = path.file_stem().unwrap_or(name);
    let mut out = stem.to_os_string();
    out.push(format!(" ({n})"));
    if let Some(extension) = path.extension() {
        out.push(".");
        out.push(extension);
    }
    out
}

/// Attempts at a free name before giving up.
const MAX_NUMBERED: u32 = 100_000;

fn no_free_name(dir: &Path, name: &OsStr) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free name for {} in {} after {MAX_NUMBERED} tries",
            Path::new(name).display(),
            dir.display()
        ),
    )
}

/// Creates `dir` and the folders between `out` and it, `fsync`ing the parent of every
/// folder it creates so the new entries survive a crash.
fn ensure_dir(out: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut current = dir;
    while !current.is_dir() {
        missing.push(current.to_path_buf());
        match current.parent() {
            Some(parent) if !parent.as_os_str().is_empty() && current != out => current = parent,
            _ => break,
        }
    }
    for folder in missing.iter().rev() {
        match fs::create_dir(folder) {
            Ok(()) => {
                if let Some(parent) = folder.parent() {
                    sync_dir(parent)?;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && folder.is_dir() => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Makes the entries of `dir` durable (`fsync` on the folder). A no-op where folders
/// cannot be opened for it.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Copies `source` into `dir` as `name`, or `name (1)`, `name (2)`, … if taken: never
/// over an existing file. The copy (with the source's permissions) and the folder entry
/// are `fsync`ed before this returns the new path. A failed copy is removed again.
pub fn copy_no_overwrite(source: &Path, dir: &Path, name: &OsStr) -> io::Result<PathBuf> {
    let mut input = File::open(source)?;
    let permissions = input.metadata()?.permissions();
    for n in 0..MAX_NUMBERED {
        let candidate = dir.join(numbered(name, n));
        let mut output = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(output) => output,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error),
        };
        let written = io::copy(&mut input, &mut output)
            .and_then(|_| output.set_permissions(permissions.clone()))
            .and_then(|()| output.sync_all())
            .and_then(|()| sync_dir(dir));
        return match written {
            Ok(()) => Ok(candidate),
            Err(error) => {
                drop(output);
                let _ = fs::remove_file(&candidate);
                Err(error)
            }
        };
    }
    Err(no_free_name(dir, name))
}

/// Moves `source` into `dir` as `name`, or `name (1)`, … if taken: never over an
/// existing file, never losing it. On the same file system it hard-links the new name
/// (which, like `create_new`, refuses an existing one), `fsync`s the folder and then
/// removes the source; elsewhere (or where hard links are not supported, or for a
/// symbolic link) it copies with [`copy_no_overwrite`] and then removes the source.
/// If the source cannot be removed, the new name is removed again and the error
/// returned: the file stays where it was.
pub fn move_no_overwrite(source: &Path, dir: &Path, name: &OsStr) -> io::Result<PathBuf> {
    move_with(source, dir, name, &|path| fs::remove_file(path))
}

/// A move as copy, `fsync`, remove: works across file systems (see
/// [`move_no_overwrite`]).
pub fn move_by_copy(source: &Path, dir: &Path, name: &OsStr) -> io::Result<PathBuf> {
    move_by_copy_with(source, dir, name, &|path| fs::remove_file(path))
}

/// Removes a file: `fs::remove_file`, or a failing stand-in in tests.
type Remove<'a> = &'a dyn Fn(&Path) -> io::Result<()>;

fn move_with(source: &Path, dir: &Path, name: &OsStr, remove: Remove) -> io::Result<PathBuf> {
    if fs::symlink_metadata(source)?.file_type().is_symlink() {
        // A link to the link would keep pointing at the old place (if relative): move
        // what it points to as a copy, and remove only the link.
        return move_by_copy_with(source, dir, name, remove);
    }
    for n in 0..MAX_NUMBERED {
        let candidate = dir.join(numbered(name, n));
        match fs::hard_link(source, &candidate) {
            Ok(()) => {
                return match sync_dir(dir).and_then(|()| remove_source(source, &candidate, remove))
                {
                    Ok(()) => Ok(candidate),
                    Err(error) => {
                        // The source is still there (or the folder could not be synced):
                        // the new name goes, so the file is in one place only.
                        if source.exists() {
                            let _ = fs::remove_file(&candidate);
                        }
                        Err(error)
                    }
                };
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            // Cross-device, or a file system without hard links: copy instead.
            Err(_) => return move_by_copy_with(source, dir, name, remove),
        }
    }
    Err(no_free_name(dir, name))
}

fn move_by_copy_with(
    source: &Path,
    dir: &Path,
    name: &OsStr,
    remove: Remove,
) -> io::Result<PathBuf> {
    let copy = copy_no_overwrite(source, dir, name)?;
    match remove_source(source, &copy, remove) {
        Ok(()) => Ok(copy),
        Err(error) => {
            if source.exists() {
                let _ = fs::remove_file(&copy);
            }
            Err(error)
        }
    }
}

/// Removes `source` once its new copy `copy` is durable, and makes the removal durable.
fn remove_source(source: &Path, copy: &Path, remove: Remove) -> io::Result<()> {
    remove(source).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot remove the source after copying it to {}: {error}",
                copy.display()
            ),
        )
    })?;
    match source.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::FailureCode;
    use crate::inputs::InputFile;
    use crate::job::classified;
    use classifier_proto::ErrorCode;

    fn write(path: &Path, bytes: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, bytes).expect("write");
    }

    #[test]
    fn numbered_names_keep_the_extension() {
        let name = |s: &str, n| numbered(OsStr::new(s), n).to_string_lossy().into_owned();
        assert_eq!(name("photo.png", 0), "photo.png");
        assert_eq!(name("photo.png", 1), "photo (1).png");
        assert_eq!(name("photo.png", 12), "photo (12).png");
        assert_eq!(name("README", 2), "README (2)");
        assert_eq!(name("a.tar.gz", 1), "a.tar (1).gz");
        assert_eq!(name(".hidden", 1), ".hidden (1)");
    }

    #[test]
    fn class_names_become_safe_folder_names() {
        assert_eq!(safe_component("T-shirt/top"), "T-shirt-top");
        assert_eq!(safe_component("Ankle boot"), "Ankle boot");
        assert_eq!(safe_component(".."), "unnamed");
        assert_eq!(safe_component(" a\\b:c "), "a-b-c");
        assert_eq!(
            safe_relative(Path::new("../x/./y.png"), Path::new("/d/y.png")),
            Path::new("x/y.png")
        );
        assert_eq!(
            safe_relative(Path::new(""), Path::new("/d/y.png")),
            Path::new("y.png")
        );
    }

    #[test]
    fn copies_never_overwrite_and_number_the_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("in/a.png");
        write(&source, b"new");
        let out = dir.path().join("out");
        write(&out.join("a.png"), b"old");
        write(&out.join("a (1).png"), b"older");
        let copy = copy_no_overwrite(&source, &out, OsStr::new("a.png")).expect("copy");
        assert_eq!(copy, out.join("a (2).png"));
        assert_eq!(fs::read(&copy).expect("read"), b"new");
        assert_eq!(fs::read(out.join("a.png")).expect("read"), b"old");
        assert_eq!(fs::read(out.join("a (1).png")).expect("read"), b"older");
        assert!(source.exists(), "a copy keeps the source");
    }

    #[test]
    fn moves_never_overwrite_and_remove_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        write(&out.join("a.png"), b"old");
        for (i, how) in ["link", "copy"].iter().enumerate() {
            let source = dir.path().join(format!("in/{how}/a.png"));
            write(&source, how.as_bytes());
            let moved = if *how == "link" {
                move_no_overwrite(&source, &out, OsStr::new("a.png"))
            } else {
                // The cross-device path, taken directly.
                move_by_copy(&source, &out, OsStr::new("a.png"))
            }
            .expect("move");
            assert_eq!(moved, out.join(format!("a ({}).png", i + 1)));
            assert_eq!(fs::read(&moved).expect("read"), how.as_bytes());
            assert!(!source.exists(), "{how}: the source is gone");
        }
        assert_eq!(fs::read(out.join("a.png")).expect("read"), b"old");
    }

    #[test]
    fn a_source_that_cannot_be_removed_stays_and_leaves_no_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("in/a.png");
        write(&source, b"bytes");
        let out = dir.path().join("out");
        fs::create_dir_all(&out).expect("mkdir");
        let refuse = |_: &Path| -> io::Result<()> {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "refused"))
        };
        let by_link = move_with(&source, &out, OsStr::new("a.png"), &refuse);
        let by_copy = move_by_copy_with(&source, &out, OsStr::new("a.png"), &refuse);
        for result in [by_link, by_copy] {
            let error = result.expect_err("the source cannot be removed");
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
            assert!(
                error.to_string().contains("cannot remove the source"),
                "{error}"
            );
        }
        assert_eq!(fs::read(&source).expect("still there"), b"bytes");
        assert_eq!(fs::read_dir(&out).expect("out").count(), 0, "no copy left");
    }

    fn result(path: &Path, relative: &str, outcome: FileOutcome) -> FileResult {
        FileResult {
            input: InputFile {
                path: path.to_path_buf(),
                display_name: relative.to_string(),
                folder: None,
                relative: PathBuf::from(relative),
            },
            request_id: "r".into(),
            outcome,
            server_id: "s".into(),
            latency: None,
        }
    }

    #[test]
    fn sorter_puts_files_by_class_confidence_and_error_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in");
        let out = dir.path().join("out");
        let files = ["sub/sure.png", "unsure.png", "bad.png", "lost.png"];
        for name in files {
            write(&input.join(name), name.as_bytes());
        }
        let mut sorter = Sorter::new(SortOptions {
            out: out.clone(),
            transfer: Transfer::Copy,
            min_confidence: Some(0.5),
        });
        let outcomes = [
            classified("T-shirt/top", 0.9),
            classified("Coat", 0.2),
            FileOutcome::Failed {
                code: FailureCode::Server(ErrorCode::CorruptImage),
                reason: "truncated".into(),
            },
            FileOutcome::Unanswered,
        ];
        let mut placed = Vec::new();
        for (name, outcome) in files.iter().zip(outcomes) {
            let result = result(&input.join(name), name, outcome);
            placed.push(sorter.sort(&result).expect("sorted"));
        }
        assert_eq!(
            placed,
            [
                Some(out.join("T-shirt-top/sub/sure.png")),
                Some(out.join("_uncertain/Coat/unsure.png")),
                Some(out.join("_errors/CORRUPT_IMAGE/bad.png")),
                None,
            ]
        );
        assert_eq!(
            sorter.counts(),
            SortCounts {
                by_class: 1,
                uncertain: 1,
                errors: 1,
                failed: 0,
                unanswered: 1,
            }
        );
        assert!(input.join("sub/sure.png").exists(), "copied, not moved");

        // A file that vanished is a recorded failure, and sorting goes on.
        let gone = result(&input.join("gone.png"), "gone.png", classified("Coat", 0.9));
        let failure = sorter.sort(&gone).expect_err("nothing to copy");
        assert_eq!(failure.file, input.join("gone.png"));
        assert!(failure.reason.contains("cannot copy"), "{}", failure.reason);
        let again = result(
            &input.join("unsure.png"),
            "unsure.png",
            classified("Coat", 0.9),
        );
        assert_eq!(
            sorter.sort(&again).expect("sorted"),
            Some(out.join("Coat/unsure.png"))
        );
        assert_eq!(sorter.counts().failed, 1);
        assert_eq!(sorter.failures().len(), 1);
    }
}
