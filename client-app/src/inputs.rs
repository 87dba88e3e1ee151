//! Finding the files to classify.

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

/// Walks the given files and folders recursively, in a stable (sorted) order. Hidden
/// files and folders (starting with `.`) are skipped; every other file is included,
/// image or not, so that the user hears about everything in the folder.
pub fn collect_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for root in paths {
        let metadata =
            std::fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
        if metadata.is_dir() {
            walk(root, root, &mut files)?;
        } else {
            let base = root.parent().unwrap_or(Path::new(""));
            files.push(input_file(root, base, base));
        }
    }
    Ok(files)
}

fn walk(dir: &Path, root: &Path, files: &mut Vec<InputFile>) -> anyhow::Result<()> {
    // The entry's type comes with the listing on most file systems: no `stat` per
    // file. A symbolic link (or a type the listing does not give) is looked up.
    let mut entries: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let path = entry.path();
            let is_dir = match entry.file_type() {
                Ok(kind) if !kind.is_symlink() => kind.is_dir(),
                _ => path.is_dir(),
            };
            Some((path, is_dir))
        })
        .filter(|(path, _)| {
            !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    entries.sort();
    for (path, is_dir) in entries {
        if is_dir {
            walk(&path, root, files)?;
        } else {
            files.push(input_file(
                &path,
                root.parent().unwrap_or(Path::new("")),
                root,
            ));
        }
    }
    Ok(())
}

/// `path` shown relative to `base`, and kept relative to `root` (the folder argument,
/// or the file argument's parent).
fn input_file(path: &Path, base: &Path, root: &Path) -> InputFile {
    let shown = path.strip_prefix(base).unwrap_or(path);
    let relative = match path.strip_prefix(root) {
        Ok(below) if !below.as_os_str().is_empty() => below.to_path_buf(),
        _ => path.file_name().map(PathBuf::from).unwrap_or_default(),
    };
    InputFile {
        relative,
        path: path.to_path_buf(),
        display_name: shown.to_string_lossy().into_owned(),
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
}
