//! ARCHITECTURE.md names every part of the repository a newcomer meets: each workspace
//! crate (its folder and its package name), each top-level folder, each file in
//! `scripts/` (with `scripts/lib/`), and each test file (`tests/tests/*.rs` and every
//! other crate's `tests/*.rs`). Something new that the page does not name fails here,
//! with the list of what is missing, so the map cannot quietly fall behind the tree.
//!
//! The files are those git tracks or would track (not ignored); outside a git checkout,
//! those below the root less `.git/` and what the root `.gitignore` names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn architecture_md_names_every_crate_folder_script_and_test_file() {
    let root = workspace_root();
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
        .expect("reading ARCHITECTURE.md at the workspace root");
    let files = repository_files(&root);

    let mut missing = Vec::new();
    let mut check = |kind: &str, name: String| {
        if !names(&doc, &name) {
            missing.push(format!("{kind} `{name}`"));
        }
    };
    let members = workspace_members(&root);
    for member in &members {
        check("crate folder", format!("{member}/"));
        check("crate", package_name(&root, member));
    }
    for folder in top_level_folders(&files) {
        if !members.contains(&folder) {
            check("top-level folder", format!("{folder}/"));
        }
    }
    for file in files.iter().filter(|f| f.starts_with("scripts/")) {
        check("script", file.clone());
    }
    for member in &members {
        let prefix = format!("{member}/tests/");
        for file in &files {
            if let Some(name) = file.strip_prefix(&prefix) {
                if name.ends_with(".rs") && !name.contains('/') {
                    check("test file", file.clone());
                }
            }
        }
    }

    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name {} thing(s); add a line for each where it belongs \
         (the crates' code map, \"Other top-level folders\", the scripts list, \"Tests\"):\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}

#[test]
fn a_name_inside_a_longer_one_does_not_count() {
    assert!(names("the `app/` crate", "app/"));
    assert!(!names("the `client-app/` crate", "app/"));
    assert!(names("see scripts/test.sh.", "scripts/test.sh"));
    assert!(!names("see scripts/test.sh.bak", "scripts/test.sh"));
    assert!(!names("see scripts/test.shell", "scripts/test.sh"));
    assert!(!names("`classifier-app-extra`", "classifier-app"));
    assert!(names("`classifier-app` and", "classifier-app"));
}

/// Whether `doc` holds `name` as a whole name: not preceded by a character of a path or
/// name (so `app/` is not found in `client-app/`), and, unless `name` is a folder
/// (ends in `/`), not followed by one (so `test.sh` is not found in `test.sh.bak`; a
/// full stop that ends a sentence is fine).
fn names(doc: &str, name: &str) -> bool {
    let part_of_name = |c: char| c.is_ascii_alphanumeric() || "_-./".contains(c);
    doc.match_indices(name).any(|(at, _)| {
        let before_ok = doc[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !part_of_name(c));
        let mut after = doc[at + name.len()..].chars();
        let after_ok = name.ends_with('/')
            || match after.next() {
                None => true,
                Some('.') => !after.next().is_some_and(|c| c.is_ascii_alphanumeric()),
                Some(c) => !(c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            };
        before_ok && after_ok
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_path_buf()
}

/// The `members` of the root `Cargo.toml`'s `[workspace]`.
fn workspace_members(root: &Path) -> Vec<String> {
    let manifest = read_toml(&root.join("Cargo.toml"));
    manifest["workspace"]["members"]
        .as_array()
        .expect("[workspace] members is an array")
        .iter()
        .map(|member| {
            member
                .as_str()
                .expect("a workspace member is a path")
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

/// The package name in a member's `Cargo.toml`.
fn package_name(root: &Path, member: &str) -> String {
    let manifest = read_toml(&root.join(member).join("Cargo.toml"));
    manifest["package"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{member}/Cargo.toml has a [package] name"))
        .to_string()
}

fn read_toml(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    text.parse()
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

/// The first path component of every file below a folder.
fn top_level_folders(files: &[String]) -> BTreeSet<String> {
    files
        .iter()
        .filter_map(|file| file.split_once('/').map(|(folder, _)| folder.to_string()))
        .collect()
}

/// The repository's files, relative to `root` with `/` separators: what git tracks plus
/// what it would track (untracked, not ignored; an untracked folder as `folder/`).
/// Outside a git checkout, every file below `root` except `.git/` and what the root
/// `.gitignore` names.
fn repository_files(root: &Path) -> Vec<String> {
    let git = Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
            "--directory",
        ])
        .output();
    match git {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .split('\0')
            .filter(|file| !file.is_empty())
            .map(str::to_string)
            .collect(),
        _ => {
            let ignored = root_gitignore(root);
            let mut files = Vec::new();
            walk(root, "", &ignored, &mut files);
            files
        }
    }
}

/// The root `.gitignore`'s entries, as the fallback reads them: a path from the root
/// (`/target`, `/fuzz/target`), a name anywhere (`node_modules`) or a suffix (`*.profraw`).
fn root_gitignore(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join(".gitignore"))
        .unwrap_or_default()
        .lines()
        .map(|line| line.trim().trim_end_matches('/').to_string())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

fn is_ignored(relative: &str, ignored: &[String]) -> bool {
    let name = relative.rsplit('/').next().unwrap_or(relative);
    relative == ".git"
        || ignored.iter().any(|pattern| {
            if let Some(anchored) = pattern.strip_prefix('/') {
                relative == anchored
            } else if let Some(suffix) = pattern.strip_prefix('*') {
                name.ends_with(suffix)
            } else {
                name == pattern
            }
        })
}

fn walk(root: &Path, relative: &str, ignored: &[String], files: &mut Vec<String>) {
    let dir = root.join(relative);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("listing {}: {error}", dir.display()));
    for entry in entries {
        let entry = entry.expect("reading a folder entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if relative.is_empty() {
            name
        } else {
            format!("{relative}/{name}")
        };
        if is_ignored(&path, ignored) {
            continue;
        }
        if entry.file_type().expect("reading a file type").is_dir() {
            walk(root, &path, ignored, files);
        } else {
            files.push(path);
        }
    }
}
