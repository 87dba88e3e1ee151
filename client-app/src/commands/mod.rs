//! One function per `client-app` subcommand, so `main.rs` only parses and dispatches:
//!
//! - [`classify()`]: classify files and folders (`client-app classify`);
//! - [`bench()`]: end-to-end speed through the broker (`client-app bench`);
//! - [`dead_letters()`]: list and re-publish dead letters (`client-app dead-letters`).
//!
//! Each takes the [`Common`] flags and its own arguments and returns the process's exit
//! status, so it can be called (and tested) like any other library function.

mod bench;
mod classify;
mod dead_letters;

use std::path::PathBuf;

use classifier_app::AppConfig;
use serde::Serialize;

pub use bench::{bench, BenchArgs};
pub use classify::{
    classify, ClassifyArgs, ClientFlags, EXIT_NOT_SORTED, EXIT_SOME_FAILED, EXIT_UNANSWERED,
};
pub use dead_letters::{dead_letters, DeadLettersArgs};

/// The flags every subcommand takes: where the config comes from and which broker.
// The fields' docs are clap's --help text, written for a terminal: `[broker]` is a
// TOML table there, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Default, clap::Args)]
pub struct Common {
    /// Config file (TOML with [broker], [server], [client] tables).
    #[arg(long, global = true, env = "CLASSIFIER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Broker backend: embedded (default), kafka, pubsub or redis.
    #[arg(long, global = true)]
    pub broker: Option<String>,
}

impl Common {
    /// The config file (or defaults) with the environment and `--broker` applied.
    pub fn config(&self) -> anyhow::Result<AppConfig> {
        let mut config = AppConfig::load(self.config.as_deref())?;
        config.apply_broker_flag(self.broker.as_deref())?;
        Ok(config)
    }
}

/// The flags of `classify` and `bench` that set `[server]` settings (the servers' topic,
/// and the model of the in-process server), serialized under the field names of the
/// config file (see [`AppConfig::apply_server_flags`]).
#[derive(Debug, Default, clap::Args, Serialize)]
pub struct ServerFlags {
    /// Request topic (must match the servers').
    #[arg(long)]
    pub request_topic: Option<String>,
    /// Model directory for the in-process server (embedded broker, or `bench` without
    /// `--external-server`).
    #[arg(long)]
    #[serde(rename = "model_dir")]
    pub model: Option<PathBuf>,
}

/// A path as printed: control characters escaped (see [`crate::report::printable`]).
fn shown(path: &std::path::Path) -> String {
    crate::report::printable(&path.to_string_lossy()).into_owned()
}
