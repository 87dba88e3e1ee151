//! What the gateway's tests share: raw HTTP/1.1 over TCP (so a test can send what no
//! well-behaved client would), multipart bodies, the example images.

#![allow(dead_code)] // Each test file uses a part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status, headers (lower-case names), body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One request on a fresh connection (`Connection: close`). The body is written while
/// the response is read: the gateway may answer (and close) before it took it all.
pub async fn request(addr: SocketAddr, head: &str, body: &[u8]) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connects");
    let (mut reader, mut writer) = stream.into_split();
    let mut bytes = format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes();
    bytes.extend_from_slice(body);
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        writer
    });
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut raw)).await;
    drop(writing.await);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Status and body of one request.
pub async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let reply = request(addr, head, body).await;
    (reply.status, reply.body)
}

/// A multipart form of `files` (name, bytes) under the field `files`, plus text fields;
/// the request head and body.
pub fn multipart(
    path: &str,
    files: &[(String, Vec<u8>)],
    fields: &[(&str, &str)],
) -> (String, Vec<u8>) {
    let boundary = "gateway-test-boundary-7d1c";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST {path} HTTP/1.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}",
        body.len()
    );
    (head, body)
}

/// The shipped examples: (class folder/file name, bytes), sorted.
pub fn examples() -> Vec<(String, Vec<u8>)> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let mut files = Vec::new();
    for class in std::fs::read_dir(&root).expect("examples") {
        let class = class.expect("entry").path();
        if !class.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&class).expect("class folder") {
            let file = file.expect("entry").path();
            let name = format!(
                "{}/{}",
                class.file_name().expect("name").to_string_lossy(),
                file.file_name().expect("name").to_string_lossy()
            );
            files.push((name, std::fs::read(&file).expect("example")));
        }
    }
    files.sort();
    files
}
