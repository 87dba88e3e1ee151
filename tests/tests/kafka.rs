//! End to end over Kafka: `classifier-server` and `client-app` as separate
//! processes. Needs `KAFKA_BOOTSTRAP_SERVERS` (scripts/test.sh starts the broker and sets it).

use integration_tests::cross_process::backend_env;

fn env() -> Option<Vec<(String, String)>> {
    backend_env("kafka", "KAFKA_BOOTSTRAP_SERVERS")
}

integration_tests::cross_process_tests!(env(), "KAFKA_BOOTSTRAP_SERVERS");

/// A SASL login the broker refuses (Tansu offers no SASL: the handshake fails) is a
/// final error that says why, and the password given in `KAFKA_SASL_PASSWORD` appears
/// nowhere in the client's output, debug logs included.
#[test]
fn a_refused_sasl_login_is_clear_and_keeps_the_password_out_of_the_output() {
    let Some(mut env) = env() else { return };
    const PASSWORD: &str = "sasl-pw-5e1d9c";
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("sasl.toml");
    std::fs::write(
        &config,
        "[broker]\nbackend = \"kafka\"\n[broker.properties]\n\
         \"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n",
    )
    .expect("config");
    for (name, value) in [
        ("CLASSIFIER_CONFIG", config.to_string_lossy().into_owned()),
        ("KAFKA_SASL_USERNAME", "classifier".to_string()),
        ("KAFKA_SASL_PASSWORD", PASSWORD.to_string()),
        ("RUST_LOG", "debug".to_string()),
    ] {
        env.push((name.into(), value));
    }
    let examples = integration_tests::workspace_root().join("examples/bag");
    let output = integration_tests::run_client_within(
        &["classify", &examples.to_string_lossy(), "--timeout", "5"],
        &env,
        std::time::Duration::from_secs(120),
    )
    .expect("the client ends on a refused login");
    let text = integration_tests::output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("SASL"),
        "the error names the SASL refusal:\n{text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "the password is in the output:\n{text}"
    );
}

/// `client-app bench` on Kafka prints the requests its clients (and its in-process
/// server) sent, by type, from librdkafka's own statistics: produce requests and
/// fetches happened, each produce request carried messages, and the floor has its
/// column. The figures themselves are for release builds (docs/benchmarks.md).
#[test]
fn bench_counts_the_kafka_requests_per_image_by_type() {
    let Some(env) = env() else { return };
    let examples = integration_tests::workspace_root().join("examples");
    let output = integration_tests::run_client_within(
        &[
            "bench",
            "--input",
            &examples.to_string_lossy(),
            "--images",
            "200",
            "--runs",
            "1",
            "--latency-images",
            "2",
        ],
        &env,
        std::time::Duration::from_secs(240),
    )
    .expect("the bench ends");
    let text = integration_tests::output_text(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("## Kafka requests per 1,000 images"),
        "no requests table:\n{text}"
    );
    let row = |name: &str| -> Vec<f64> {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name} row:\n{text}"));
        line.split('|')
            .skip(2)
            .filter_map(|cell| cell.trim().parse().ok())
            .collect()
    };
    for name in ["Produce", "Fetch", "messages per Produce request"] {
        let cells = row(name);
        assert_eq!(cells.len(), 2, "end to end and floor for {name}:\n{text}");
        assert!(cells.iter().all(|v| *v > 0.0), "{name}: {cells:?}\n{text}");
    }
    // Two messages per image are produced (the request and its reply), so at most
    // 2,000 produce requests per 1,000 images.
    assert!(row("Produce")[0] <= 2_000.0, "{text}");
}
