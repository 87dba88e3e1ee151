//! A job's files, from an upload into the spool: a multipart form of many files (a
//! folder picked in a browser), or one zip or tar archive (as a form field or as the
//! whole body). Everything is bounded while it streams in: the upload's bytes, the
//! number of files, each file's size, and what an archive expands to (a zip bomb is
//! refused when the bytes actually read pass the limit, whatever its headers claim).

use std::io::{Read, Seek};
use std::path::PathBuf;

use axum::extract::multipart::{Field, Multipart};

use crate::error::ApiError;
use crate::jobs::spool::Spool;

/// The bounds one upload is held to.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// All bytes of the upload.
    pub max_bytes: u64,
    /// Files in the job.
    pub max_files: usize,
    /// One file's bytes (what one broker message can carry).
    pub max_file_bytes: u64,
    /// What an archive may expand to.
    pub max_expansion_bytes: u64,
}

/// Longest `model` field.
const MAX_MODEL_NAME_BYTES: usize = 256;

/// Characters of a file name kept (names are for people; files are spooled by index).
const MAX_NAME_CHARS: usize = 512;

/// The files spooled so far: (name, size) by index, and the form's model field.
#[derive(Debug, Default)]
pub struct Upload {
    /// (name, size), in upload order; file `i` is spooled as index `i`.
    pub files: Vec<(String, u64)>,
    /// The `model` field, if sent.
    pub model: String,
    received: u64,
}

impl Upload {
    /// Counts `bytes` more of the upload (every part of it, files and fields alike),
    /// refusing the upload once it passes `max_bytes`.
    fn count(&mut self, bytes: usize, limits: UploadLimits) -> Result<(), ApiError> {
        self.received += bytes as u64;
        if self.received > limits.max_bytes {
            return Err(upload_too_large(limits));
        }
        Ok(())
    }
}

/// Reads a multipart form into the spool under `job`.
pub async fn from_multipart(
    mut form: Multipart,
    spool: &Spool,
    job: &str,
    limits: UploadLimits,
) -> Result<Upload, ApiError> {
    let mut upload = Upload::default();
    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        if field.file_name().is_none() {
            let is_model = field.name() == Some("model");
            let mut text = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                upload.count(chunk.len(), limits)?;
                if is_model && text.len() + chunk.len() > MAX_MODEL_NAME_BYTES {
                    return Err(ApiError::bad_request(format!(
                        "the model field is longer than {MAX_MODEL_NAME_BYTES} bytes"
                    )));
                }
                if is_model {
                    text.extend_from_slice(&chunk);
                }
            }
            if is_model {
                upload.model = String::from_utf8_lossy(&text).trim().to_string();
            }
            continue;
        }
        let name = clean_name(field.file_name().unwrap_or_default());
        spool_field(field, &name, spool, job, &mut upload, limits).await?;
    }
    Ok(upload)
}

/// Reads a body that is one archive (zip or tar) into the spool under `job` as it
/// streams in (never whole in memory), then expands it.
pub async fn from_archive_body(
    body: axum::body::Body,
    spool: &Spool,
    job: &str,
    limits: UploadLimits,
) -> Result<Upload, ApiError> {
    use futures::StreamExt;
    let mut upload = Upload::default();
    let mut file = spool
        .create_named(job, "archive")
        .await
        .map_err(|e| io_error_anyhow(&e))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::bad_request(format!("reading the upload failed: {error}"))
        })?;
        upload.count(chunk.len(), limits)?;
        file.write(&chunk).await.map_err(io_error)?;
    }
    let (path, _size) = file.commit_at().await.map_err(io_error)?;
    expand_archive(path, "upload", spool, job, &mut upload, limits).await?;
    Ok(upload)
}

/// One file field: a plain file is spooled as it streams; an archive is spooled whole,
/// then expanded.
async fn spool_field(
    mut field: Field<'_>,
    name: &str,
    spool: &Spool,
    job: &str,
    upload: &mut Upload,
    limits: UploadLimits,
) -> Result<(), ApiError> {
    check_file_count(upload, limits)?;
    let archive = is_archive_name(name);
    let mut file = if archive {
        spool.create_named(job, "archive").await
    } else {
        spool.create(job, upload.files.len() as i64).await
    }
    .map_err(|e| io_error_anyhow(&e))?;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        upload.count(chunk.len(), limits)?;
        if !archive && file.written() + chunk.len() as u64 > limits.max_file_bytes {
            return Err(file_too_large(name, limits));
        }
        file.write(&chunk).await.map_err(io_error)?;
    }
    let (path, size) = file.commit_at().await.map_err(io_error)?;
    if archive {
        return expand_archive(path, name, spool, job, upload, limits).await;
    }
    upload.files.push((name.to_string(), size));
    Ok(())
}

/// Expands the archive at `path` into spooled files (then removes it), off the async
/// threads.
async fn expand_archive(
    path: PathBuf,
    name: &str,
    spool: &Spool,
    job: &str,
    upload: &mut Upload,
    limits: UploadLimits,
) -> Result<(), ApiError> {
    let first_index = upload.files.len();
    let room = limits.max_files.saturating_sub(first_index);
    let writer = EntryWriter {
        spool: spool.clone(),
        job: job.to_string(),
        next_index: first_index,
        room,
        expanded: 0,
        limits,
        entries: Vec::new(),
    };
    let archive_name = name.to_string();
    let archive_path = path.clone();
    let entries =
        tokio::task::spawn_blocking(move || expand_blocking(&archive_path, &archive_name, writer))
            .await
            .map_err(|error| {
                ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    error.to_string(),
                )
            })??;
    let _ = tokio::fs::remove_file(&path).await;
    upload.files.extend(entries);
    Ok(())
}

/// Zip or tar (sniffed from the first bytes), each regular entry spooled by `writer`;
/// directories and links are skipped.
fn expand_blocking(
    path: &std::path::Path,
    name: &str,
    mut writer: EntryWriter,
) -> Result<Vec<(String, u64)>, ApiError> {
    let (room, limits) = (writer.room, writer.limits);
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let read = file.read(&mut head).map_err(io_error)?;
    file.rewind().map_err(io_error)?;
    if read == 4 && head == *b"PK\x03\x04" {
        let mut archive = zip::ZipArchive::new(file).map_err(|error| {
            ApiError::bad_request(format!("{name}: not a readable zip archive: {error}"))
        })?;
        if archive.len() > room {
            return Err(too_many_files(limits));
        }
        for i in 0..archive.len() {
            let entry = archive
                .by_index(i)
                .map_err(|error| ApiError::bad_request(format!("{name}: entry {i}: {error}")))?;
            if !entry.is_file() {
                continue;
            }
            let entry_name = match entry.name() {
                Ok(entry_name) => clean_name(&entry_name),
                Err(_) => clean_name(&String::from_utf8_lossy(entry.name_raw())),
            };
            writer.write(&entry_name, entry)?;
        }
    } else {
        let mut archive = tar::Archive::new(file);
        let entries = archive.entries().map_err(|error| {
            ApiError::bad_request(format!("{name}: not a zip or tar archive: {error}"))
        })?;
        for entry in entries {
            let entry = entry.map_err(|error| {
                ApiError::bad_request(format!("{name}: not a readable tar archive: {error}"))
            })?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let entry_name = clean_name(&String::from_utf8_lossy(&entry.path_bytes()));
            writer.write(&entry_name, entry)?;
        }
    }
    if writer.entries.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{name}: the archive holds no files"
        )));
    }
    Ok(writer.entries)
}

/// Writes archive entries as spooled files, counting what they expand to.
struct EntryWriter {
    spool: Spool,
    job: String,
    next_index: usize,
    room: usize,
    expanded: u64,
    limits: UploadLimits,
    entries: Vec<(String, u64)>,
}

impl EntryWriter {
    fn write(&mut self, name: &str, entry: impl Read) -> Result<(), ApiError> {
        if self.entries.len() >= self.room {
            return Err(too_many_files(self.limits));
        }
        // Read at most one byte past each bound, so a lying header cannot get further.
        let left = self
            .limits
            .max_expansion_bytes
            .saturating_sub(self.expanded);
        let cap = left.min(self.limits.max_file_bytes) + 1;
        let mut bytes = Vec::new();
        entry.take(cap).read_to_end(&mut bytes).map_err(|error| {
            ApiError::bad_request(format!(
                "{name}: reading it from the archive failed: {error}"
            ))
        })?;
        let size = bytes.len() as u64;
        if size > left {
            return Err(ApiError::too_large(format!(
                "the archive expands to more than {} bytes",
                self.limits.max_expansion_bytes
            )));
        }
        if size > self.limits.max_file_bytes {
            return Err(file_too_large(name, self.limits));
        }
        self.expanded += size;
        self.spool
            .write_blocking(&self.job, self.next_index as i64, &bytes)
            .map_err(io_error)?;
        self.next_index += 1;
        self.entries.push((name.to_string(), size));
        Ok(())
    }
}

/// Whether an uploaded file is an archive to expand, by its name.
fn is_archive_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".zip", ".tar"]
        .iter()
        .any(|suffix| lower.ends_with(suffix))
}

/// A name as shown and stored: control characters dropped, at most 512 characters.
/// Never used as a path.
pub fn clean_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME_CHARS)
        .collect();
    if cleaned.is_empty() {
        "unnamed".to_string()
    } else {
        cleaned
    }
}

fn check_file_count(upload: &Upload, limits: UploadLimits) -> Result<(), ApiError> {
    if upload.files.len() >= limits.max_files {
        return Err(too_many_files(limits));
    }
    Ok(())
}

fn upload_too_large(limits: UploadLimits) -> ApiError {
    ApiError::too_large(format!(
        "the upload is larger than {} bytes",
        limits.max_bytes
    ))
}

fn too_many_files(limits: UploadLimits) -> ApiError {
    ApiError::too_large(format!("more than {} files in one job", limits.max_files))
}

fn file_too_large(name: &str, limits: UploadLimits) -> ApiError {
    ApiError::too_large(format!(
        "{name}: larger than {} bytes, the most one request to the servers can carry",
        limits.max_file_bytes
    ))
}

fn multipart_error(error: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::new(
        error.status(),
        format!(
            "the upload is not a readable multipart form: {}",
            error.body_text()
        ),
    )
}

/// A spool failure: the details (paths) are logged, the caller learns only what failed.
fn io_error(error: std::io::Error) -> ApiError {
    tracing::warn!(%error, "spooling an upload failed");
    spool_failed()
}

fn io_error_anyhow(error: &anyhow::Error) -> ApiError {
    tracing::warn!("spooling an upload failed: {error:#}");
    spool_failed()
}

fn spool_failed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INSUFFICIENT_STORAGE,
        "the gateway could not store the upload (see its log)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_for_people_only() {
        assert_eq!(clean_name("../../etc/passwd"), "../../etc/passwd");
        assert_eq!(clean_name("a\u{1b}[31mb\n"), "a[31mb");
        assert_eq!(clean_name(""), "unnamed");
        assert_eq!(clean_name(&"x".repeat(2000)).len(), MAX_NAME_CHARS);
    }

    #[test]
    fn archives_are_known_by_name() {
        assert!(is_archive_name("photos.ZIP"));
        assert!(is_archive_name("photos.tar"));
        assert!(!is_archive_name("photo.png"));
    }
}
