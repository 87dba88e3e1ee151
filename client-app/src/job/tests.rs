//! [`run_job`] on the embedded broker against a fake server: a task that reads the
//! requests as the servers' group and publishes replies made by hand, so a test can
//! answer twice, with ids the job never sent, late, or not at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use classifier_proto::{
    ClassifyError, ClassifyRequest, ClassifyResponse, ErrorCode, Outcome, Prediction, Predictions,
    ProstMessage,
};
use tokio::sync::mpsc;
use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
use unified_broker::{Broker, Message, SubscribeOptions, Subscriber};

use super::{run_job, FileOutcome, FileResult, JobOptions, JobReport, Progress};
use crate::failure::FailureCode;

/// The job's options: everything sent at once (window 16), a long timeout unless said.
fn options(reply_timeout: Duration) -> JobOptions {
    JobOptions {
        request_topic: "requests".into(),
        server_group: "servers".into(),
        window: 16,
        max_in_flight_bytes: 1 << 20,
        reply_timeout,
        max_file_bytes: 1 << 20,
        max_request_bytes: None,
        resize_to: None,
        top_k: 1,
        model_name: String::new(),
    }
}

/// Tells the test the request id of each file as its result is known.
struct Results(mpsc::UnboundedSender<String>);

impl Progress for Results {
    fn file_done(&self, result: &FileResult) {
        let _ = self.0.send(result.request_id.clone());
    }
}

/// A job over `count` small files (their bytes do not matter: the fake server does not
/// look at them) running on its own task; its results' request ids come on the channel.
struct Job {
    task: tokio::task::JoinHandle<anyhow::Result<JobReport>>,
    done: mpsc::UnboundedReceiver<String>,
    _files: tempfile::TempDir,
}

impl Job {
    fn start(broker: &EmbeddedBroker, count: usize, options: JobOptions) -> Job {
        let dir = tempfile::tempdir().expect("tempdir");
        for index in 0..count {
            let path = dir.path().join(format!("{index}.png"));
            std::fs::write(path, [index as u8; 16]).expect("write");
        }
        let files = crate::inputs::collect_inputs(&[dir.path().to_path_buf()]).expect("inputs");
        assert_eq!(files.len(), count);
        let broker: Arc<dyn Broker> = Arc::new(broker.new_client());
        let (done_tx, done) = mpsc::unbounded_channel();
        let task =
            tokio::spawn(async move { run_job(broker, files, &options, &Results(done_tx)).await });
        Job {
            task,
            done,
            _files: dir,
        }
    }

    /// The request id of the next file whose result is known (within 30 s).
    async fn next_done(&mut self) -> String {
        let next = tokio::time::timeout(Duration::from_secs(30), self.done.recv()).await;
        next.expect("a result within 30 s").expect("the job runs")
    }

    /// The job's report (within 30 s).
    async fn report(self) -> JobReport {
        let report = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        report
            .expect("the job ends")
            .expect("job task")
            .expect("job")
    }
}

/// Stands in for the servers: a member of their group on the request topic that hands
/// the requests to the test, and publishes what the test answers.
struct FakeServer {
    broker: Arc<dyn Broker>,
    requests: Box<dyn Subscriber>,
}

impl FakeServer {
    /// Joins the servers' group (created first, so nothing the job sends is missed).
    async fn start(broker: &EmbeddedBroker, options: &JobOptions) -> FakeServer {
        let broker: Arc<dyn Broker> = Arc::new(broker.new_client());
        let (topic, group) = (&options.request_topic, &options.server_group);
        broker
            .ensure_topic_and_subscription(topic, group)
            .await
            .expect("request topic");
        let requests = broker
            .subscribe(topic, group, SubscribeOptions::default())
            .await
            .expect("subscribe");
        FakeServer { broker, requests }
    }

    /// The next request within `wait`, acked, with its payload; `None` if none came.
    async fn next_request(&mut self, wait: Duration) -> Option<(ClassifyRequest, Vec<u8>)> {
        let delivery = tokio::time::timeout(wait, self.requests.next())
            .await
            .ok()?;
        let delivery = delivery.expect("subscribed").expect("a delivery");
        let payload = delivery.message().payload.to_vec();
        delivery.ack().expect("ack");
        let request = ClassifyRequest::decode(payload.as_slice()).expect("a ClassifyRequest");
        Some((request, payload))
    }

    /// The next `count` requests with their payloads (within 30 s each).
    async fn requests_with_payloads(&mut self, count: usize) -> Vec<(ClassifyRequest, Vec<u8>)> {
        let mut requests = Vec::new();
        while requests.len() < count {
            let next = self.next_request(Duration::from_secs(30)).await;
            requests.push(next.expect("a request within 30 s"));
        }
        requests
    }

    /// The next `count` requests (within 30 s each).
    async fn requests(&mut self, count: usize) -> Vec<ClassifyRequest> {
        let requests = self.requests_with_payloads(count).await;
        requests.into_iter().map(|(request, _)| request).collect()
    }

    /// Publishes `replies`, in this order, to the job's reply topic.
    async fn reply(&self, reply_topic: &str, replies: Vec<Message>) {
        self.broker
            .publish_batch(reply_topic, replies)
            .await
            .expect("publish replies");
    }
}

/// A fake server and a job of `count` files, on an embedded broker of their own.
async fn fake_server_and_job(count: usize, reply_timeout: Duration) -> (FakeServer, Job) {
    let broker = EmbeddedBroker::new(EmbeddedConfig::default());
    let options = options(reply_timeout);
    let server = FakeServer::start(&broker, &options).await;
    let job = Job::start(&broker, count, options);
    (server, job)
}

/// A reply classifying `request` as a coat, from `server`.
fn coat(request: &ClassifyRequest, server: &str) -> Message {
    let outcome = Outcome::Predictions(Predictions {
        top_k: vec![Prediction {
            class_name: "Coat".into(),
            class_index: 4,
            probability: 0.75,
        }],
        model_name: "fake".into(),
        model_version: "1".into(),
    });
    reply(request, server, outcome)
}

/// A reply to `request` from `server` with `outcome`, carrying the request's ids.
fn reply(request: &ClassifyRequest, server: &str, outcome: Outcome) -> Message {
    let response = ClassifyResponse {
        request_id: request.request_id.clone(),
        job_id: request.job_id.clone(),
        server_id: server.into(),
        outcome: Some(outcome),
        ..Default::default()
    };
    Message::new(response.encode_to_vec())
}

/// `request` with other ids, to forge replies with.
fn with_ids(request: &ClassifyRequest, request_id: &str, job_id: &str) -> ClassifyRequest {
    ClassifyRequest {
        request_id: request_id.into(),
        job_id: job_id.into(),
        ..request.clone()
    }
}

/// Through the whole job: replies on the reply topic that answer twice, name request
/// ids the job never sent, carry another job's id or are no reply at all are counted
/// and never become results; each file gets the first answer to its request, error
/// codes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_job_keeps_one_answer_per_request_and_counts_the_rest() {
    let (mut server, job) = fake_server_and_job(4, Duration::from_secs(30)).await;
    let requests = server.requests(4).await;
    let job_id = requests[0].job_id.clone();
    let reply_topic = format!("classify-replies-{job_id}");
    let names: Vec<&str> = requests.iter().map(|r| r.file_name.as_str()).collect();
    assert!(names.iter().all(|name| name.ends_with(".png")), "{names:?}");
    assert!(requests
        .iter()
        .all(|r| r.job_id == job_id && r.reply_topic == reply_topic));
    let (a, b, c, d) = (&requests[0], &requests[1], &requests[2], &requests[3]);
    let error = |code: i32| {
        Outcome::Error(ClassifyError {
            code,
            reason: "by hand".into(),
        })
    };
    // Every reply in one batch, in this order; the last one completes the job.
    server
        .reply(
            &reply_topic,
            vec![
                coat(&with_ids(a, &"0".repeat(32), &job_id), "forger"),
                coat(&with_ids(a, &a.request_id, "another-job"), "forger"),
                Message::new(vec![0xff, 0xff, 0x0f]),
                coat(a, "s1"),
                coat(a, "s2"),
                reply(b, "s1", error(ErrorCode::CorruptImage as i32)),
                coat(b, "s2"),
                reply(c, "s1", error(42)),
                coat(a, "s1"),
                coat(d, "s2"),
            ],
        )
        .await;

    let report = job.report().await;
    assert_eq!(report.job_id, job_id);
    assert_eq!(report.duplicate_replies, 3, "{report:?}");
    assert_eq!(report.rejected_replies, 3, "{report:?}");
    assert_eq!(
        report.answered_by,
        [("s1".to_string(), 3), ("s2".to_string(), 1)].into()
    );
    let by_id = |request: &ClassifyRequest| {
        let found = report
            .results
            .iter()
            .find(|result| result.request_id == request.request_id);
        found.expect("a result per request")
    };
    let first = by_id(a);
    assert_eq!(first.server_id, "s1");
    assert!(
        matches!(&first.outcome, FileOutcome::Classified { top_k, model, .. }
            if top_k[0].class_name == "Coat" && model == "fake"),
        "{first:?}"
    );
    let failed = |request| match &by_id(request).outcome {
        FileOutcome::Failed { code, reason } => (code.clone(), reason.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        failed(b),
        (
            FailureCode::Server(ErrorCode::CorruptImage),
            "by hand".into()
        )
    );
    assert_eq!(failed(c).0, FailureCode::Other("ERROR_42".into()));
    assert_eq!(by_id(d).server_id, "s2");
    // Results are in input order, one per file.
    let files: Vec<&str> = report
        .results
        .iter()
        .map(|r| r.input.display_name.as_str())
        .collect();
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!(files.len(), 4);
    assert_eq!(files, sorted);
}

/// After the reply subscription had to be re-created (what a broker that lost its state
/// looks like to the job), the requests still unanswered are sent again, the same but
/// for a deadline renewed (the job waits a full timeout for them again), and only
/// those. A reply to the first copy that comes after the re-send is the answer
/// (its latency counted from the first send); the reply to the second copy is a
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_are_sent_again_and_late_replies_still_count() {
    let (mut server, mut job) = fake_server_and_job(3, Duration::from_secs(30)).await;
    let first = server.requests_with_payloads(3).await;
    let first_seen = Instant::now();
    let (a, b, c) = (&first[0].0, &first[1].0, &first[2].0);
    let reply_topic = a.reply_topic.clone();
    server.reply(&reply_topic, vec![coat(a, "s1")]).await;
    assert_eq!(job.next_done().await, a.request_id);

    // The broker forgets the reply topic: the job's subscription ends and is re-created.
    server
        .broker
        .delete_topic(&reply_topic)
        .await
        .expect("delete the reply topic");
    let mut again = server.requests_with_payloads(2).await;
    again.sort_by_key(|(request, _)| request.file_name.clone());
    assert_eq!(again[0].0.request_id, b.request_id);
    assert_eq!(again[1].0.request_id, c.request_id);
    for (resent, original) in again.iter().zip(&first[1..]) {
        let (resent, original) = (&resent.0, &original.0);
        assert!(
            resent.deadline_unix_micros > original.deadline_unix_micros,
            "the deadline is renewed"
        );
        let without_deadline = |request: &ClassifyRequest| ClassifyRequest {
            deadline_unix_micros: 0,
            ..request.clone()
        };
        assert_eq!(
            without_deadline(resent),
            without_deadline(original),
            "the same request as the first copy"
        );
    }

    let waited = first_seen.elapsed();
    server
        .reply(
            &reply_topic,
            vec![
                coat(b, "first-copy"),
                coat(&again[0].0, "second-copy"),
                coat(a, "s1"),
                coat(c, "s1"),
            ],
        )
        .await;
    let report = job.report().await;
    let no_more = server.next_request(Duration::from_millis(300)).await;
    assert!(
        no_more.is_none(),
        "only the unanswered requests were sent again"
    );

    assert_eq!(report.duplicate_replies, 2, "{report:?}");
    assert_eq!(report.rejected_replies, 0);
    let servers: Vec<&str> = report
        .results
        .iter()
        .map(|r| r.server_id.as_str())
        .collect();
    assert_eq!(servers, ["s1", "first-copy", "s1"]);
    let late = report.results[1].latency.expect("answered");
    assert!(late >= waited, "{late:?} counted from the first send");
    assert!(report
        .results
        .iter()
        .all(|r| matches!(r.outcome, FileOutcome::Classified { .. })));
}

/// Requests nobody answers are reported unanswered once the replies stop for the
/// timeout, each with the request id it was sent with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_are_reported_with_their_ids_after_the_timeout() {
    let (mut server, job) = fake_server_and_job(2, Duration::from_millis(300)).await;
    let requests = server.requests(2).await;
    let mut sent: Vec<String> = requests.into_iter().map(|r| r.request_id).collect();
    let report = job.report().await;
    assert!(report
        .results
        .iter()
        .all(|r| r.outcome == FileOutcome::Unanswered && r.latency.is_none()));
    let mut reported: Vec<String> = report.results.into_iter().map(|r| r.request_id).collect();
    sent.sort();
    reported.sort();
    assert_eq!(reported, sent);
}

/// The byte budget bounds what is in flight as the window does: with room for two
/// requests' bytes (each takes at least one KiB), a window of 16 still sends two at a
/// time, the next only once an answer gave its bytes back; every file is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_holds_back_requests_until_answers_free_their_bytes() {
    let broker = EmbeddedBroker::new(EmbeddedConfig::default());
    let options = JobOptions {
        max_in_flight_bytes: 2 * 1024,
        ..options(Duration::from_secs(30))
    };
    let mut server = FakeServer::start(&broker, &options).await;
    let job = Job::start(&broker, 5, options);
    let mut in_flight = server.requests(2).await;
    let mut answered = 0;
    while answered < 5 {
        let more = server.next_request(Duration::from_millis(300)).await;
        assert!(more.is_none(), "a third request while two hold the budget");
        let request = in_flight.remove(0);
        let reply_topic = request.reply_topic.clone();
        server.reply(&reply_topic, vec![coat(&request, "s")]).await;
        answered += 1;
        if answered + in_flight.len() < 5 {
            in_flight.extend(server.requests(1).await);
        }
    }
    let report = job.report().await;
    assert_eq!(report.results.len(), 5);
    assert!(report
        .results
        .iter()
        .all(|r| matches!(r.outcome, FileOutcome::Classified { .. })));
}
