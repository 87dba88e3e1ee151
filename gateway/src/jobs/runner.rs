//! Runs jobs: sends each pending file of a job through the [`Dispatcher`] and stores
//! each answer, until none is pending. The database is the only state: a gateway killed
//! mid-job and started again resumes every running job from its pending rows (their
//! files wait in the spool), and a file answered twice is stored once
//! ([`JobStore::record`]). Files without an answer within the request timeout (no
//! server up, a broker outage) stay pending and are sent again after a pause, for as
//! long as the job runs: a job waits for servers as a queue does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use classifier_app::lock;
use classifier_proto::{ClassifyResponse, ErrorCode, Outcome};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{DispatchError, Dispatcher, ImageRequest};
use crate::jobs::spool::Spool;
use crate::jobs::store::{state, Answer, JobStore};

/// Files sent to the servers in one dispatch.
const GROUP: usize = 16;

/// Predictions stored per file.
const TOP_K: u32 = 3;

/// Pause before a pass over what is still pending, first and longest.
const RETRY_PAUSE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Runs the jobs of one gateway.
pub struct JobRunner {
    store: JobStore,
    spool: Spool,
    dispatcher: Arc<Dispatcher>,
    /// Files of one job waiting for replies at once.
    window: usize,
    /// How long one group waits for its replies.
    timeout: Duration,
    /// The running jobs' cancel tokens.
    running: Mutex<HashMap<String, CancellationToken>>,
    stop: CancellationToken,
}

impl JobRunner {
    /// A runner over `store` and `spool`, stopping every job when `stop` is cancelled.
    pub fn new(
        store: JobStore,
        spool: Spool,
        dispatcher: Arc<Dispatcher>,
        (window, timeout): (usize, Duration),
        stop: CancellationToken,
    ) -> Arc<JobRunner> {
        Arc::new(JobRunner {
            store,
            spool,
            dispatcher,
            window: window.max(GROUP),
            timeout,
            running: Mutex::new(HashMap::new()),
            stop,
        })
    }

    /// The jobs database.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// The spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Starts every job the database says is running (after a restart), and removes
    /// spooled files of uploads that never became jobs (cut off mid-upload by a crash).
    pub async fn resume_all(self: &Arc<Self>) -> anyhow::Result<usize> {
        let known: std::collections::HashSet<String> =
            self.store.job_ids().await?.into_iter().collect();
        for orphan in self.spool.job_dirs().await? {
            if !known.contains(&orphan) {
                tracing::info!(
                    upload = orphan,
                    "removing the files of an upload that never became a job"
                );
                self.spool.remove_job(&orphan).await;
            }
        }
        let jobs = self.store.running_jobs().await?;
        for job in &jobs {
            tracing::info!(job, "resuming a job");
            self.start(job.clone());
        }
        Ok(jobs.len())
    }

    /// Starts running `job` (already stored, its files spooled).
    pub fn start(self: &Arc<Self>, job: String) {
        let cancel = self.stop.child_token();
        lock(&self.running).insert(job.clone(), cancel.clone());
        tokio::spawn(Arc::clone(self).run(job, cancel));
    }

    /// Stops sending `job`'s files (its state is set by the caller).
    pub fn cancel(&self, job: &str) {
        if let Some(cancel) = lock(&self.running).remove(job) {
            cancel.cancel();
        }
    }

    async fn run(self: Arc<Self>, job: String, cancel: CancellationToken) {
        let mut pause = RETRY_PAUSE.0;
        loop {
            match self.pass(&job, &cancel).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => tracing::warn!(job, "running a job: {error:#}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cancel.cancelled() => break,
            }
            pause = (pause * 2).min(RETRY_PAUSE.1);
        }
        lock(&self.running).remove(&job);
    }

    /// One pass over the pending files; whether the job is finished (or cancelled).
    async fn pass(self: &Arc<Self>, job: &str, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let Some(summary) = self.store.job(job).await? else {
            return Ok(true);
        };
        if summary.state != state::RUNNING {
            return Ok(true);
        }
        let pending = self.store.pending(job).await?;
        if pending.is_empty() {
            self.store.set_state(job, state::DONE).await?;
            return Ok(true);
        }
        let room = Arc::new(Semaphore::new(self.window / GROUP));
        let mut groups = JoinSet::new();
        for group in pending.chunks(GROUP) {
            let permit = tokio::select! {
                permit = Arc::clone(&room).acquire_owned() => permit?,
                _ = cancel.cancelled() => break,
            };
            let runner = Arc::clone(self);
            let (job, model) = (job.to_string(), summary.model.clone());
            let indexes: Vec<i64> = group.iter().map(|(index, _)| *index).collect();
            groups.spawn(async move {
                let outcome = runner.send_group(&job, &model, &indexes).await;
                drop(permit);
                outcome
            });
        }
        while let Some(outcome) = groups.join_next().await {
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(job, "a group stays pending: {error:#}"),
                Err(error) => tracing::warn!(job, %error, "a group's task failed"),
            }
        }
        Ok(cancel.is_cancelled())
    }

    /// Sends one group of files and stores their answers; an error leaves them pending.
    async fn send_group(&self, job: &str, model: &str, indexes: &[i64]) -> anyhow::Result<()> {
        let mut images = Vec::with_capacity(indexes.len());
        let mut sent = Vec::with_capacity(indexes.len());
        for &index in indexes {
            match self.spool.read(job, index).await {
                Ok(image) => {
                    images.push(ImageRequest {
                        image,
                        model_name: model.to_string(),
                        top_k: TOP_K,
                        trace: None,
                    });
                    sent.push(index);
                }
                Err(error) => {
                    let answer = Answer::Error {
                        code: "UNREADABLE_FILE".to_string(),
                        reason: format!("the spooled file is gone: {error}"),
                    };
                    self.store.record(job, index, &answer, "").await?;
                }
            }
        }
        let deadline = Instant::now() + self.timeout;
        let replies = loop {
            match self.dispatcher.classify(images.clone(), deadline).await {
                // A file the broker cannot carry is answered, and the rest sent again.
                Err(DispatchError::TooLarge { index, size, limit }) if index < images.len() => {
                    images.remove(index);
                    let answer = Answer::Error {
                        code: ErrorCode::MessageTooLarge.as_str_name().to_string(),
                        reason: format!(
                            "its request would be {size} bytes; the broker takes {limit}"
                        ),
                    };
                    self.store
                        .record(job, sent.remove(index), &answer, "")
                        .await?;
                }
                outcome => break outcome?,
            }
        };
        let answers: Vec<(i64, Answer, String)> = sent
            .into_iter()
            .zip(replies)
            .map(|(index, reply)| {
                let server = reply.server_id.clone();
                (index, answer_of(reply), server)
            })
            .collect();
        // One transaction per group: one commit, not one per file.
        self.store.record_many(job, &answers).await?;
        Ok(())
    }
}

/// A reply as stored.
fn answer_of(reply: ClassifyResponse) -> Answer {
    match reply.outcome {
        Some(Outcome::Predictions(predictions)) => {
            let top_k = predictions
                .top_k
                .iter()
                .map(|p| format!("{}:{:.6}", p.class_name, p.probability))
                .collect::<Vec<_>>()
                .join(";");
            match predictions.top_k.first() {
                Some(best) => Answer::Classified {
                    class: best.class_name.clone(),
                    probability: f64::from(best.probability),
                    top_k,
                },
                None => Answer::Error {
                    code: ErrorCode::Internal.as_str_name().to_string(),
                    reason: "the reply holds no prediction".to_string(),
                },
            }
        }
        Some(Outcome::Error(error)) => Answer::Error {
            code: ErrorCode::try_from(error.code)
                .unwrap_or(ErrorCode::Unspecified)
                .as_str_name()
                .to_string(),
            reason: error.reason,
        },
        None => Answer::Error {
            code: ErrorCode::Unspecified.as_str_name().to_string(),
            reason: "the reply holds no outcome".to_string(),
        },
    }
}
