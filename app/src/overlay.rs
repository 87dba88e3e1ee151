//! One way to override config settings, for flags and environment variables alike:
//! the config section is turned into a TOML table, the overriding values are laid over
//! it by field name, and the result is read back through the section's own
//! `Deserialize` (so its types, defaults and `deny_unknown_fields` check every value).

use std::fmt;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One setting of the config file, by section and field (`server.model_poll_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// `server` or `client`.
    pub section: &'static str,
    /// The field's name in that section.
    pub field: &'static str,
}

impl Setting {
    /// A field of `[server]`.
    pub const fn server(field: &'static str) -> Self {
        Setting {
            section: "server",
            field,
        }
    }

    /// A field of `[client]`.
    pub const fn client(field: &'static str) -> Self {
        Setting {
            section: "client",
            field,
        }
    }

    /// `section` with this setting set from `text`: a number where the setting holds a
    /// number now, `true`/`false` where it holds a flag, else the text (paths, names,
    /// addresses, which the section's `Deserialize` then parses).
    pub fn parse_into<T: Serialize + DeserializeOwned>(
        &self,
        section: &T,
        text: &str,
    ) -> anyhow::Result<T> {
        let current = toml::Table::try_from(section).context("the config cannot be written")?;
        let value = match current.get(self.field) {
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
        let mut overlay = toml::Table::new();
        overlay.insert(self.field.to_string(), value);
        overlaid(section, &overlay)
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.section, self.field)
    }
}

/// `base` with the fields `overlay` sets replaced: `overlay` serializes to a table whose
/// keys are `base`'s field names (fields it leaves out, or sets to `None`, keep `base`'s
/// value). A key that is no field of `base` is an error naming it.
pub fn overlaid<T: Serialize + DeserializeOwned>(
    base: &T,
    overlay: &impl Serialize,
) -> anyhow::Result<T> {
    let mut table = toml::Table::try_from(base).context("the config cannot be written")?;
    let overlay = toml::Table::try_from(overlay).context("the overrides cannot be written")?;
    table.extend(overlay);
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
        let count = Setting::server("count").parse_into(&base, " 7 ");
        assert_eq!(count.expect("number").count, 7);
        let on = Setting::server("on").parse_into(&base, "true");
        assert!(on.expect("flag").on);
        let path = Setting::server("path").parse_into(&base, "a/b");
        assert_eq!(path.expect("text").path.as_deref(), Some("a/b"));
        let name = Setting::server("name").parse_into(&base, "12");
        assert_eq!(name.expect("text").name, "12");
        let error = Setting::server("count")
            .parse_into(&base, "many")
            .expect_err("not a number");
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
