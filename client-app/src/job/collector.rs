//! What a job learns: replies matched to requests, the client's own failures, the
//! replies that do not count, and at the end the [`JobReport`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use classifier_proto::{ClassifyResponse, Outcome, ProstMessage};
use unified_broker::Delivery;

use super::pending::{Pending, Unanswered};
use super::{ClassScore, FileOutcome, FileResult, JobReport, Progress};
use crate::failure::FailureCode;
use crate::inputs::InputFile;

/// Rejected replies logged at most: a peer's flood of forged replies is counted, not
/// written line by line to the log.
const REJECTED_LOGGED: u64 = 5;

/// Longest part of a peer's request id that is logged.
const LOGGED_ID_CHARS: usize = 64;

/// Whose a reply is.
enum Verdict {
    /// The first reply to a request of this job.
    Answer(Unanswered),
    /// Another reply to a request of this job that was already answered.
    Duplicate,
    /// Not a reply to a request of this job, and why not.
    Rejected(&'static str),
}

/// Collects a job's results: the first reply to each request, the failures of files
/// never sent, and the counts of replies that do not count (duplicates, and rejected
/// ones: unknown request ids, other jobs', not replies at all). Knows which requests are
/// unanswered through the [`Pending`] registry it shares with the sender.
pub(super) struct Collector {
    /// The job's id: its replies carry it.
    job_id: String,
    /// The job's files, in input order.
    files: Vec<InputFile>,
    /// Requests published and not yet answered.
    pending: Pending,
    /// One entry per file, once its result is known.
    results: Vec<Option<FileResult>>,
    /// Files whose result is known.
    finished: usize,
    /// Request ids answered.
    answered: HashSet<String>,
    /// Replies per answering server.
    answered_by: HashMap<String, u64>,
    /// Replies to requests already answered.
    duplicates: u64,
    /// Replies that were not this job's.
    rejected: u64,
}

impl Collector {
    /// A collector for job `job_id` sending `files`, its requests registered in
    /// `pending`.
    pub fn new(job_id: String, files: Vec<InputFile>, pending: Pending) -> Self {
        Collector {
            job_id,
            results: vec![None; files.len()],
            files,
            pending,
            finished: 0,
            answered: HashSet::new(),
            answered_by: HashMap::new(),
            duplicates: 0,
            rejected: 0,
        }
    }

    /// The registry of unanswered requests.
    pub fn pending(&self) -> &Pending {
        &self.pending
    }

    /// Whether every file has its result.
    pub fn is_complete(&self) -> bool {
        self.finished == self.files.len()
    }

    /// Files without a result yet.
    pub fn open(&self) -> usize {
        self.files.len() - self.finished
    }

    /// Takes one delivery from the reply topic: acks it, and records it if it answers a
    /// request of this job. Returns the size of the request it answered, if it did (a
    /// window slot and those bytes are then free again).
    pub fn receive(&mut self, delivery: Delivery, progress: &dyn Progress) -> Option<usize> {
        let response = ClassifyResponse::decode(delivery.message().payload.as_ref());
        if let Err(error) = delivery.ack() {
            tracing::warn!(%error, "acking a reply failed");
        }
        match response {
            Ok(response) => self.take(response, progress),
            Err(_) => {
                self.reject("it is not a ClassifyResponse", "");
                None
            }
        }
    }

    /// Takes one decoded reply: the first answer to a request of this job is recorded,
    /// a later one counted as a duplicate, anything else counted as rejected. Returns
    /// the size of the request it answered, if it was an answer.
    pub fn take(&mut self, response: ClassifyResponse, progress: &dyn Progress) -> Option<usize> {
        match self.judge(&response) {
            Verdict::Answer(Unanswered {
                index,
                sent_at,
                message,
            }) => {
                self.answer(index, response, sent_at.elapsed(), progress);
                Some(message.size())
            }
            Verdict::Duplicate => {
                self.duplicates += 1;
                None
            }
            Verdict::Rejected(why) => {
                self.reject(why, &response.request_id);
                None
            }
        }
    }

    /// Decides whose `response` is. A reply is this job's only if it carries the job's
    /// id and a request id the job sent (ids are random: a peer cannot guess one).
    /// Anyone who can write to the reply topic can send replies; this keeps theirs out
    /// of the results. An answer is taken out of the pending requests.
    fn judge(&self, response: &ClassifyResponse) -> Verdict {
        if response.job_id != self.job_id {
            return Verdict::Rejected("it carries another job's id");
        }
        if let Some(unanswered) = self.pending.take(&response.request_id) {
            return Verdict::Answer(unanswered);
        }
        if self.answered.contains(&response.request_id) {
            Verdict::Duplicate
        } else {
            Verdict::Rejected("this job sent no request with its id")
        }
    }

    /// Records the answer to file `index`.
    fn answer(
        &mut self,
        index: usize,
        response: ClassifyResponse,
        latency: Duration,
        progress: &dyn Progress,
    ) {
        // A server's id is copied once, not once per reply.
        match self.answered_by.get_mut(&response.server_id) {
            Some(count) => *count += 1,
            None => drop(self.answered_by.insert(response.server_id.clone(), 1)),
        }
        self.answered.insert(response.request_id.clone());
        let result = file_result(&self.files[index], response, latency);
        self.record(index, result, progress);
    }

    /// Records the client's own error for file `index` (never sent).
    pub fn local_failure(
        &mut self,
        index: usize,
        code: FailureCode,
        reason: String,
        progress: &dyn Progress,
    ) {
        let result = FileResult {
            input: self.files[index].clone(),
            request_id: String::new(),
            outcome: FileOutcome::Failed { code, reason },
            server_id: String::new(),
            latency: None,
        };
        self.record(index, result, progress);
    }

    fn record(&mut self, index: usize, result: FileResult, progress: &dyn Progress) {
        progress.file_done(&result);
        self.results[index] = Some(result);
        self.finished += 1;
    }

    /// Counts a reply that is not this job's; the first few are logged (escaped and
    /// cut: the id is a peer's).
    fn reject(&mut self, why: &str, request_id: &str) {
        self.rejected += 1;
        if self.rejected > REJECTED_LOGGED {
            return;
        }
        let shown: String = request_id.chars().take(LOGGED_ID_CHARS).collect();
        tracing::warn!(
            request_id = %crate::report::printable(&shown),
            "rejected a reply that is not this job's: {why}"
        );
        if self.rejected == REJECTED_LOGGED {
            tracing::warn!("further rejected replies are counted in the summary, not logged");
        }
    }

    /// The report: files without a result are unanswered (with the id they were sent
    /// with, if any).
    pub fn into_report(self, elapsed: Duration) -> JobReport {
        let mut sent_as = self.pending.ids_by_index();
        let results = self
            .results
            .into_iter()
            .zip(self.files)
            .enumerate()
            .map(|(index, (result, input))| {
                result.unwrap_or_else(|| FileResult {
                    input,
                    request_id: sent_as.remove(&index).unwrap_or_default(),
                    outcome: FileOutcome::Unanswered,
                    server_id: String::new(),
                    latency: None,
                })
            })
            .collect();
        JobReport {
            job_id: self.job_id,
            results,
            duplicate_replies: self.duplicates,
            rejected_replies: self.rejected,
            elapsed,
            answered_by: self.answered_by,
        }
    }
}

/// The result a server's reply gives `input`.
fn file_result(input: &InputFile, response: ClassifyResponse, latency: Duration) -> FileResult {
    let outcome = match response.outcome {
        Some(Outcome::Predictions(predictions)) => FileOutcome::Classified {
            top_k: predictions
                .top_k
                .into_iter()
                .map(|p| ClassScore {
                    class_name: p.class_name,
                    class_index: p.class_index,
                    probability: p.probability,
                })
                .collect(),
            model: predictions.model_name,
            model_version: predictions.model_version,
        },
        Some(Outcome::Error(error)) => FileOutcome::Failed {
            code: FailureCode::from_server(error.code),
            reason: error.reason,
        },
        None => FileOutcome::Failed {
            code: FailureCode::MalformedResponse,
            reason: "the server's reply carried neither predictions nor an error".into(),
        },
    };
    FileResult {
        input: input.clone(),
        request_id: response.request_id,
        outcome,
        server_id: response.server_id,
        latency: Some(latency),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use classifier_proto::{
        ClassifyError, ClassifyResponse, ErrorCode, Outcome, Prediction, Predictions, ProstMessage,
    };
    use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
    use unified_broker::{Broker, Message, SubscribeOptions};

    use super::{Collector, Verdict};
    use crate::failure::FailureCode;
    use crate::inputs::InputFile;
    use crate::job::pending::{Pending, Unanswered};
    use crate::job::{FileOutcome, FileResult, Progress};

    /// A collector for job `job` with `count` files, file `i` sent as request `r<i>` at
    /// `sent_at`.
    fn collector(count: usize, sent_at: Instant) -> Collector {
        let pending = Pending::default();
        pending.register((0..count).map(|index| {
            let message = Message::new(Vec::new());
            let unanswered = Unanswered {
                index,
                sent_at,
                message,
            };
            (format!("r{index}"), unanswered)
        }));
        let files = (0..count)
            .map(|index| InputFile {
                path: PathBuf::from(format!("{index}.png")),
                display_name: format!("{index}.png"),
                folder: None,
                relative: PathBuf::from(format!("{index}.png")),
            })
            .collect();
        Collector::new("job".into(), files, pending)
    }

    /// A reply classifying request `request_id` of job `job_id` as a coat, from `server`.
    fn coat(request_id: &str, job_id: &str, server: &str) -> ClassifyResponse {
        ClassifyResponse {
            request_id: request_id.into(),
            job_id: job_id.into(),
            server_id: server.into(),
            outcome: Some(Outcome::Predictions(Predictions {
                top_k: vec![Prediction {
                    class_name: "Coat".into(),
                    class_index: 4,
                    probability: 0.9,
                }],
                model_name: "m".into(),
                model_version: "1".into(),
            })),
            ..Default::default()
        }
    }

    /// The request ids of the results reported to it, in order.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);

    impl Progress for Recorded {
        fn file_done(&self, result: &FileResult) {
            let mut done = classifier_app::lock(&self.0);
            done.push(result.request_id.clone());
        }
    }

    impl Recorded {
        fn ids(&self) -> Vec<String> {
            classifier_app::lock(&self.0).clone()
        }
    }

    /// A reply is the job's only with its job id and a request id it sent; one with the
    /// job's id for a request already answered is a duplicate.
    #[test]
    fn replies_are_judged_by_job_id_and_request_id() {
        let mut collector = collector(2, Instant::now());
        assert!(collector
            .take(coat("r0", "job", "s"), &Recorded::default())
            .is_some());
        let verdict = |response| collector.judge(&response);
        assert!(matches!(
            verdict(coat("r1", "other", "s")),
            Verdict::Rejected(_)
        ));
        assert!(matches!(verdict(coat("r1", "", "s")), Verdict::Rejected(_)));
        assert!(matches!(
            verdict(coat("guess", "job", "s")),
            Verdict::Rejected(_)
        ));
        assert!(matches!(
            verdict(coat("r0", "job", "s")),
            Verdict::Duplicate
        ));
        assert!(matches!(
            verdict(coat("r1", "job", "s")),
            Verdict::Answer(Unanswered { index: 1, .. })
        ));
        assert!(collector.pending.is_empty(), "answered: no longer pending");
    }

    /// Further replies to an answered request (from any server) are counted as
    /// duplicates: the first one is the result, reported once, counted once per server.
    #[test]
    fn a_request_answered_twice_is_one_result_and_one_duplicate_per_extra_reply() {
        let progress = Recorded::default();
        let mut collector = collector(2, Instant::now());
        assert!(collector.take(coat("r0", "job", "s1"), &progress).is_some());
        assert!(collector.take(coat("r0", "job", "s2"), &progress).is_none());
        assert!(collector.take(coat("r0", "job", "s1"), &progress).is_none());
        assert_eq!((collector.open(), collector.is_complete()), (1, false));
        assert_eq!(progress.ids(), ["r0"]);

        let report = collector.into_report(Duration::ZERO);
        assert_eq!(report.duplicate_replies, 2);
        assert_eq!(report.rejected_replies, 0);
        assert_eq!(report.answered_by, [("s1".to_string(), 1)].into());
        assert_eq!(report.results[0].server_id, "s1");
        assert!(matches!(
            report.results[0].outcome,
            FileOutcome::Classified { .. }
        ));
        // The other file is unanswered, with the id it was sent with.
        assert_eq!(report.results[1].outcome, FileOutcome::Unanswered);
        assert_eq!(report.results[1].request_id, "r1");
    }

    /// Replies with a request id the job never sent, or with another job's id, are
    /// counted as rejected and change nothing: the request they name stays unanswered,
    /// and its real answer still counts.
    #[test]
    fn replies_with_unknown_ids_are_counted_and_ignored() {
        let progress = Recorded::default();
        let mut collector = collector(1, Instant::now());
        for forged in [
            coat("r7", "job", "forger"),
            coat(&"0".repeat(32), "job", "forger"),
            coat("r0", "another-job", "forger"),
            coat("r0", "", "forger"),
        ] {
            assert!(collector.take(forged, &progress).is_none());
        }
        assert!(progress.ids().is_empty());
        assert_eq!(collector.pending.ids_by_index(), [(0, "r0".into())].into());
        assert!(collector
            .take(coat("r0", "job", "server"), &progress)
            .is_some());
        assert!(collector.is_complete());

        let report = collector.into_report(Duration::ZERO);
        assert_eq!((report.rejected_replies, report.duplicate_replies), (4, 0));
        assert_eq!(report.results[0].server_id, "server");
        assert_eq!(report.answered_by, [("server".to_string(), 1)].into());
    }

    /// A reply that comes late (to the first copy of a request that was sent again) is
    /// the answer, its latency counted from the first send; the reply to the second
    /// copy is then a duplicate.
    #[test]
    fn a_late_reply_answers_and_its_latency_counts_from_the_first_send() {
        let first_sent = Instant::now()
            .checked_sub(Duration::from_secs(5))
            .expect("the clock has run for 5 s");
        let mut collector = collector(1, first_sent);
        let progress = Recorded::default();
        assert!(collector
            .take(coat("r0", "job", "first-copy"), &progress)
            .is_some());
        assert!(collector
            .take(coat("r0", "job", "second-copy"), &progress)
            .is_none());
        let report = collector.into_report(Duration::ZERO);
        let result = &report.results[0];
        assert_eq!(result.server_id, "first-copy");
        let latency = result.latency.expect("a reply has a latency");
        assert!(latency >= Duration::from_secs(5), "{latency:?}");
        assert_eq!(report.duplicate_replies, 1);
    }

    /// Error replies keep the server's code (or `ERROR_<n>` for a number this build does
    /// not know); a reply with neither predictions nor an error is `MALFORMED_RESPONSE`;
    /// a file the client did not send has its own code and no request id.
    #[test]
    fn failures_carry_their_codes() {
        let error = |request_id: &str, code: i32| ClassifyResponse {
            request_id: request_id.into(),
            job_id: "job".into(),
            outcome: Some(Outcome::Error(ClassifyError {
                code,
                reason: "why".into(),
            })),
            ..Default::default()
        };
        let progress = Recorded::default();
        let mut collector = collector(4, Instant::now());
        assert!(collector
            .take(error("r0", ErrorCode::CorruptImage as i32), &progress)
            .is_some());
        assert!(collector.take(error("r1", 42), &progress).is_some());
        let empty = ClassifyResponse {
            outcome: None,
            ..error("r2", 0)
        };
        assert!(collector.take(empty, &progress).is_some());
        let reason = "too big".to_string();
        collector.local_failure(3, FailureCode::FileTooLarge, reason, &progress);
        assert!(collector.is_complete());

        let report = collector.into_report(Duration::ZERO);
        let codes: Vec<_> = report
            .results
            .iter()
            .map(|result| match &result.outcome {
                FileOutcome::Failed { code, .. } => code.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            [
                "CORRUPT_IMAGE",
                "ERROR_42",
                "MALFORMED_RESPONSE",
                "FILE_TOO_LARGE"
            ]
        );
        let not_sent = &report.results[3];
        assert_eq!((not_sent.request_id.as_str(), not_sent.latency), ("", None));
    }

    /// Deliveries from the embedded broker: each is acked (none comes back), answers,
    /// duplicates, unknown ids and bytes that are no reply at all are told apart.
    #[tokio::test]
    async fn deliveries_are_acked_and_sorted_out() {
        let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
        broker
            .ensure_topic_and_subscription("replies", "client")
            .await
            .expect("topic");
        let mut replies = broker
            .subscribe("replies", "client", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let messages = vec![
            Message::new(coat("r0", "job", "s").encode_to_vec()),
            Message::new(coat("r0", "job", "s").encode_to_vec()),
            Message::new(coat("unknown", "job", "s").encode_to_vec()),
            Message::new(vec![0xff, 0xff, 0x0f]),
            Message::new(coat("r1", "job", "s").encode_to_vec()),
        ];
        let count = messages.len();
        broker
            .publish_batch("replies", messages)
            .await
            .expect("publish");
        let progress = Recorded::default();
        let mut collector = collector(2, Instant::now());
        let mut answers = Vec::new();
        for _ in 0..count {
            let next = tokio::time::timeout(Duration::from_secs(10), replies.next()).await;
            let delivery = next.expect("in time").expect("open").expect("delivery");
            answers.push(collector.receive(delivery, &progress).is_some());
        }
        assert_eq!(answers, [true, false, false, false, true]);
        assert!(collector.is_complete());
        let again = tokio::time::timeout(Duration::from_millis(200), replies.next()).await;
        assert!(again.is_err(), "every delivery was acked: none comes back");
        let report = collector.into_report(Duration::ZERO);
        assert_eq!((report.duplicate_replies, report.rejected_replies), (1, 2));
    }
}
