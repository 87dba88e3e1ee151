//! Uploaded files on disk until their job is deleted: `spool/<job id>/<index>`. A file
//! is written under a temporary name, synced and renamed, so after a crash a file is
//! either whole or absent. Files are named by their index only: the names callers give
//! are kept in the database, never used as paths, so no name can reach outside the
//! spool.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::io::AsyncWriteExt;

/// The spool directory.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool under `dir`, created if missing.
    pub fn open(dir: &Path) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the spool {}", dir.display()))?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    /// A job's directory.
    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.dir.join(job)
    }

    /// Where file `index` of `job` is kept.
    pub fn path(&self, job: &str, index: i64) -> PathBuf {
        self.job_dir(job).join(index.to_string())
    }

    /// A writer for file `index` of `job`; [`SpoolFile::commit_at`] makes it visible.
    pub async fn create(&self, job: &str, index: i64) -> anyhow::Result<SpoolFile> {
        self.create_named(job, &index.to_string()).await
    }

    /// A writer for the file `name` of `job`'s directory (e.g. an archive before it is
    /// expanded); `name` is ours, never a caller's.
    pub async fn create_named(&self, job: &str, name: &str) -> anyhow::Result<SpoolFile> {
        let dir = self.job_dir(job);
        tokio::fs::create_dir_all(&dir).await?;
        let final_path = dir.join(name);
        let temporary = part_path(&dir, name);
        let file = tokio::fs::File::create(&temporary)
            .await
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        Ok(SpoolFile {
            file,
            temporary,
            final_path,
            written: 0,
        })
    }

    /// Writes file `index` of `job` whole, as [`SpoolFile::commit_at`] does (temporary
    /// name, synced, renamed), blocking: for archives expanded on the blocking pool.
    pub fn write_blocking(&self, job: &str, index: i64, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let final_path = self.path(job, index);
        let temporary = part_path(&self.job_dir(job), &index.to_string());
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, final_path)
    }

    /// File `index` of `job`.
    pub async fn read(&self, job: &str, index: i64) -> std::io::Result<Vec<u8>> {
        tokio::fs::read(self.path(job, index)).await
    }

    /// The names of the job directories present.
    pub async fn job_dirs(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            if entry.file_type().await?.is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    /// Removes a job's files.
    pub async fn remove_job(&self, job: &str) {
        let dir = self.job_dir(job);
        if let Err(error) = tokio::fs::remove_dir_all(&dir).await {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%error, dir = %dir.display(), "removing a job's files failed");
            }
        }
    }
}

/// Where a spool file is written before it is renamed into place.
fn part_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.part"))
}

/// A file being written into the spool.
pub struct SpoolFile {
    file: tokio::fs::File,
    temporary: PathBuf,
    final_path: PathBuf,
    written: u64,
}

impl SpoolFile {
    /// Appends `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes).await?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Syncs and renames the file into place; where it now is, and its size.
    pub async fn commit_at(mut self) -> std::io::Result<(PathBuf, u64)> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        tokio::fs::rename(&self.temporary, &self.final_path).await?;
        Ok((self.final_path, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_visible_only_once_committed() {
        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path()).expect("spool");
        let mut file = spool.create("job1", 0).await.expect("create");
        file.write(b"abc").await.expect("write");
        assert!(spool.read("job1", 0).await.is_err());
        let (path, size) = file.commit_at().await.expect("commit");
        assert_eq!((path, size), (spool.path("job1", 0), 3));
        assert_eq!(spool.read("job1", 0).await.expect("read"), b"abc");
        spool.remove_job("job1").await;
        assert!(!spool.job_dir("job1").exists());
    }
}
