//! A client process run in the background, for cases that act on the servers or the
//! broker while a job is under way.

use std::path::Path;
use std::time::{Duration, Instant};

/// A client run in the background whose per-file lines are counted as they arrive.
pub(super) struct BackgroundClient {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundClient {
    /// Starts the client with `args`; its log goes to the test's stderr.
    pub(super) fn start(args: &[&str], env: &[(String, String)]) -> Self {
        Self::start_with_stderr(args, env, std::process::Stdio::inherit())
    }

    /// Like `start`, with the client's log (stderr, `RUST_LOG=info`) going to `log`.
    pub(super) fn start_logged(args: &[&str], env: &[(String, String)], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("client log file");
        let mut env = env.to_vec();
        env.push(("RUST_LOG".into(), "info".into()));
        Self::start_with_stderr(args, &env, file.into())
    }

    fn start_with_stderr(
        args: &[&str],
        env: &[(String, String)],
        stderr: std::process::Stdio,
    ) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(crate::binary("client-app"))
            .args(args)
            .current_dir(crate::workspace_root())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("client-app starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("lock").push(line);
            }
        });
        BackgroundClient {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Per-file result lines printed so far.
    pub(super) fn answered(&self) -> usize {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains("  →  ") || l.contains("  ✗  "))
            .count()
    }

    /// Waits until `count` files were answered (fails after `timeout`).
    pub(super) fn wait_for_answers(&self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.answered() < count {
            assert!(
                Instant::now() < deadline,
                "only {} answers after {timeout:?}",
                self.answered()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the client to exit, at most `timeout` (a hang fails the test).
    pub(super) fn finish_within(mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().expect("client status").is_none() {
            if Instant::now() >= deadline {
                let answered = self.answered();
                let _ = self.child.kill();
                panic!("the client hung: still running after {timeout:?} ({answered} answers)");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.finish()
    }

    /// Waits for the client to exit: its exit code and stdout.
    pub(super) fn finish(mut self) -> (i32, String) {
        let status = self.child.wait().expect("client exits");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stdout = self.lines.lock().expect("lock").join("\n");
        (status.code().unwrap_or(-1), stdout)
    }
}

impl Drop for BackgroundClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
