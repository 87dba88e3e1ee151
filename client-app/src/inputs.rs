//! Finding the files to classify.
//!
//! Folders come from users and may be hostile or simply odd: the walk follows symbolic
//! links to files and folders but walks each folder once (by device and inode), so a
//! link back up the tree ends instead of looping; it sends only regular files (a FIFO,
//! socket or device is skipped without being opened: opening a FIFO blocks); and a
//! folder it cannot list is reported and the walk goes on.

use std::collections::HashSet;
use std::fs::{DirEntry, FileType, Metadata};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// One file to send, and how to show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFile {
    /// Where it is on disk.
    pub path: PathBuf,
    /// The path as shown to the user and sent as the file name: relative to the parent of
    /// the argument it was found under (`examples/coat/1.png` for the argument `examples`).
    pub display_name: String,
    /// Name of the folder that holds the file, which may be a class name.
    pub folder: Option<String>,
    /// The path below the folder argument it was found under (`coat/1.png` for the
    /// argument `examples`); just the file name for a file argument. `--sort-into`
    /// keeps it below the class folder.
    pub relative: PathBuf,
}

/// Something the walk found and did not send: the user hears about everything in the
/// folders they named, including what could not be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Where it is on disk.
    pub path: PathBuf,
    /// The path as shown to the user (as [`InputFile::display_name`]).
    pub display_name: String,
    /// Why it was not sent.
    pub reason: SkipReason,
}

/// Why the walk did not send something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a regular file (a FIFO, a socket, a device): never opened.
    NotARegularFile(&'static str),
    /// A folder that could not be listed, or an entry that could not be looked up
    /// (a link that leads nowhere, a link loop): what is in it was not sent.
    Unreadable(String),
    /// A folder already walked, reached again through a symbolic link (a link back up
    /// the tree, or a second link to the same folder): its files are sent once.
    AlreadyWalked,
}

impl SkipReason {
    /// Whether the user lost files to it (the run then ends with the exit status of
    /// errors); a folder already walked lost nothing.
    pub fn is_error(&self) -> bool {
        !matches!(self, SkipReason::AlreadyWalked)
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotARegularFile(kind) => {
                write!(f, "not a regular file ({kind}); not opened")
            }
            SkipReason::Unreadable(reason) => f.write_str(reason),
            SkipReason::AlreadyWalked => f.write_str(
                "the same folder as one already walked (symbolic links lead to it twice); \
                 its files are sent once",
            ),
        }
    }
}

/// What the walk found: the files to send, and what it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// Regular files (or links to them), in walk order.
    pub files: Vec<InputFile>,
    /// Everything else that was found and not sent, in walk order.
    pub skipped: Vec<Skipped>,
}

/// Walks the given files and folders recursively, in a stable (sorted) order. Hidden
/// files and folders (starting with `.`) are left out; every other regular file is
/// included, image or not, so that the user hears about everything in the folder, and
/// what is not sent is in [`Walk::skipped`]. A path argument that does not exist is an
/// error; anything below it that cannot be read is skipped.
pub fn walk_inputs(paths: &[PathBuf]) -> anyhow::Result<Walk> {
    walk_inputs_with(paths, &list_dir)
}

/// [`walk_inputs`] for callers that want only the files: what was skipped is logged.
pub fn collect_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<InputFile>> {
    let walk = walk_inputs(paths)?;
    for skipped in &walk.skipped {
        tracing::warn!(
            "skipped {}: {}",
            crate::report::printable(&skipped.display_name),
            crate::report::printable(&skipped.reason.to_string())
        );
    }
    Ok(walk.files)
}

/// Lists a folder: the entries, each of which may have failed. The real one is
/// [`list_dir`]; tests pass one that fails where they want (as root, no permission
/// makes a folder unreadable).
type ListDir<'a> = &'a dyn Fn(&Path) -> std::io::Result<Vec<std::io::Result<DirEntry>>>;

/// Lists `dir` on the file system.
fn list_dir(dir: &Path) -> std::io::Result<Vec<std::io::Result<DirEntry>>> {
    Ok(std::fs::read_dir(dir)?.collect())
}

/// [`walk_inputs`] with `list` for listing folders.
fn walk_inputs_with(paths: &[PathBuf], list: ListDir<'_>) -> anyhow::Result<Walk> {
    let mut walker = Walker {
        list,
        visited: HashSet::new(),
        walk: Walk::default(),
    };
    for root in paths {
        walker.root(root)?;
    }
    Ok(walker.walk)
}

/// A folder's identity: device and inode, the same whichever link led to it.
#[cfg(unix)]
type DirId = (u64, u64);
/// A folder's identity: its canonical path where there are no inodes.
#[cfg(not(unix))]
type DirId = PathBuf;

#[cfg(unix)]
fn dir_id(_path: &Path, metadata: &Metadata) -> DirId {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

#[cfg(not(unix))]
fn dir_id(path: &Path, _metadata: &Metadata) -> DirId {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// What one entry is, as far as the walk cares.
enum Found {
    /// A regular file, or a link to one: sent.
    File,
    /// A folder, or a link to one: walked unless already walked.
    Dir(DirId),
    /// Anything else: reported.
    Skip(SkipReason),
}

/// Walk state: what was found so far and which folders were walked.
struct Walker<'a> {
    list: ListDir<'a>,
    visited: HashSet<DirId>,
    walk: Walk,
}

impl Walker<'_> {
    /// Walks one path argument: a folder, a file, or something skipped.
    fn root(&mut self, root: &Path) -> anyhow::Result<()> {
        let metadata =
            std::fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
        let base = root.parent().unwrap_or(Path::new(""));
        match found_from(root, &metadata) {
            Found::Dir(id) => self.folder(root, id),
            Found::File => self.walk.files.push(input_file(root, base, base)),
            Found::Skip(reason) => self.skip(root, base, reason),
        }
        Ok(())
    }

    /// Walks the folder argument `root` depth first, each folder's entries in sorted
    /// order (a stack, not recursion: a deep tree cannot exhaust the thread's stack).
    fn folder(&mut self, root: &Path, id: DirId) {
        let base = root.parent().unwrap_or(Path::new(""));
        let mut stack = vec![(root.to_path_buf(), Found::Dir(id))];
        while let Some((path, found)) = stack.pop() {
            match found {
                Found::File => self.walk.files.push(input_file(&path, base, root)),
                Found::Skip(reason) => self.skip(&path, base, reason),
                Found::Dir(id) if !self.visited.insert(id) => {
                    self.skip(&path, base, SkipReason::AlreadyWalked)
                }
                Found::Dir(_) => {
                    let mut entries = self.entries(&path, base);
                    entries.sort_by(|a, b| b.0.cmp(&a.0));
                    stack.extend(entries);
                }
            }
        }
    }

    /// The visible entries of `dir`, unsorted; a folder that cannot be listed, or an
    /// entry that cannot be read, is reported and left out.
    fn entries(&mut self, dir: &Path, base: &Path) -> Vec<(PathBuf, Found)> {
        let listed = match (self.list)(dir) {
            Ok(listed) => listed,
            Err(error) => {
                let reason = SkipReason::Unreadable(format!("cannot list the folder: {error}"));
                self.skip(dir, base, reason);
                return Vec::new();
            }
        };
        let mut entries = Vec::with_capacity(listed.len());
        for entry in listed {
            match entry {
                Ok(entry) if is_hidden(&entry.file_name()) => {}
                Ok(entry) => entries.push((entry.path(), found(&entry))),
                Err(error) => {
                    let reason = SkipReason::Unreadable(format!(
                        "an entry of the folder cannot be read: {error}"
                    ));
                    self.skip(dir, base, reason);
                }
            }
        }
        entries
    }

    fn skip(&mut self, path: &Path, base: &Path, reason: SkipReason) {
        self.walk.skipped.push(Skipped {
            path: path.to_path_buf(),
            display_name: shown(path, base),
            reason,
        });
    }
}

/// Hidden: the name starts with a dot.
fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// What `entry` is. Its type comes with the listing on most file systems (no `stat`
/// per file); a symbolic link, a folder (for its inode) or a type the listing does not
/// give is looked up, following links.
fn found(entry: &DirEntry) -> Found {
    match entry.file_type() {
        Ok(kind) if kind.is_file() => Found::File,
        Ok(kind) if !kind.is_symlink() && !kind.is_dir() => {
            Found::Skip(SkipReason::NotARegularFile(kind_name(&kind)))
        }
        _ => {
            let path = entry.path();
            match std::fs::metadata(&path) {
                Ok(metadata) => found_from(&path, &metadata),
                Err(error) => Found::Skip(SkipReason::Unreadable(format!(
                    "cannot look it up (a link that leads nowhere?): {error}"
                ))),
            }
        }
    }
}

/// What the entry at `path` with (link-followed) `metadata` is.
fn found_from(path: &Path, metadata: &Metadata) -> Found {
    if metadata.is_file() {
        Found::File
    } else if metadata.is_dir() {
        Found::Dir(dir_id(path, metadata))
    } else {
        Found::Skip(SkipReason::NotARegularFile(kind_name(
            &metadata.file_type(),
        )))
    }
}

/// What kind of file that is not a regular file `kind` names, for the user.
pub(crate) fn kind_name(kind: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_char_device() {
            return "a character device";
        }
    }
    if kind.is_dir() {
        "a folder"
    } else {
        "an unknown kind of file"
    }
}

/// `path` as shown: relative to `base`.
fn shown(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// `path` shown relative to `base`, and kept relative to `root` (the folder argument,
/// or the file argument's parent).
fn input_file(path: &Path, base: &Path, root: &Path) -> InputFile {
    let relative = match path.strip_prefix(root) {
        Ok(below) if !below.as_os_str().is_empty() => below.to_path_buf(),
        _ => path.file_name().map(PathBuf::from).unwrap_or_default(),
    };
    InputFile {
        relative,
        path: path.to_path_buf(),
        display_name: shown(path, base),
        folder: path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
    }
}

/// MIME type from the file extension; informational only (the server sniffs the bytes).
pub fn content_type(path: &Path) -> &'static str {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        Some("webp") => "image/webp",
        Some("tif" | "tiff") => "image/tiff",
        Some("pgm" | "ppm" | "pbm" | "pnm") => "image/x-portable-anymap",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(walk: &Walk) -> Vec<&str> {
        walk.files.iter().map(|f| f.display_name.as_str()).collect()
    }

    #[test]
    fn walks_folders_recursively_in_sorted_order_skipping_hidden_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("photos");
        std::fs::create_dir_all(root.join("coat")).expect("mkdir");
        std::fs::create_dir_all(root.join(".cache")).expect("mkdir");
        std::fs::write(root.join("coat/b.png"), b"x").expect("write");
        std::fs::write(root.join("coat/a.png"), b"x").expect("write");
        std::fs::write(root.join("notes.txt"), b"x").expect("write");
        std::fs::write(root.join(".hidden"), b"x").expect("write");
        std::fs::write(root.join(".cache/c.png"), b"x").expect("write");
        let files = collect_inputs(std::slice::from_ref(&root)).expect("walks");
        let names: Vec<_> = files.iter().map(|f| f.display_name.as_str()).collect();
        assert_eq!(
            names,
            ["photos/coat/a.png", "photos/coat/b.png", "photos/notes.txt"]
        );
        assert_eq!(files[0].folder.as_deref(), Some("coat"));
        assert_eq!(files[0].relative, Path::new("coat/a.png"));
        assert_eq!(files[2].relative, Path::new("notes.txt"));
        let single = collect_inputs(&[root.join("coat/b.png")]).expect("a file");
        assert_eq!(single[0].relative, Path::new("b.png"));
    }

    #[test]
    fn missing_path_is_an_error_naming_it() {
        let error = collect_inputs(&[PathBuf::from("/no/such/folder")]).expect_err("missing");
        assert!(format!("{error:#}").contains("/no/such/folder"));
    }

    /// A link to its own folder, two folders linking to each other, and a second link
    /// to a folder: each file found once, each extra way in reported (not an error).
    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_walked_once() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("photos");
        for sub in ["a", "b", "c"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
            std::fs::write(root.join(sub).join("1.png"), b"x").expect("write");
        }
        symlink(".", root.join("a/self")).expect("self link");
        symlink("../c", root.join("b/to-c")).expect("link b → c");
        symlink("../b", root.join("c/to-b")).expect("link c → b");
        symlink("a/1.png", root.join("link.png")).expect("file link");
        let walk = walk_inputs(std::slice::from_ref(&root)).expect("walks");
        assert_eq!(
            names(&walk),
            [
                "photos/a/1.png",
                "photos/b/1.png",
                "photos/b/to-c/1.png",
                "photos/link.png"
            ]
        );
        let skipped: Vec<_> = walk
            .skipped
            .iter()
            .map(|s| (s.display_name.as_str(), &s.reason))
            .collect();
        assert_eq!(
            skipped,
            [
                ("photos/a/self", &SkipReason::AlreadyWalked),
                ("photos/b/to-c/to-b", &SkipReason::AlreadyWalked),
                ("photos/c", &SkipReason::AlreadyWalked),
            ]
        );
        assert!(walk.skipped.iter().all(|s| !s.reason.is_error()));
    }

    /// A FIFO (opening it would block), a socket and a link that leads nowhere are
    /// reported with their reasons, never opened; the images around them are sent.
    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("photos");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("a.png"), b"x").expect("write");
        std::fs::write(root.join("z.png"), b"x").expect("write");
        let fifo = root.join("pipe.png");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let _socket = std::os::unix::net::UnixListener::bind(root.join("socket.png"));
        std::os::unix::fs::symlink("nowhere.png", root.join("broken.png")).expect("link");
        let fifo_link = root.join("pipe-link.png");
        std::os::unix::fs::symlink("pipe.png", &fifo_link).expect("link");
        let walk = walk_inputs(std::slice::from_ref(&root)).expect("walks");
        assert_eq!(names(&walk), ["photos/a.png", "photos/z.png"]);
        let reasons: Vec<String> = walk
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.display_name, s.reason))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].starts_with("photos/broken.png: cannot look it up"));
        assert_eq!(
            reasons[1],
            "photos/pipe-link.png: not a regular file (a FIFO); not opened"
        );
        assert_eq!(
            reasons[2],
            "photos/pipe.png: not a regular file (a FIFO); not opened"
        );
        assert!(reasons[3].contains("a socket"), "{reasons:?}");
        assert!(walk.skipped.iter().all(|s| s.reason.is_error()));
        let single = walk_inputs(&[fifo]).expect("a FIFO argument is skipped, not an error");
        assert!(single.files.is_empty());
        assert_eq!(single.skipped.len(), 1);
    }

    /// A folder that cannot be listed is reported, and the walk goes on with the others
    /// (a listing that fails stands in for one without permission: tests run as root).
    #[test]
    fn an_unreadable_folder_is_reported_and_the_walk_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("photos");
        for sub in ["a", "locked", "z"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
            std::fs::write(root.join(sub).join("1.png"), b"x").expect("write");
        }
        let failing = |dir: &Path| {
            if dir.ends_with("locked") {
                Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            } else {
                list_dir(dir)
            }
        };
        let walk = walk_inputs_with(std::slice::from_ref(&root), &failing).expect("walks");
        assert_eq!(names(&walk), ["photos/a/1.png", "photos/z/1.png"]);
        assert_eq!(walk.skipped.len(), 1);
        let skipped = &walk.skipped[0];
        assert_eq!(skipped.display_name, "photos/locked");
        assert!(skipped.reason.is_error());
        assert!(
            skipped
                .reason
                .to_string()
                .contains("cannot list the folder"),
            "{}",
            skipped.reason
        );
    }
}
