//! Jobs and their per-image results in a database: SQLite by default, PostgreSQL by
//! config, through sqlx's driver-agnostic pool with the same SQL for both (`$N`
//! placeholders are valid in both).
//!
//! A job's files are rows of `results`, created `pending` with the job, in one
//! transaction. A result is written only over a `pending` row (`... WHERE status =
//! 'pending'`), so a reply that comes twice (a re-send after a restart, a broker's
//! redelivery) is stored once, and counts are read from the rows themselves, never kept
//! as counters that a crash could leave half-updated.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// The schema, created if missing (idempotent).
const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        state TEXT NOT NULL,
        model TEXT NOT NULL,
        files BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS results (
        job_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        file_name TEXT NOT NULL,
        size BIGINT NOT NULL,
        status TEXT NOT NULL,
        predicted_class TEXT,
        probability DOUBLE PRECISION,
        top_k TEXT,
        error_code TEXT,
        error_reason TEXT,
        server_id TEXT,
        answered_at BIGINT,
        PRIMARY KEY (job_id, idx)
    )",
    "CREATE INDEX IF NOT EXISTS results_pending ON results (job_id, status)",
];

/// A job's state.
pub mod state {
    /// Files are being classified.
    pub const RUNNING: &str = "running";
    /// Every file has a result.
    pub const DONE: &str = "done";
    /// Cancelled by `DELETE`: what was pending stays unanswered.
    pub const CANCELED: &str = "canceled";
}

/// A result's status.
pub mod status {
    /// Not answered yet.
    pub const PENDING: &str = "pending";
    /// Classified.
    pub const CLASSIFIED: &str = "classified";
    /// The server answered with an error (the code says which).
    pub const ERROR: &str = "error";
    /// The job was cancelled first.
    pub const CANCELED: &str = "canceled";
}

/// A job as stored, with its counts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JobSummary {
    /// The job's id.
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `running`, `done` or `canceled`.
    pub state: String,
    /// The model asked for (empty: the servers' default).
    pub model: String,
    /// Files in the job.
    pub files: i64,
    /// Files classified.
    pub classified: i64,
    /// Files answered with an error.
    pub errors: i64,
    /// Files waiting for an answer.
    pub pending: i64,
    /// Files left unanswered by a cancel.
    pub canceled: i64,
}

/// One file's row.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ResultRow {
    /// Its place in the job (from 0).
    pub index: i64,
    /// The name it was uploaded under.
    pub file: String,
    /// Bytes.
    pub size: i64,
    /// `pending`, `classified`, `error` or `canceled`.
    pub status: String,
    /// The top class, when classified.
    pub predicted_class: Option<String>,
    /// Its probability.
    pub probability: Option<f64>,
    /// The top classes as `class:probability;...`, as the CLI writes them.
    pub top_k: Option<String>,
    /// The server's error code, when refused.
    pub error_code: Option<String>,
    /// Why.
    pub error_reason: Option<String>,
    /// Which server answered.
    pub server_id: Option<String>,
}

/// What a server said about one file.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Classified: the top class, its probability, the top-k as text.
    Classified {
        /// The top class.
        class: String,
        /// Its probability.
        probability: f64,
        /// `class:probability;...`.
        top_k: String,
    },
    /// Refused with a code and a reason.
    Error {
        /// The code's name.
        code: String,
        /// Why.
        reason: String,
    },
}

/// The jobs database.
#[derive(Clone)]
pub struct JobStore {
    pool: AnyPool,
}

impl JobStore {
    /// Connects to `url` (`sqlite://...` is created if missing) and creates the schema.
    pub async fn open(url: &str) -> anyhow::Result<JobStore> {
        sqlx::any::install_default_drivers();
        let url = if url.starts_with("sqlite:") && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if url.starts_with("sqlite:") { 1 } else { 8 })
            .connect(&url)
            .await
            .with_context(|| format!("cannot open the jobs database {}", redacted(&url)))?;
        if url.starts_with("sqlite:") {
            // Durable and concurrent readers while the runner writes.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        for statement in SCHEMA {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .context("creating the jobs tables")?;
        }
        Ok(JobStore { pool })
    }

    /// Records a new job of `files` (name, size), all pending, in one transaction.
    pub async fn create_job(
        &self,
        id: &str,
        model: &str,
        files: &[(String, u64)],
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, created_at, state, model, files) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(unix_now())
        .bind(state::RUNNING)
        .bind(model)
        .bind(files.len() as i64)
        .execute(&mut *tx)
        .await?;
        for (index, (name, size)) in files.iter().enumerate() {
            sqlx::query("INSERT INTO results (job_id, idx, file_name, size, status) VALUES ($1, $2, $3, $4, $5)")
                .bind(id)
                .bind(index as i64)
                .bind(name.as_str())
                .bind(*size as i64)
                .bind(status::PENDING)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The job with its counts, if it exists.
    pub async fn job(&self, id: &str) -> anyhow::Result<Option<JobSummary>> {
        let row = sqlx::query(&format!(
            "{JOB_SUMMARY} WHERE j.id = $1 GROUP BY j.id, j.created_at, j.state, j.model, j.files"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| summary(&row)).transpose()
    }

    /// The most recent jobs, newest first.
    pub async fn jobs(&self, limit: i64) -> anyhow::Result<Vec<JobSummary>> {
        let rows = sqlx::query(&format!(
            "{JOB_SUMMARY} GROUP BY j.id, j.created_at, j.state, j.model, j.files ORDER BY j.created_at DESC, j.id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(summary).collect()
    }

    /// Ids of the jobs still running (after a restart: the ones to resume).
    pub async fn running_jobs(&self) -> anyhow::Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM jobs WHERE state = $1 ORDER BY created_at")
            .bind(state::RUNNING)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<String, _>("id")?))
            .collect()
    }

    /// The job's files still pending: (index, name).
    pub async fn pending(&self, id: &str) -> anyhow::Result<Vec<(i64, String)>> {
        let rows = sqlx::query(
            "SELECT idx, file_name FROM results WHERE job_id = $1 AND status = $2 ORDER BY idx",
        )
        .bind(id)
        .bind(status::PENDING)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("idx")?, row.try_get("file_name")?)))
            .collect()
    }

    /// Stores the answer for file `index` if it is still pending; whether it was.
    pub async fn record(
        &self,
        id: &str,
        index: i64,
        answer: &Answer,
        server_id: &str,
    ) -> anyhow::Result<bool> {
        let mut connection = self.pool.acquire().await?;
        record_one(&mut connection, id, (index, answer, server_id)).await
    }

    /// [`JobStore::record`] for many files in one transaction (one commit, not one per
    /// file); how many were still pending.
    pub async fn record_many(
        &self,
        id: &str,
        answers: &[(i64, Answer, String)],
    ) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut stored = 0;
        for (index, answer, server_id) in answers {
            stored += u64::from(record_one(&mut tx, id, (*index, answer, server_id)).await?);
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Sets the job's state (`running` only becomes `done` or `canceled`).
    pub async fn set_state(&self, id: &str, new_state: &str) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE jobs SET state = $1 WHERE id = $2 AND state = $3")
            .bind(new_state)
            .bind(id)
            .bind(state::RUNNING)
            .execute(&mut *tx)
            .await?;
        if new_state == state::CANCELED {
            sqlx::query("UPDATE results SET status = $1 WHERE job_id = $2 AND status = $3")
                .bind(status::CANCELED)
                .bind(id)
                .bind(status::PENDING)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Jobs by state: (state, count).
    pub async fn count_by_state(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS jobs FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("state")?, row.try_get("jobs")?)))
            .collect()
    }

    /// Every job id stored (to tell the spool's orphans from jobs' files).
    pub async fn job_ids(&self) -> anyhow::Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM jobs")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<String, _>("id")?))
            .collect()
    }

    /// Rows `offset..offset+limit` of the job's results, by index.
    pub async fn results(
        &self,
        id: &str,
        offset: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<ResultRow>> {
        let rows = sqlx::query(
            "SELECT idx, file_name, size, status, predicted_class, probability, top_k, error_code,
                    error_reason, server_id
             FROM results WHERE job_id = $1 ORDER BY idx LIMIT $2 OFFSET $3",
        )
        .bind(id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(result_row).collect()
    }

    /// Forgets the job and its results.
    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM results WHERE job_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// One answer over a pending row, on `connection` (a pooled connection or a transaction).
async fn record_one(
    connection: &mut sqlx::AnyConnection,
    id: &str,
    (index, answer, server_id): (i64, &Answer, &str),
) -> anyhow::Result<bool> {
    let (status, class, probability, top_k, code, reason) = match answer {
        Answer::Classified {
            class,
            probability,
            top_k,
        } => (
            status::CLASSIFIED,
            Some(class.as_str()),
            Some(*probability),
            Some(top_k.as_str()),
            None,
            None,
        ),
        Answer::Error { code, reason } => (
            status::ERROR,
            None,
            None,
            None,
            Some(code.as_str()),
            Some(reason.as_str()),
        ),
    };
    let done = sqlx::query(
        "UPDATE results SET status = $1, predicted_class = $2, probability = $3, top_k = $4,
                 error_code = $5, error_reason = $6, server_id = $7, answered_at = $8
             WHERE job_id = $9 AND idx = $10 AND status = $11",
    )
    .bind(status)
    .bind(class)
    .bind(probability)
    .bind(top_k)
    .bind(code)
    .bind(reason)
    .bind(server_id)
    .bind(unix_now())
    .bind(id)
    .bind(index)
    .bind(status::PENDING)
    .execute(&mut *connection)
    .await?;
    Ok(done.rows_affected() == 1)
}

const JOB_SUMMARY: &str = "SELECT j.id, j.created_at, j.state, j.model, j.files,
        SUM(CASE WHEN r.status = 'classified' THEN 1 ELSE 0 END) AS classified,
        SUM(CASE WHEN r.status = 'error' THEN 1 ELSE 0 END) AS errors,
        SUM(CASE WHEN r.status = 'pending' THEN 1 ELSE 0 END) AS pending,
        SUM(CASE WHEN r.status = 'canceled' THEN 1 ELSE 0 END) AS canceled
    FROM jobs j LEFT JOIN results r ON r.job_id = j.id";

fn summary(row: &AnyRow) -> anyhow::Result<JobSummary> {
    Ok(JobSummary {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        state: row.try_get("state")?,
        model: row.try_get("model")?,
        files: row.try_get("files")?,
        classified: count(row, "classified")?,
        errors: count(row, "errors")?,
        pending: count(row, "pending")?,
        canceled: count(row, "canceled")?,
    })
}

/// A `SUM` column: an integer, or NULL for a job without files; PostgreSQL sums
/// integers to NUMERIC, so it is cast by the query's reader here.
fn count(row: &AnyRow, column: &str) -> anyhow::Result<i64> {
    if let Ok(value) = row.try_get::<Option<i64>, _>(column) {
        return Ok(value.unwrap_or(0));
    }
    let value: Option<f64> = row.try_get(column)?;
    Ok(value.unwrap_or(0.0) as i64)
}

fn result_row(row: &AnyRow) -> anyhow::Result<ResultRow> {
    Ok(ResultRow {
        index: row.try_get("idx")?,
        file: row.try_get("file_name")?,
        size: row.try_get("size")?,
        status: row.try_get("status")?,
        predicted_class: row.try_get("predicted_class")?,
        probability: row.try_get("probability")?,
        top_k: row.try_get("top_k")?,
        error_code: row.try_get("error_code")?,
        error_reason: row.try_get("error_reason")?,
        server_id: row.try_get("server_id")?,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// A database URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:<redacted>{}", &url[..scheme + 3], &url[at..])
                }
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redacted("postgres://u:s3cret@db/jobs"),
            "postgres://u:<redacted>@db/jobs"
        );
        assert_eq!(redacted("postgres://u@db/jobs"), "postgres://u@db/jobs");
        assert_eq!(redacted("sqlite:///tmp/jobs.db"), "sqlite:///tmp/jobs.db");
    }
}
