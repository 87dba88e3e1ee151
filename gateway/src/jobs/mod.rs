//! Jobs, as the image services this project grew from have them: upload many files at
//! once, get a job id at once, ask for its progress, read its per-image results, open
//! its report, cancel it.
//!
//! - `POST /v1/jobs`: a multipart form of files (and archives), or a zip or tar body;
//!   `202` with the job (its `id` and counts) and a `Location`;
//! - `GET /v1/jobs`: the latest jobs; `GET /v1/jobs/{id}`: state, counts, progress;
//! - `GET /v1/jobs/{id}/results?format=jsonl|csv&offset=&limit=`: per-image rows, paged;
//! - `GET /v1/jobs/{id}/report`: the HTML report the CLI writes (`--report`);
//! - `GET /`: a page that lists the jobs with their progress and uploads a folder;
//! - `DELETE /v1/jobs/{id}`: cancels a running job, or forgets a finished one (`?purge`
//!   forgets a running one too) with its files.
//!
//! Jobs and results live in [`store`] (SQLite or PostgreSQL), uploaded files in the
//! [`spool`] until the job is forgotten, and [`runner`] sends them to the servers.

pub mod runner;
pub mod spool;
pub mod store;
pub mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use client_app::failure::FailureCode;
use client_app::inputs::InputFile;
use client_app::job::{ClassScore, FileOutcome, FileResult, JobReport};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::Shared;
use store::{status, JobSummary, ResultRow};
use upload::UploadLimits;

/// The page people use: jobs with their progress, an upload form (`page.html`, plain
/// HTML and script, no build step; it calls the routes above).
const PAGE_HTML: &str = include_str!("page.html");

/// `GET /`: the page. It holds no data; the data comes from the routes, behind the
/// keys (the page asks for one when they answer 401).
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE_HTML,
    )
        .into_response()
}

/// Rows per results page, by default and at most.
const PAGE: (i64, i64) = (1_000, 10_000);

/// Jobs listed by `GET /v1/jobs`.
const LISTED_JOBS: i64 = 100;

/// The job as JSON: its counts and progress (0 to 1).
fn job_json(job: &JobSummary) -> serde_json::Value {
    let answered = job.classified + job.errors;
    let progress = if job.files == 0 {
        1.0
    } else {
        answered as f64 / job.files as f64
    };
    let mut value = serde_json::to_value(job).unwrap_or_default();
    value["answered"] = json!(answered);
    value["progress"] = json!(progress);
    value["results"] = json!(format!("/v1/jobs/{}/results", job.id));
    value["report"] = json!(format!("/v1/jobs/{}/report", job.id));
    value
}

/// Job ids are ours (32 hex digits); anything else is no job, and never a path.
fn checked_id(id: &str) -> Result<&str, ApiError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(ApiError::not_found(format!(
            "no job {:?}",
            crate::shown(id)
        )))
    }
}

/// A database failure: logged in full, the caller learns only that it failed.
fn internal(error: anyhow::Error) -> ApiError {
    tracing::warn!("jobs: {error:#}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the jobs database failed (see the gateway's log)",
    )
}

async fn summary_of(shared: &Shared, id: &str) -> Result<JobSummary, ApiError> {
    let id = checked_id(id)?;
    shared
        .jobs
        .store()
        .job(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

/// `POST /v1/jobs`.
pub async fn create(State(shared): State<Shared>, request: Request) -> Result<Response, ApiError> {
    let runner = &shared.jobs;
    let id = uuid::Uuid::new_v4().simple().to_string();
    // Whatever ends this handler early (a refusal, or the caller hanging up, which drops
    // it) takes the spooled files with it.
    let guard = SpoolGuard {
        spool: Some(runner.spool().clone()),
        job: id.clone(),
    };
    let limits = UploadLimits {
        max_bytes: shared.job_limits.max_job_bytes,
        max_files: shared.job_limits.max_job_files,
        max_file_bytes: shared.dispatcher.max_request_bytes() as u64,
        max_expansion_bytes: shared.job_limits.max_archive_expansion_bytes,
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let uploaded = if content_type.starts_with("multipart/form-data") {
        let form = Multipart::from_request(request, &())
            .await
            .map_err(|rejection| {
                ApiError::bad_request(format!("the upload is not a multipart form: {rejection}"))
            })?;
        let reading = upload::from_multipart(form, runner.spool(), &id, limits);
        read_within(shared.job_limits.upload_timeout, reading).await
    } else if content_type.contains("zip") || content_type.contains("tar") {
        if crate::declares_more_than(request.headers(), limits.max_bytes) {
            return Err(ApiError::too_large(format!(
                "the upload is larger than {} bytes",
                limits.max_bytes
            )));
        }
        let reading = upload::from_archive_body(request.into_body(), runner.spool(), &id, limits);
        read_within(shared.job_limits.upload_timeout, reading).await
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the files as multipart/form-data, or one archive as application/zip or application/x-tar",
        ))
    };
    let uploaded = match uploaded {
        Ok(uploaded) if uploaded.files.is_empty() => {
            Err(ApiError::bad_request("the upload holds no files"))
        }
        other => other,
    };
    let uploaded = uploaded?;
    guard.disarm();
    // Stored and started in a task of its own, so a caller hanging up now cannot leave
    // a job recorded as running with nobody running it.
    let registering = tokio::spawn({
        let runner = Arc::clone(runner);
        let id = id.clone();
        async move {
            let stored = runner
                .store()
                .create_job(&id, &uploaded.model, &uploaded.files)
                .await;
            match stored {
                Ok(()) => runner.start(id),
                Err(_) => runner.spool().remove_job(&id).await,
            }
            stored
        }
    });
    registering
        .await
        .map_err(|error| internal(error.into()))?
        .map_err(internal)?;
    let job = summary_of(&shared, &id).await?;
    let location =
        HeaderValue::from_str(&format!("/v1/jobs/{id}")).map_err(|e| internal(e.into()))?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(job_json(&job)),
    )
        .into_response())
}

/// Removes a job's spooled files when dropped, unless disarmed.
struct SpoolGuard {
    spool: Option<spool::Spool>,
    job: String,
}

impl SpoolGuard {
    fn disarm(mut self) {
        self.spool = None;
    }
}

impl Drop for SpoolGuard {
    fn drop(&mut self) {
        let Some(spool) = self.spool.take() else {
            return;
        };
        let job = std::mem::take(&mut self.job);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { spool.remove_job(&job).await });
        }
    }
}

async fn read_within<T>(
    limit: Duration,
    reading: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(limit, reading)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the upload did not arrive within {} s", limit.as_secs()),
            ))
        })
}

/// `GET /v1/jobs`.
pub async fn list(State(shared): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    let jobs = shared
        .jobs
        .store()
        .jobs(LISTED_JOBS)
        .await
        .map_err(internal)?;
    Ok(Json(
        json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() }),
    ))
}

/// `GET /v1/jobs/{id}`.
pub async fn show(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(job_json(&summary_of(&shared, &id).await?)))
}

/// The query of `GET /v1/jobs/{id}/results`.
#[derive(Debug, Deserialize)]
pub struct ResultsQuery {
    format: Option<String>,
    offset: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/jobs/{id}/results`: JSON lines (default) or CSV; the next page's offset in
/// `X-Next-Offset` while there are more rows.
pub async fn results(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<ResultsQuery>,
) -> Result<Response, ApiError> {
    let job = summary_of(&shared, &id).await?;
    let offset = query.offset.unwrap_or(0).max(0);
    let limit = query.limit.unwrap_or(PAGE.0).clamp(1, PAGE.1);
    let rows = shared
        .jobs
        .store()
        .results(&job.id, offset, limit)
        .await
        .map_err(internal)?;
    let next = offset + rows.len() as i64;
    let (content_type, body) = match query.format.as_deref().unwrap_or("jsonl") {
        "jsonl" | "json" => ("application/x-ndjson", jsonl(&rows)),
        "csv" => (
            "text/csv; charset=utf-8",
            csv_rows(&rows).map_err(internal)?,
        ),
        other => {
            return Err(ApiError::bad_request(format!(
                "format {other:?}: use jsonl or csv"
            )))
        }
    };
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    if next < job.files {
        response
            .headers_mut()
            .insert("x-next-offset", HeaderValue::from(next));
    }
    Ok(response)
}

fn jsonl(rows: &[ResultRow]) -> String {
    rows.iter()
        .map(|row| serde_json::to_string(row).unwrap_or_default() + "\n")
        .collect()
}

fn csv_rows(rows: &[ResultRow]) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "index",
        "file",
        "size",
        "status",
        "predicted_class",
        "probability",
        "top_k",
        "error_code",
        "error_reason",
        "server_id",
    ])?;
    for row in rows {
        writer.write_record([
            row.index.to_string(),
            inert(&row.file),
            row.size.to_string(),
            row.status.clone(),
            inert(row.predicted_class.as_deref().unwrap_or_default()),
            row.probability
                .map(|p| format!("{p:.6}"))
                .unwrap_or_default(),
            inert(row.top_k.as_deref().unwrap_or_default()),
            row.error_code.clone().unwrap_or_default(),
            inert(row.error_reason.as_deref().unwrap_or_default()),
            inert(row.server_id.as_deref().unwrap_or_default()),
        ])?;
    }
    Ok(String::from_utf8(writer.into_inner()?)?)
}

/// `GET /v1/jobs/{id}/report`: the CLI's HTML report of the job's results so far.
pub async fn report(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = summary_of(&shared, &id).await?;
    let runner = &shared.jobs;
    let rows = runner
        .store()
        .results(&job.id, 0, job.files.max(1))
        .await
        .map_err(internal)?;
    let results = rows
        .into_iter()
        .map(|row| file_result(runner.spool().path(&job.id, row.index), row))
        .collect();
    let report = JobReport {
        job_id: job.id.clone(),
        results,
        duplicate_replies: 0,
        rejected_replies: 0,
        elapsed: Duration::ZERO,
        answered_by: HashMap::new(),
    };
    let page = tokio::task::spawn_blocking(move || client_app::html_report::render(&report, None))
        .await
        .map_err(|error| internal(error.into()))?;
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response())
}

/// A stored row as the CLI's report takes it (the spooled file gives the thumbnail).
fn file_result(path: PathBuf, row: ResultRow) -> FileResult {
    let outcome = match row.status.as_str() {
        status::CLASSIFIED => FileOutcome::Classified {
            top_k: parse_top_k(row.top_k.as_deref().unwrap_or_default()),
            model: String::new(),
            model_version: String::new(),
        },
        status::ERROR => FileOutcome::Failed {
            code: FailureCode::from(row.error_code.as_deref().unwrap_or_default()),
            reason: row.error_reason.unwrap_or_default(),
        },
        _ => FileOutcome::Unanswered,
    };
    FileResult {
        input: InputFile {
            path,
            display_name: row.file.clone(),
            folder: None,
            relative: PathBuf::from(&row.file),
        },
        request_id: String::new(),
        outcome,
        server_id: row.server_id.unwrap_or_default(),
        latency: None,
    }
}

/// A text cell a spreadsheet will not run: one starting like a formula gets a `'`.
fn inert(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    }
}

/// `class:probability;...` back into scores.
fn parse_top_k(text: &str) -> Vec<ClassScore> {
    text.split(';')
        .filter_map(|item| item.rsplit_once(':'))
        .enumerate()
        .map(|(rank, (class, probability))| ClassScore {
            class_name: class.to_string(),
            class_index: rank as u32,
            probability: probability.parse().unwrap_or(0.0),
        })
        .collect()
}

/// The query of `DELETE /v1/jobs/{id}`.
#[derive(Debug, Deserialize)]
pub struct DeleteQuery {
    /// Present (bare, or anything but `false`): forget even a running job.
    purge: Option<String>,
}

/// `DELETE /v1/jobs/{id}`: a running job is cancelled (its results so far are kept);
/// a finished one (or any, with `?purge=true`) is forgotten with its files.
pub async fn delete(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let job = summary_of(&shared, &id).await?;
    let runner = &shared.jobs;
    runner.cancel(&job.id);
    let purge = query.purge.is_some_and(|value| value != "false");
    if job.state == store::state::RUNNING && !purge {
        runner
            .store()
            .set_state(&job.id, store::state::CANCELED)
            .await
            .map_err(internal)?;
        let job = summary_of(&shared, &job.id).await?;
        return Ok(Json(job_json(&job)).into_response());
    }
    runner.store().delete(&job.id).await.map_err(internal)?;
    runner.spool().remove_job(&job.id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_ids_are_jobs() {
        assert!(checked_id("0123456789abcdef0123456789abcdef").is_ok());
        for bad in ["../../etc", "0123", "0123456789abcdef0123456789abcdeg", ""] {
            assert_eq!(
                checked_id(bad).expect_err(bad).status,
                StatusCode::NOT_FOUND
            );
        }
    }

    #[test]
    fn csv_cells_never_start_a_formula() {
        assert_eq!(inert("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(inert("@cmd"), "'@cmd");
        assert_eq!(inert("coat/1.png"), "coat/1.png");
    }

    #[test]
    fn stored_top_k_reads_back() {
        let scores = parse_top_k("T-shirt:top:0.900000;Bag:0.100000");
        assert_eq!(scores[0].class_name, "T-shirt:top");
        assert!((scores[1].probability - 0.1).abs() < 1e-6);
    }
}
