//! Shared harness of the cross-crate tests: finding the workspace's binaries, running
//! server processes that are killed when a test ends, running the client and reading
//! its summary, and building folders of good and bad input files.
//!
//! The cross-process suite ([`cross_process`]) is generic over the backend: the Kafka,
//! Pub/Sub and Redis test files run the same cases with their own environment.

pub mod cross_process;
pub mod intercept;
pub mod traces;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use classifier_proto::{ClassifyRequest, ClassifyResponse, Outcome, ProstMessage};
use unified_broker::{Delivery, Message, Subscriber};

/// The workspace root (where `examples/` and `models/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Path of a binary of the workspace, built in the same profile as the test.
///
/// Panics with instructions if it was not built (`scripts/test.sh` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs `client-app` with `args` from the workspace root and waits for it.
pub fn run_client(args: &[&str], env: &[(String, String)]) -> Output {
    client_command(args, env).output().expect("client-app runs")
}

/// A finished process's stdout and stderr, as one text (for assertions on what it said).
pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// [`run_client`], but `None` (the client killed) if it has not exited within `limit`:
/// for tests where a hang is the failure.
pub fn run_client_within(
    args: &[&str],
    env: &[(String, String)],
    limit: std::time::Duration,
) -> Option<Output> {
    output_within(client_command(args, env), limit)
}

/// Runs `command` and returns its output, or `None` (the process killed) if it has not
/// exited within `limit`.
pub fn output_within(mut command: Command, limit: std::time::Duration) -> Option<Output> {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let pid = child.id();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output().expect("the command's output"));
    });
    let finished = output.recv_timeout(limit).ok();
    if finished.is_none() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    finished
}

/// The `client-app` command with `args` and `env`, run from the workspace root.
fn client_command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut command = Command::new(binary("client-app"));
    command
        .args(args)
        .current_dir(workspace_root())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    command
}

/// A `classifier-server` process, killed (SIGKILL) when dropped if still running.
pub struct ServerProcess {
    child: Child,
    /// Its `--server-id`.
    pub id: String,
}

impl ServerProcess {
    /// Starts a server with the given environment (backend, topic, group...).
    pub fn start(id: &str, env: &[(String, String)], log: &Path) -> ServerProcess {
        Self::start_with_args(id, &[], env, log)
    }

    /// [`ServerProcess::start`] with more command-line arguments.
    pub fn start_with_args(
        id: &str,
        args: &[&str],
        env: &[(String, String)],
        log: &Path,
    ) -> ServerProcess {
        let log_file = std::fs::File::create(log).expect("server log file");
        // Started away from the repository, with no per-user model: the server finds
        // the model built into it, as an installed one does.
        let child = Command::new(binary("classifier-server"))
            .args(["--server-id", id])
            .args(args)
            .current_dir(std::env::temp_dir())
            .env(
                "XDG_DATA_HOME",
                std::env::temp_dir().join("no-per-user-data"),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("classifier-server starts");
        ServerProcess {
            child,
            id: id.to_string(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (VmHWM from /proc), in KiB, where available.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Sends SIGTERM and waits for the exit status (bounded by `timeout`).
    pub fn terminate(mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The numbers of the client's summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Files in the job.
    pub files: usize,
    /// Classified.
    pub classified: usize,
    /// Answered with errors.
    pub errors: usize,
    /// Not answered.
    pub unanswered: usize,
    /// Duplicate replies seen.
    pub duplicates: usize,
    /// Accuracy in percent, if printed.
    pub accuracy_percent: Option<f64>,
}

/// The number after the first `label` in `stdout` (e.g. `"skipped (already answered): "`).
pub fn summary_number(stdout: &str, label: &str) -> Option<usize> {
    let start = stdout.find(label)? + label.len();
    stdout[start..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()?
        .trim_end_matches('%')
        .parse()
        .ok()
}

/// Parses the summary the client prints on stdout.
pub fn parse_summary(stdout: &str) -> Summary {
    let number_after = |label: &str| summary_number(stdout, label);
    let accuracy_percent = stdout.find("accuracy: ").and_then(|i| {
        let rest = &stdout[i..];
        let eq = rest.find("= ")? + 2;
        rest[eq..].split('%').next()?.trim().parse().ok()
    });
    Summary {
        files: number_after("files: ").expect("summary has files"),
        classified: number_after("classified: ").expect("summary has classified"),
        errors: number_after("errors: ").expect("summary has errors"),
        unanswered: number_after("unanswered: ").expect("summary has unanswered"),
        duplicates: number_after("duplicate replies: ").expect("summary has duplicates"),
        accuracy_percent,
    }
}

/// The next delivery on `subscriber` within `wait`; panics, naming `what` the test
/// waited for, if the wait ends first, the stream ends or the backend reports an error.
pub async fn next_delivery(
    subscriber: &mut dyn Subscriber,
    wait: Duration,
    what: &str,
) -> Delivery {
    tokio::time::timeout(wait, subscriber.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {wait:?}"))
        .unwrap_or_else(|| panic!("the stream ended before {what}"))
        .unwrap_or_else(|error| panic!("a receive error instead of {what}: {error}"))
}

/// The next reply on `replies` (within 30 s), decoded and acked.
pub async fn next_reply(replies: &mut dyn Subscriber) -> ClassifyResponse {
    let delivery = next_delivery(replies, Duration::from_secs(30), "reply").await;
    let response =
        ClassifyResponse::decode(delivery.message().payload.as_ref()).expect("a ClassifyResponse");
    delivery.ack().expect("ack");
    response
}

/// The class the model ranked first in `reply`; panics if the reply is not predictions.
pub fn top_class(reply: &ClassifyResponse) -> &str {
    match &reply.outcome {
        Some(Outcome::Predictions(predictions)) => predictions
            .top_k
            .first()
            .map(|class| class.class_name.as_str())
            .expect("at least one prediction"),
        other => panic!("expected predictions, got {other:?}"),
    }
}

/// `count` requests for the example image `examples/bag/00018.png`, ids `<prefix>-<i>`,
/// answered on `reply_topic`, framed as `client-app` frames them: a burst for cases that
/// publish their own requests.
pub fn example_requests(prefix: &str, count: usize, reply_topic: &str) -> Vec<Message> {
    let image =
        std::fs::read(workspace_root().join("examples/bag/00018.png")).expect("example image");
    (0..count)
        .map(|i| {
            let request = ClassifyRequest {
                request_id: format!("{prefix}-{i}"),
                job_id: format!("{prefix}-job"),
                reply_topic: reply_topic.to_string(),
                image: image.clone(),
                ..ClassifyRequest::default()
            };
            client_app::job::request_message(&request, None)
        })
        .collect()
}

/// Encodes a small JPEG photo-like test image.
pub fn jpeg_bytes(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode jpeg");
    out.into_inner()
}

/// A PNG whose header claims `width`×`height` pixels, followed by a tiny data chunk
/// and the end marker: a decompression bomb's shape, without the bomb.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    // zlib stream of a few zero bytes (stored block)
    chunk(
        &mut out,
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x04, 0x00, 0xfb, 0xff, 0, 0, 0, 0, 0, 0x04, 0x00, 0x01,
        ],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The bad files of the foundation issue, by name, with the error code each must get.
pub fn write_bad_inputs(dir: &Path) -> Vec<(&'static str, &'static str)> {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("notes.txt"),
        b"this is a text file, not an image\n",
    )
    .expect("write");
    std::fs::write(dir.join("empty.png"), b"").expect("write");
    let jpeg = jpeg_bytes(96, 96);
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).expect("write");
    std::fs::write(dir.join("huge.png"), png_claiming(100_000, 100_000)).expect("write");
    vec![
        ("notes.txt", "UNSUPPORTED_FORMAT"),
        ("empty.png", "EMPTY_IMAGE"),
        ("truncated.jpg", "CORRUPT_IMAGE"),
        ("huge.png", "IMAGE_TOO_LARGE"),
    ]
}

/// Checks the client's stdout for the `bad` files (name and error code, as
/// [`write_bad_inputs`] returns them): each has its error line, `name  ✗  CODE: reason`,
/// with its own code and a reason after it.
pub fn assert_errors_reported(stdout: &str, bad: &[(&str, &str)]) {
    for (name, code) in bad {
        let line = stdout
            .lines()
            .find(|l| l.contains(name) && l.contains('✗'))
            .unwrap_or_else(|| panic!("no error line for {name}:\n{stdout}"));
        assert!(
            line.contains(&format!("{code}: ")),
            "{name} should be {code}, with a reason after it: {line}"
        );
    }
}

/// Copies `per_class` example images of every class into `dir/<class>/`.
pub fn copy_examples(dir: &Path, per_class: usize) -> usize {
    let examples = workspace_root().join("examples");
    let mut copied = 0;
    let mut classes: Vec<_> = std::fs::read_dir(&examples)
        .expect("examples/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    for class in classes {
        let target = dir.join(class.file_name().expect("class folder name"));
        std::fs::create_dir_all(&target).expect("mkdir");
        let mut files: Vec<_> = std::fs::read_dir(&class)
            .expect("class folder")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for file in files.into_iter().take(per_class) {
            std::fs::copy(&file, target.join(file.file_name().expect("file name"))).expect("copy");
            copied += 1;
        }
    }
    copied
}

/// Copies the shipped model into `dir`, with `edit` applied to its metadata first (a
/// new version, renamed classes), so a test can tell which model answered.
pub fn copy_shipped_model(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let shipped = workspace_root().join("models/fashion-mnist");
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(
        shipped.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("copy the weights");
    let text = std::fs::read_to_string(shipped.join("metadata.json")).expect("metadata");
    let mut meta: serde_json::Value = serde_json::from_str(&text).expect("json");
    edit(&mut meta);
    std::fs::write(dir.join("metadata.json"), meta.to_string()).expect("write the metadata");
}

/// Copies every example `copies` times under distinct names: a big labelled folder.
pub fn many_images(dir: &Path, copies: usize) -> usize {
    let staging = dir.join(".staging");
    let per_copy = copy_examples(&staging, usize::MAX);
    for copy in 0..copies {
        for class in std::fs::read_dir(&staging)
            .expect("staging")
            .filter_map(Result::ok)
        {
            let target = dir.join(class.file_name());
            std::fs::create_dir_all(&target).expect("mkdir");
            for file in std::fs::read_dir(class.path())
                .expect("class")
                .filter_map(Result::ok)
            {
                let name = format!("{copy:03}-{}", file.file_name().to_string_lossy());
                std::fs::copy(file.path(), target.join(name)).expect("copy");
            }
        }
    }
    per_copy * copies
}

/// A broker of a test's own, on a free port, started and stopped through the project's
/// scripts (`scripts/<name>-start.sh`, `-stop.sh`), so a test can stop and restart it
/// without touching the broker the other tests share. Stopped when dropped.
pub struct PrivateBroker {
    /// Script prefix: "kafka", "pubsub" or "redis".
    name: &'static str,
    /// The variable the scripts read the port from.
    port_var: &'static str,
    port: u16,
    /// More variables for the start script (e.g. `REDIS_ACL_FILE`).
    env: Vec<(String, String)>,
}

impl PrivateBroker {
    /// A broker for `backend` ("kafka", "pubsub" or "redis") on a free loopback port; not
    /// started.
    pub fn new(backend: &str) -> PrivateBroker {
        let (name, port_var) = match backend {
            "kafka" => ("kafka", "KAFKA_PORT"),
            "pubsub" => ("pubsub", "PUBSUB_PORT"),
            "redis" => ("redis", "REDIS_PORT"),
            other => panic!("no private broker for backend {other}"),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        PrivateBroker {
            name,
            port_var,
            port,
            env: Vec::new(),
        }
    }

    /// The same broker, its start script run with `name=value` too.
    pub fn with_env(mut self, name: &str, value: &str) -> PrivateBroker {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// `127.0.0.1:<port>`, for `KAFKA_BOOTSTRAP_SERVERS`, `PUBSUB_EMULATOR_HOST` or
    /// `REDIS_URL` (which takes a bare `host:port` too).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, action: &str) -> std::process::ExitStatus {
        let script = workspace_root().join(format!("scripts/{}-{action}.sh", self.name));
        Command::new(&script)
            .env(self.port_var, self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&self) {
        let status = self.script("start");
        assert!(status.success(), "{}-start.sh failed: {status}", self.name);
    }

    /// Stops it (its in-memory topics and messages are lost).
    pub fn stop(&self) {
        let status = self.script("stop");
        assert!(status.success(), "{}-stop.sh failed: {status}", self.name);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.script("stop");
    }
}

/// Writes `under.png` and `over.png` into `dir` for a broker limit of `limit` bytes per
/// message: an example image padded with zeros (after its end, which decoders ignore)
/// to 4 KiB less than the limit, so its request (file plus envelope) just fits, and to
/// one byte more than the limit, so it cannot. Returns their paths.
pub fn write_size_probes(dir: &Path, limit: usize) -> (PathBuf, PathBuf) {
    let example = std::fs::read_dir(workspace_root().join("examples/sneaker"))
        .expect("examples/sneaker")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "png"))
        .expect("an example PNG");
    let image = std::fs::read(&example).expect("read the example");
    std::fs::create_dir_all(dir).expect("mkdir");
    let padded = |name: &str, len: usize| {
        let mut bytes = image.clone();
        bytes.resize(len, 0);
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write probe");
        path
    };
    (
        padded("under.png", limit - 4096),
        padded("over.png", limit + 1),
    )
}

/// The rows of a JSON Lines results file (`--output x.jsonl`).
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Every file below `dir` (recursively), as paths relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir)
            .expect("list folder")
            .filter_map(Result::ok)
        {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(path.strip_prefix(root).expect("below root").to_path_buf());
            }
        }
    }
    let mut files = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut files);
    }
    files.sort();
    files
}
