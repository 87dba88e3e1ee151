//! One way to override config settings, for flags and environment variables alike:
//! the config section is turned into a TOML table, the overriding values are laid over
//! it by field name, and the result is read back through the section's own
//! `Deserialize` (so its types, defaults and `deny_unknown_fields` check every value).

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `section` with its `field` set from `text` (an environment variable's value): a
/// number where the field holds a number now, `true`/`false` where it holds a flag,
/// else the text (paths, names, addresses, which the section's `Deserialize` parses).
pub fn with_text<T: Serialize + DeserializeOwned>(
    section: &T,
    field: &str,
    text: &str,
) -> anyhow::Result<T> {
    let mut table = as_table(section)?;
    let value = match table.get(field) {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            text.trim()
                .parse()
                .with_context(|| format!("{text:?} is not a whole number"))?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(
            text.trim()
                .parse()
                .with_context(|| format!("{text:?} is not true or false"))?,
        ),
        _ => toml::Value::String(text.to_string()),
    };
    table.insert(field.to_string(), value);
    read_back(table)
}

/// `base` with the fields `overlay` sets replaced: `overlay` serializes to a table whose
/// keys are `base`'s field names (fields it leaves out, or sets to `None`, keep `base`'s
/// value). A key that is no field of `base` is an error naming it.
pub fn overlaid<T: Serialize + DeserializeOwned>(
    base: &T,
    overlay: &impl Serialize,
) -> anyhow::Result<T> {
    let mut table = as_table(base)?;
    table.extend(toml::Table::try_from(overlay).context("the overrides cannot be written")?);
    read_back(table)
}

/// A config section as the TOML table the file would hold.
fn as_table(section: &impl Serialize) -> anyhow::Result<toml::Table> {
    toml::Table::try_from(section).context("the config cannot be written")
}

/// The section back from its (overridden) table, through its own `Deserialize`.
fn read_back<T: DeserializeOwned>(table: toml::Table) -> anyhow::Result<T> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|error: toml::de::Error| anyhow::anyhow!("{}", error.message().trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        count: u64,
        name: String,
        on: bool,
        path: Option<String>,
    }

    #[test]
    fn text_is_typed_by_the_setting_it_sets() {
        let base = Section::default();
        let count = with_text(&base, "count", " 7 ");
        assert_eq!(count.expect("number").count, 7);
        let on = with_text(&base, "on", "true");
        assert!(on.expect("flag").on);
        let path = with_text(&base, "path", "a/b");
        assert_eq!(path.expect("text").path.as_deref(), Some("a/b"));
        let name = with_text(&base, "name", "12");
        assert_eq!(name.expect("text").name, "12");
        let error = with_text(&base, "count", "many").expect_err("not a number");
        assert!(format!("{error:#}").contains("many"), "{error:#}");
    }

    #[test]
    fn none_keeps_the_base_value() {
        #[derive(Serialize)]
        struct Flags {
            count: Option<u64>,
            name: Option<String>,
        }
        let base = Section {
            count: 3,
            name: "base".into(),
            ..Section::default()
        };
        let flags = Flags {
            count: None,
            name: Some("flag".into()),
        };
        let result = overlaid(&base, &flags).expect("overlays");
        assert_eq!(result.count, 3);
        assert_eq!(result.name, "flag");
    }
}
