//! Reading the files a job sends: a few at a time on the blocking thread pool, each
//! opened without waiting, refused unless regular, and read no further than the limit.

use super::sender::SEND_BATCH;
use super::Failure;
use crate::inputs::InputFile;

/// One file's bytes, or the failure to report for it.
pub(super) type FileRead = Result<Vec<u8>, Failure>;

/// Files read ahead at most: this many, or until this many bytes were read.
const READ_AHEAD_FILES: usize = SEND_BATCH;
const READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;

/// Reads the next few of `files` (at least one, if any) in one trip to the blocking
/// thread pool: a round trip per file costs more than reading a small image.
pub(super) async fn read_chunk(files: &[InputFile], max_bytes: usize) -> Vec<FileRead> {
    let paths: Vec<std::path::PathBuf> = files
        .iter()
        .take(READ_AHEAD_FILES)
        .map(|file| file.path.clone())
        .collect();
    let reading = tokio::task::spawn_blocking(move || {
        let mut read = Vec::with_capacity(paths.len());
        let mut bytes = 0;
        for path in &paths {
            let result = read_file(path, max_bytes);
            bytes += result.as_ref().map_or(0, Vec::len);
            read.push(result);
            if bytes >= READ_AHEAD_BYTES {
                break;
            }
        }
        read
    });
    match reading.await {
        Ok(read) => read,
        Err(error) => vec![Err(Failure::unreadable(format!(
            "reading the file failed: {error}"
        )))],
    }
}

/// Reads one file (blocking), refusing files larger than `max_bytes` before reading,
/// and anything but a regular file. One open and one `fstat` (not a lookup of the path
/// for its size, then another to read it): for small images the syscalls are most of
/// the cost.
fn read_file(path: &std::path::Path, max_bytes: usize) -> FileRead {
    use std::io::Read;
    let unreadable = |e: std::io::Error| Failure::unreadable(format!("cannot read the file: {e}"));
    let too_large = |size: String| {
        Failure::too_large(format!(
            "the file is {size} bytes; the client sends at most {max_bytes} \
             (--resize-to downscales large images)"
        ))
    };
    let file = open_without_blocking(path).map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        // The walk sends regular files only; this one was replaced since.
        let kind = crate::inputs::kind_name(&metadata.file_type());
        let reason = format!("not a regular file ({kind}); not read");
        return Err(Failure::unreadable(reason));
    }
    let len = metadata.len();
    if len > max_bytes as u64 {
        return Err(too_large(len.to_string()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // At most one byte more than allowed: a file that grew since, or one whose size
    // says nothing (`/proc`), is not read without end.
    let cap = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    file.take(cap).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() > max_bytes {
        return Err(too_large(format!("more than {max_bytes}")));
    }
    Ok(bytes)
}

/// `O_NONBLOCK` where its value is known without the `libc` crate (Linux on the common
/// architectures); elsewhere files are opened plainly and only the walk keeps FIFOs out.
const O_NONBLOCK: Option<i32> = if cfg!(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "s390x",
        target_arch = "powerpc64"
    )
)) {
    Some(0o4000)
} else {
    None
};

/// Opens `path` for reading without waiting: a FIFO put where a file was (after the
/// walk) would block the open until a writer came, holding a blocking-pool thread and
/// the process's exit. Reads of regular files do not care about the flag.
fn open_without_blocking(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    if let Some(flag) = O_NONBLOCK {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(flag);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::{read_file, Failure};
    use crate::failure::FailureCode;

    /// The code and reason of a file refused.
    fn refused(path: &std::path::Path, max_bytes: usize) -> (FailureCode, String) {
        let Failure { code, reason } = read_file(path, max_bytes).expect_err("refused");
        (code, reason)
    }

    #[test]
    fn a_file_is_read_whole_up_to_the_limit_and_refused_beyond_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.png");
        std::fs::write(&path, [7u8; 100]).expect("write");
        assert_eq!(read_file(&path, 100).expect("read"), vec![7u8; 100]);
        let (code, reason) = refused(&path, 99);
        assert_eq!(code, FailureCode::FileTooLarge);
        assert!(reason.contains("the file is 100 bytes"), "{reason}");
    }

    /// A file whose size says nothing (`/proc`: size 0, contents longer) is read no
    /// further than one byte past the limit.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_file_without_a_size_is_not_read_without_end() {
        let (code, reason) = refused(std::path::Path::new("/proc/self/maps"), 10);
        assert_eq!(code, FailureCode::FileTooLarge);
        assert!(reason.contains("more than 10 bytes"), "{reason}");
    }

    /// A device or a FIFO (one that replaced a file after the walk) is refused without
    /// being read, and opening the FIFO does not wait for a writer.
    #[cfg(target_os = "linux")]
    #[test]
    fn only_regular_files_are_read() {
        let (code, reason) = refused(std::path::Path::new("/dev/zero"), 1000);
        assert_eq!(code, FailureCode::UnreadableFile);
        assert!(reason.contains("a character device"), "{reason}");
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("pipe.png");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (code, reason) = refused(&fifo, 1000);
        assert_eq!(code, FailureCode::UnreadableFile);
        assert!(reason.contains("a FIFO"), "{reason}");
    }
}
