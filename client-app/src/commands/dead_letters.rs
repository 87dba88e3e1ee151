//! `client-app dead-letters`: list what the servers dead-lettered, re-publish chosen
//! letters to where they came from after a fix.

use std::process::ExitCode;

use classifier_app::{cancel_on_signals, connect_with_retry};
use tokio_util::sync::CancellationToken;

use super::Common;
use crate::dead_letters::{self, DeadLetter, DeadLetterInbox, InboxOptions};
use crate::report;

/// What `client-app dead-letters` does.
#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    /// Stop reading after this many seconds without a new letter (a Kafka group's
    /// first join takes a few seconds).
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
    /// Read at most this many letters.
    #[arg(long, default_value_t = 1000)]
    pub max: usize,
    /// Only letters with this error code (e.g. IMAGE_TOO_LARGE).
    #[arg(long)]
    pub code: Option<String>,
    /// Re-publish the letters with these request ids (repeatable).
    #[arg(long = "republish", value_name = "REQUEST_ID")]
    pub republish: Vec<String>,
    /// Re-publish every letter listed (after --code filtering).
    #[arg(long, conflicts_with = "republish")]
    pub republish_all: bool,
    /// Re-publish to this topic instead of each letter's source topic.
    #[arg(long)]
    pub to_topic: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `client-app dead-letters`: list the dead-letter topic, re-publish chosen letters.
pub async fn dead_letters(common: &Common, args: &DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let config = common.config()?;
    anyhow::ensure!(
        !config.broker.in_process_only(),
        "the {} broker lives inside one process, so no other process can read its dead \
         letters; choose a broker with --broker or --config (the library's \
         client_app::dead_letters reads them in-process)",
        config.broker.backend()
    );
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let broker = connect_with_retry(&config.broker, &shutdown).await?;
    let options = InboxOptions {
        topic: config.server.dead_letter_topic.clone(),
        group: config.server.dead_letter_subscription.clone(),
        idle: std::time::Duration::from_secs(args.wait),
        max_letters: args.max,
    };
    let mut inbox = DeadLetterInbox::open(std::sync::Arc::clone(&broker), &options).await?;
    let listed: Vec<_> = inbox.letters().iter().filter(|l| args.wanted(l)).collect();
    print_letters(args, &listed, &options.topic);
    let outcome = republish(args, &mut inbox).await;
    inbox.close().await?;
    if let Err(error) = broker.close().await {
        tracing::debug!(%error, "closing the broker client failed");
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
}

impl DeadLettersArgs {
    /// Whether `--code` lets this letter through.
    fn wanted(&self, letter: &DeadLetter) -> bool {
        self.code
            .as_deref()
            .is_none_or(|code| letter.code.eq_ignore_ascii_case(code))
    }
}

/// Prints the letters (text or JSON lines), a count, and the `--republish` ids that
/// match none of them.
fn print_letters(args: &DeadLettersArgs, listed: &[&DeadLetter], topic: &str) {
    for letter in listed {
        if args.json {
            println!("{}", dead_letters::letter_json(letter));
        } else {
            // Ids, reasons and topics are a peer's: escaped.
            println!("{}", report::printable(&dead_letters::letter_line(letter)));
        }
    }
    if !args.json {
        let filtered = if args.code.is_some() {
            " with that code"
        } else {
            ""
        };
        println!("{} dead letter(s) on {topic}{filtered}", listed.len());
    }
    for id in &args.republish {
        if !listed.iter().any(|letter| &letter.request_id == id) {
            eprintln!(
                "no dead letter with request id {} was read; nothing re-published for it",
                report::printable(id)
            );
        }
    }
}

/// Re-publishes the letters `--republish`/`--republish-all` choose, if any.
async fn republish(args: &DeadLettersArgs, inbox: &mut DeadLetterInbox) -> anyhow::Result<()> {
    if !args.republish_all && args.republish.is_empty() {
        return Ok(());
    }
    let chosen = |letter: &DeadLetter| {
        args.wanted(letter) && (args.republish_all || args.republish.contains(&letter.request_id))
    };
    let count = inbox.republish(chosen, args.to_topic.as_deref()).await?;
    eprintln!("re-published {count} letter(s)");
    Ok(())
}
