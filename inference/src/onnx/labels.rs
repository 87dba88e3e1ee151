//! Class names of an ONNX model: `labels.txt` (one per line), or a `metadata_props`
//! entry of the model in one of the shapes exporters write, or `class N`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};

use super::config::LABEL_KEYS;

/// Where the class names came from, for the model's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LabelSource {
    /// `labels.txt`.
    File,
    /// The `metadata_props` entry of this key.
    Metadata(String),
    /// None given: `class 0`, `class 1`, …
    Numbered,
}

/// The class names for a model of `classes` outputs: from `labels_file` if it exists,
/// else from `props` under `key` (or the first of [`LABEL_KEYS`] present), else
/// numbered. A count that does not match `classes` is an error naming both numbers.
pub(crate) fn class_names(
    labels_file: &Path,
    props: &HashMap<String, String>,
    key: Option<&str>,
    classes: usize,
) -> anyhow::Result<(Vec<String>, LabelSource)> {
    if let Some(text) = read_optional(labels_file)? {
        let names = parse_lines(&text).with_context(|| labels_file.display().to_string())?;
        check_count(names.len(), classes, &labels_file.display().to_string())?;
        return Ok((names, LabelSource::File));
    }
    let found = match key {
        Some(key) => Some(props.get(key).map(|v| (key, v)).with_context(|| {
            format!("model.toml names labels_key = {key:?}, but the model has no such metadata_props entry (it has: {})", keys_of(props))
        })?),
        None => LABEL_KEYS
            .iter()
            .find_map(|k| props.get(*k).map(|v| (*k, v))),
    };
    if let Some((key, value)) = found {
        let origin = format!("the model's metadata_props entry {key:?}");
        let names = parse_value(value).with_context(|| origin.clone())?;
        check_count(names.len(), classes, &origin)?;
        return Ok((names, LabelSource::Metadata(key.to_string())));
    }
    let names = (0..classes).map(|i| format!("class {i}")).collect();
    Ok((names, LabelSource::Numbered))
}

fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn keys_of(props: &HashMap<String, String>) -> String {
    let mut keys: Vec<&str> = props.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys.is_empty() {
        "none".to_string()
    } else {
        keys.join(", ")
    }
}

fn check_count(found: usize, classes: usize, origin: &str) -> anyhow::Result<()> {
    if found != classes {
        bail!("{origin} has {found} class names but the model outputs {classes} classes");
    }
    Ok(())
}

/// One name per line (surrounding spaces and a `\r` trimmed); trailing empty lines are
/// ignored, an empty line among the names is an error (it would shift every class after
/// it).
fn parse_lines(text: &str) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    while names.last().is_some_and(String::is_empty) {
        names.pop();
    }
    if let Some(i) = names.iter().position(String::is_empty) {
        bail!(
            "line {} is empty (one class name per line, in output order)",
            i + 1
        );
    }
    Ok(names)
}

/// A metadata value: a JSON list of names, a JSON object from index to name
/// (Hugging Face `id2label`), a Python dict literal of index to quoted name
/// (Ultralytics `names`), else names separated by newlines, else by commas.
fn parse_value(value: &str) -> anyhow::Result<Vec<String>> {
    let trimmed = value.trim();
    if let Ok(list) = serde_json::from_str::<Vec<String>>(trimmed) {
        return Ok(list);
    }
    if let Ok(map) = serde_json::from_str::<HashMap<String, String>>(trimmed) {
        return indexed(map.into_iter());
    }
    if trimmed.starts_with('{') && trimmed.ends_with('}') {
        return indexed(python_dict(trimmed)?.into_iter());
    }
    if trimmed.contains('\n') {
        return parse_lines(trimmed);
    }
    Ok(trimmed.split(',').map(|s| s.trim().to_string()).collect())
}

/// Names keyed by their index, in index order; the indices must be 0..n.
fn indexed(entries: impl Iterator<Item = (String, String)>) -> anyhow::Result<Vec<String>> {
    let mut pairs: Vec<(usize, String)> = entries
        .map(|(k, v)| {
            let index = k
                .trim()
                .parse::<usize>()
                .with_context(|| format!("key {k:?} is not a class index"))?;
            Ok((index, v))
        })
        .collect::<anyhow::Result<_>>()?;
    pairs.sort_by_key(|(i, _)| *i);
    if pairs.iter().enumerate().any(|(i, (index, _))| i != *index) {
        bail!(
            "class indices must be 0 to {} without gaps",
            pairs.len().saturating_sub(1)
        );
    }
    Ok(pairs.into_iter().map(|(_, name)| name).collect())
}

/// `{0: 'person', 1: "bicycle"}` → index/name pairs (names without quotes inside).
fn python_dict(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let inner = &text[1..text.len() - 1];
    let mut pairs = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once(':').context("expected `index: 'name'`")?;
        let after = after.trim_start();
        let quote = after
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
            .context("expected a quoted name")?;
        let body = &after[1..];
        let end = body.find(quote).context("unterminated name")?;
        pairs.push((key.trim().to_string(), body[..end].to_string()));
        rest = body[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_values_in_the_shapes_exporters_write() {
        for value in [
            r#"["cat", "dog", "fish"]"#,
            r#"{"0": "cat", "2": "fish", "1": "dog"}"#,
            "{0: 'cat', 1: 'dog', 2: \"fish\"}",
            "cat\ndog\nfish\n",
            "cat, dog,fish",
        ] {
            assert_eq!(
                parse_value(value).expect(value),
                ["cat", "dog", "fish"],
                "{value}"
            );
        }
        assert!(parse_value(r#"{"0": "cat", "2": "dog"}"#).is_err(), "gap");
    }

    #[test]
    fn labels_file_wins_and_counts_must_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("labels.txt");
        let meta = props(&[("labels", r#"["a", "b"]"#), ("classes", "x,y,z")]);
        let (names, source) = class_names(&file, &meta, None, 2).expect("from metadata");
        assert_eq!(
            (names, source),
            (
                vec!["a".into(), "b".into()],
                LabelSource::Metadata("labels".into())
            )
        );
        let (names, _) = class_names(&file, &meta, Some("classes"), 3).expect("chosen key");
        assert_eq!(names, ["x", "y", "z"]);
        let error = class_names(&file, &meta, Some("nope"), 3).expect_err("missing key");
        assert!(
            format!("{error:#}").contains("classes, labels"),
            "{error:#}"
        );
        std::fs::write(&file, "tench\r\ngoldfish\r\n\r\n").expect("write");
        let (names, source) = class_names(&file, &meta, None, 2).expect("from file");
        assert_eq!(
            (names, source),
            (vec!["tench".into(), "goldfish".into()], LabelSource::File)
        );
        let error = class_names(&file, &meta, None, 1000).expect_err("count");
        let text = format!("{error:#}");
        assert!(
            text.contains("2 class names") && text.contains("1000 classes"),
            "{text}"
        );
        std::fs::write(&file, "a\n\nb\n").expect("write");
        let error = class_names(&file, &meta, None, 3).expect_err("hole");
        assert!(
            format!("{error:#}").contains("line 2 is empty"),
            "{error:#}"
        );
        std::fs::remove_file(&file).expect("rm");
        let (names, source) = class_names(&file, &HashMap::new(), None, 2).expect("numbered");
        assert_eq!(
            (names, source),
            (
                vec!["class 0".into(), "class 1".into()],
                LabelSource::Numbered
            )
        );
    }
}
