//! Jobs over HTTP on the embedded broker (a real server in the gateway's process), with
//! results in SQLite, and in PostgreSQL when `GATEWAY_POSTGRES_URL` names a server
//! (`REQUIRE_POSTGRES=1` makes its absence a failure): upload, progress, results paged
//! as JSON lines and CSV, the report, cancel and delete; archives and their limits; and
//! the binary killed with SIGKILL mid-job and started again finishes the job with every
//! file answered once.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use classifier_app::AppConfig;
use classifier_gateway::Gateway;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use common::{examples, multipart, request, send};

fn config(data: &Path, database_url: Option<String>) -> AppConfig {
    let mut config = AppConfig::default();
    config.gateway.listen = "127.0.0.1:0".parse().expect("address");
    config.gateway.data_dir = Some(data.to_path_buf());
    config.gateway.database_url = database_url;
    config.gateway.max_job_files = 40;
    config.gateway.max_archive_expansion_bytes = 1024 * 1024;
    config
}

async fn start(config: &AppConfig, stop: &CancellationToken) -> Gateway {
    classifier_gateway::start(config, stop.clone())
        .await
        .expect("gateway starts")
}

/// The job's JSON once it is no longer running.
async fn finished(addr: SocketAddr, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = request(addr, &format!("GET /v1/jobs/{id} HTTP/1.1"), b"").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let job = reply.json();
        if job["state"] != "running" {
            return job;
        }
        assert!(Instant::now() < deadline, "job still running: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Upload, progress, paged results, report, delete: the whole life of a job.
async fn a_job_lives_and_dies(database_url: Option<String>) {
    let data = tempfile::tempdir().expect("data dir");
    let stop = CancellationToken::new();
    let gateway = start(&config(data.path(), database_url), &stop).await;
    let addr = gateway.addr;

    let mut files: Vec<(String, Vec<u8>)> = examples().into_iter().step_by(10).collect();
    files.push(("notes.txt".to_string(), b"not an image".to_vec()));
    files.push(("../../etc/passwd".to_string(), files[0].1.clone()));
    let (head, body) = multipart("/v1/jobs", &files, &[]);
    let created = request(addr, &head, &body).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let id = created.json()["id"].as_str().expect("id").to_string();
    assert_eq!(
        created.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );

    let job = finished(addr, &id).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["files"], 22);
    assert_eq!(job["classified"], 21, "{job}");
    assert_eq!(job["errors"], 1, "{job}");
    assert_eq!(job["progress"], 1.0);

    // JSON lines, paged; every file once, in upload order, the right class.
    let mut rows = Vec::new();
    let mut offset = 0;
    loop {
        let page = request(
            addr,
            &format!("GET /v1/jobs/{id}/results?limit=8&offset={offset} HTTP/1.1"),
            b"",
        )
        .await;
        assert_eq!(page.status, 200, "{}", page.body);
        rows.extend(
            page.body
                .lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("row")),
        );
        match page.header("x-next-offset") {
            Some(next) => offset = next.parse().expect("offset"),
            None => break,
        }
    }
    assert_eq!(rows.len(), 22);
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row["index"], index as i64);
        assert_eq!(row["file"], files[index].0.as_str());
    }
    let wrong: Vec<_> = rows[..20]
        .iter()
        .filter(|row| {
            let folder = row["file"]
                .as_str()
                .expect("file")
                .split('/')
                .next()
                .expect("folder");
            let class = row["predicted_class"].as_str().unwrap_or_default();
            folder.replace('-', "") != class.to_lowercase().replace(['-', ' ', '/'], "")
        })
        .collect();
    assert!(
        wrong.len() <= 3,
        "more than 3 of 20 examples misclassified: {wrong:?}"
    );
    assert_eq!(rows[20]["error_code"], "UNSUPPORTED_FORMAT", "{}", rows[20]);
    assert_eq!(
        rows[21]["status"], "classified",
        "a name is only a name: {}",
        rows[21]
    );
    assert!(!data.path().join("etc").exists() && !Path::new("/etc/passwd.png").exists());

    let csv = request(
        addr,
        &format!("GET /v1/jobs/{id}/results?format=csv HTTP/1.1"),
        b"",
    )
    .await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.body
            .starts_with("index,file,size,status,predicted_class"),
        "{}",
        csv.body
    );
    assert_eq!(csv.body.lines().count(), 23);

    let report = request(addr, &format!("GET /v1/jobs/{id}/report HTTP/1.1"), b"").await;
    assert_eq!(report.status, 200);
    assert!(report.body.contains("<!DOCTYPE html>") && report.body.contains(&id));
    assert!(
        report.body.contains("UNSUPPORTED_FORMAT"),
        "the report lists the error"
    );

    let (_, metrics) = send(addr, "GET /metrics HTTP/1.1", b"").await;
    assert!(
        metrics.contains("gateway_jobs{state=\"done\"} 1"),
        "{metrics}"
    );
    let listed = request(addr, "GET /v1/jobs HTTP/1.1", b"").await.json();
    assert_eq!(listed["jobs"][0]["id"], id.as_str());

    let (status, _) = send(addr, &format!("DELETE /v1/jobs/{id} HTTP/1.1"), b"").await;
    assert_eq!(status, 204);
    let (status, _) = send(addr, &format!("GET /v1/jobs/{id} HTTP/1.1"), b"").await;
    assert_eq!(status, 404);
    assert!(
        !data.path().join("spool").join(&id).exists(),
        "its files are gone"
    );
    let (status, _) = send(addr, "GET /v1/jobs/..%2F..%2Fetc HTTP/1.1", b"").await;
    assert_eq!(status, 404);

    stop.cancel();
    gateway.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_lives_and_dies_in_sqlite() {
    a_job_lives_and_dies(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_lives_and_dies_in_postgresql() {
    let Some(admin_url) = std::env::var("GATEWAY_POSTGRES_URL").ok() else {
        assert!(
            std::env::var("REQUIRE_POSTGRES").is_err(),
            "REQUIRE_POSTGRES is set but GATEWAY_POSTGRES_URL is not"
        );
        eprintln!(
            "skipped: set GATEWAY_POSTGRES_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
        );
        return;
    };
    let database = format!("gateway_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("connects to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&mut admin)
        .await
        .expect("creates a database");
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(base, _)| base);
    a_job_lives_and_dies(Some(format!("{base}/{database}"))).await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drops the database");
}

fn zip_of(entries: &[(String, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in entries {
        writer.start_file(name.as_str(), options).expect("entry");
        writer.write_all(bytes).expect("bytes");
    }
    writer.finish().expect("zip").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_are_expanded_within_their_limits() {
    let data = tempfile::tempdir().expect("data dir");
    let stop = CancellationToken::new();
    let gateway = start(&config(data.path(), None), &stop).await;
    let addr = gateway.addr;
    let images: Vec<_> = examples().into_iter().take(5).collect();

    // A zip as the body, and a tar in a form.
    let zip = zip_of(&images, zip::CompressionMethod::Stored);
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nContent-Type: application/zip\r\nContent-Length: {}",
        zip.len()
    );
    let created = request(addr, &head, &zip).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let job = finished(addr, created.json()["id"].as_str().expect("id")).await;
    assert_eq!(
        (job["files"].clone(), job["classified"].clone()),
        (5.into(), 5.into()),
        "{job}"
    );

    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in &images {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, bytes.as_slice())
            .expect("entry");
    }
    let tar = tar.into_inner().expect("tar");
    let (head, body) = multipart("/v1/jobs", &[("photos.tar".to_string(), tar)], &[]);
    let created = request(addr, &head, &body).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let job = finished(addr, created.json()["id"].as_str().expect("id")).await;
    assert_eq!(job["classified"], 5, "{job}");

    // A zip bomb: 4 MiB of zeros in a few KiB, against a 1 MiB expansion limit.
    let bomb = zip_of(
        &[("zeros.png".to_string(), vec![0; 4 << 20])],
        zip::CompressionMethod::Deflated,
    );
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nContent-Type: application/zip\r\nContent-Length: {}",
        bomb.len()
    );
    let refused = request(addr, &head, &bomb).await;
    assert_eq!(refused.status, 413, "{}", refused.body);
    assert!(
        refused.json()["error"]
            .as_str()
            .expect("error")
            .contains("expands"),
        "{}",
        refused.body
    );

    // Too many files, an empty upload, a body that is no upload.
    let many: Vec<_> = examples().into_iter().take(41).collect();
    let (head, body) = multipart("/v1/jobs", &many, &[]);
    let refused = request(addr, &head, &body).await;
    assert_eq!(refused.status, 413, "{}", refused.body);
    let (head, body) = multipart("/v1/jobs", &[], &[("model", "")]);
    assert_eq!(request(addr, &head, &body).await.status, 400);
    let head = "POST /v1/jobs HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2";
    assert_eq!(request(addr, head, b"hi").await.status, 415);

    // Nothing of the refused uploads is left in the spool (removed in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(data.path().join("spool"))
            .expect("spool")
            .collect();
        if left.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only the two jobs' folders: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stop.cancel();
    gateway.wait().await;
}

/// The binary, on the embedded broker, its jobs in `data`; and its address.
fn spawn_gateway(data: &Path) -> (Child, SocketAddr) {
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\njob_window = 32\n",
            data.to_string_lossy()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_classifier-gateway"))
        .env("CLASSIFIER_CONFIG", &config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("gateway runs");
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("stdout");
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') {
        use std::io::Read;
        if stdout.read(&mut byte).expect("reads") == 0 {
            panic!("the gateway ended before listening: {line:?}");
        }
        line.push(byte[0] as char);
    }
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_job_finishes_it_after_a_restart() {
    let data = tempfile::tempdir().expect("data dir");
    let (mut first, addr) = spawn_gateway(data.path());
    let files: Vec<(String, Vec<u8>)> = (0..30)
        .flat_map(|copy| {
            examples()
                .into_iter()
                .map(move |(name, bytes)| (format!("{copy}/{name}"), bytes))
        })
        .collect();
    let total = files.len() as i64;
    let (head, body) = multipart("/v1/jobs", &files, &[]);
    let created = request(addr, &head, &body).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let id = created.json()["id"].as_str().expect("id").to_string();

    // Kill it once some, not all, are answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let answered_at_kill = loop {
        let job = request(addr, &format!("GET /v1/jobs/{id} HTTP/1.1"), b"")
            .await
            .json();
        let answered = job["answered"].as_i64().expect("answered");
        if answered > 0 {
            first.kill().expect("SIGKILL");
            break answered;
        }
        assert!(Instant::now() < deadline, "nothing answered: {job}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    first.wait().expect("reaped");
    assert!(
        answered_at_kill < total,
        "the job ended before the kill; make it larger"
    );

    let (mut second, addr) = spawn_gateway(data.path());
    let job = finished(addr, &id).await;
    let results = request(
        addr,
        &format!("GET /v1/jobs/{id}/results?limit=10000 HTTP/1.1"),
        b"",
    )
    .await;
    second.kill().expect("stopped");
    second.wait().expect("reaped");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["classified"], total, "{job}");
    let indexes: Vec<i64> = results
        .body
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("row"))
        .inspect(|row| assert_eq!(row["status"], "classified", "{row}"))
        .map(|row| row["index"].as_i64().expect("index"))
        .collect();
    assert_eq!(
        indexes,
        (0..total).collect::<Vec<_>>(),
        "every file once, in order"
    );
}
