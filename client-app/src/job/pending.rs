//! The requests a job published and has no answer for yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use unified_broker::Message;

/// A request published and not yet answered.
pub(super) struct Unanswered {
    /// Index of its file.
    pub index: usize,
    /// When it was first sent (a re-send keeps it: latency counts from the first).
    pub sent_at: Instant,
    /// The message, kept to send it again if the broker loses it.
    pub message: Message,
}

/// Requests published and not yet answered, by request id. Shared by the sender, which
/// registers a request before publishing it (so a reply can never arrive for a request
/// the collector does not know yet), the collector, which takes a request out when its
/// answer comes, and the re-sends, which publish what is still in here.
#[derive(Clone, Default)]
pub(super) struct Pending(Arc<Mutex<HashMap<String, Unanswered>>>);

impl Pending {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Unanswered>> {
        classifier_app::lock(&self.0)
    }

    /// Registers requests about to be published, as (request id, request).
    pub fn register(&self, requests: impl IntoIterator<Item = (String, Unanswered)>) {
        self.lock().extend(requests);
    }

    /// Takes out the request `request_id` (answered now, or given up), if it is still
    /// unanswered.
    pub fn take(&self, request_id: &str) -> Option<Unanswered> {
        self.lock().remove(request_id)
    }

    /// A copy of the message of request `request_id`, if it is still unanswered.
    pub fn message(&self, request_id: &str) -> Option<Message> {
        self.lock()
            .get(request_id)
            .map(|unanswered| unanswered.message.clone())
    }

    /// Copies of the messages of every unanswered request, to send them again.
    pub fn messages(&self) -> Vec<Message> {
        self.lock()
            .values()
            .map(|unanswered| unanswered.message.clone())
            .collect()
    }

    /// Whether every request published was answered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The request id each unanswered file was sent with, by file index.
    pub fn ids_by_index(&self) -> HashMap<usize, String> {
        self.lock()
            .iter()
            .map(|(id, unanswered)| (unanswered.index, id.clone()))
            .collect()
    }
}
