//! The gateway over plain HTTP on the embedded broker (a real server in this process):
//! every refusal is a status with a JSON body, and the gateway keeps answering after
//! each. Raw HTTP/1.1 over TCP, so the tests can send what no well-behaved client would
//! (bodies larger than declared limits, slow bodies, slow headers).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use classifier_app::AppConfig;
use classifier_gateway::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::send;

/// A gateway on a free loopback port with small limits, its jobs kept in `data`.
async fn gateway(stop: &CancellationToken, data: &std::path::Path) -> Gateway {
    let mut config = AppConfig::default();
    config.gateway.data_dir = Some(data.to_path_buf());
    config.gateway.listen = "127.0.0.1:0".parse().expect("address");
    config.gateway.max_body_bytes = 1024 * 1024;
    config.gateway.max_images_per_request = 4;
    config.gateway.read_timeout_secs = 2;
    config.gateway.request_timeout_secs = 20;
    classifier_gateway::start(&config, stop.clone())
        .await
        .expect("gateway starts")
}

fn post(path: &str, body: &str) -> (String, Vec<u8>) {
    (
        format!(
            "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            body.len()
        ),
        body.as_bytes().to_vec(),
    )
}

fn infer_body(images: &[Vec<u8>]) -> String {
    let data: Vec<String> = images
        .iter()
        .map(|image| base64::engine::general_purpose::STANDARD.encode(image))
        .collect();
    serde_json::json!({
        "inputs": [{"name": "image", "shape": [images.len()], "datatype": "BYTES", "data": data}]
    })
    .to_string()
}

fn example_image() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bag/00018.png");
    std::fs::read(path).expect("example image")
}

/// The model's name, from the model list.
async fn model_name(addr: SocketAddr) -> String {
    let (status, body) = send(addr, "GET /v2/models HTTP/1.1", b"").await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    list["models"][0]["name"]
        .as_str()
        .expect("a model")
        .to_string()
}

fn assert_json_error(status: u16, body: &str, expected_status: u16, expected: &str) {
    assert_eq!(status, expected_status, "{body}");
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let message = json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {body}"));
    assert!(message.contains(expected), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_json_and_the_gateway_keeps_answering() {
    let stop = CancellationToken::new();
    let data = tempfile::tempdir().expect("data dir");
    let gateway = gateway(&stop, data.path()).await;
    let addr = gateway.addr;
    let name = model_name(addr).await;
    let infer = format!("/v2/models/{name}/infer");
    let image = example_image();

    // Body larger than allowed, declared, and not declared (chunked).
    let big = vec![b' '; 2 * 1024 * 1024];
    let (head, _) = post(&infer, "");
    let head = head.replace(
        "Content-Length: 0",
        &format!("Content-Length: {}", big.len()),
    );
    let (status, body) = send(addr, &head, b"").await;
    assert_json_error(status, &body, 413, "larger than");
    let mut chunked = format!("{:x}\r\n", big.len()).into_bytes();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let head = format!("POST {infer} HTTP/1.1\r\nTransfer-Encoding: chunked");
    let (status, body) = send(addr, &head, &chunked).await;
    assert_json_error(status, &body, 413, "larger than");

    // Too many images, malformed JSON, an unknown model, an unknown route, a bad image.
    let (head, body) = post(&infer, &infer_body(&vec![image.clone(); 5]));
    let (status, text) = send(addr, &head, &body).await;
    assert_json_error(status, &text, 413, "at most 4");
    let (head, body) = post(&infer, "{\"inputs\": [");
    let (status, text) = send(addr, &head, &body).await;
    assert_json_error(status, &text, 400, "not valid JSON");
    let (head, body) = post(
        "/v2/models/no-such-model/infer",
        &infer_body(std::slice::from_ref(&image)),
    );
    let (status, text) = send(addr, &head, &body).await;
    assert_json_error(status, &text, 404, "no-such-model");
    let (status, text) = send(addr, "GET /v3/anything HTTP/1.1", b"").await;
    assert_json_error(status, &text, 404, "no such route");
    let (head, body) = post(
        &infer,
        &infer_body(&[b"\x89PNG\r\n\x1a\n but not really".to_vec()]),
    );
    let (status, text) = send(addr, &head, &body).await;
    assert_json_error(status, &text, 400, "CORRUPT_IMAGE");
    let (status, text) = send(
        addr,
        &format!("GET /v2/models/{name}/versions/no-such-version HTTP/1.1"),
        b"",
    )
    .await;
    assert_json_error(status, &text, 404, "no version");

    // A body that stops arriving: 408 after the read timeout.
    let started = Instant::now();
    let (head, _) = post(&infer, "");
    let head = head.replace("Content-Length: 0", "Content-Length: 1000");
    let (status, text) = send(addr, &head, b"{\"inputs\"").await;
    assert_json_error(status, &text, 408, "did not arrive");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Headers that never end: the connection is closed after the read timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connects");
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("sent");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection with unfinished headers stays open"
    );

    // And it still answers, with the right class.
    let (head, body) = post(&infer, &infer_body(&[image]));
    let (status, text) = send(addr, &head, &body).await;
    assert_eq!(status, 200, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let label = json["outputs"][1]["data"][0].as_str().expect("label");
    assert_eq!(label, "Bag", "{text}");

    // The metrics saw all of it, by route pattern.
    let (status, metrics) = send(addr, "GET /metrics HTTP/1.1", b"").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"gateway_http_requests_total{code="413",route="/v2/models/{name}/infer"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gateway_images_total{outcome="CORRUPT_IMAGE"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_pending_images 0"), "{metrics}");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), gateway.wait())
        .await
        .expect("the gateway stops");
}

#[tokio::test]
async fn without_keys_it_will_not_listen_beyond_loopback() {
    let mut config = AppConfig::default();
    config.gateway.listen = "0.0.0.0:0".parse().expect("address");
    let error = match classifier_gateway::start(&config, CancellationToken::new()).await {
        Ok(_) => panic!("started without keys on every interface"),
        Err(error) => error,
    };
    assert!(error.to_string().contains("without API keys"), "{error:#}");
}
