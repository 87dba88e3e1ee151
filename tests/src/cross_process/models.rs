//! Models while serving: a new model swapped in mid-run (and a broken one refused), and
//! a server of several models that requests choose from by name.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::background_client::BackgroundClient;
use super::{stop, tail, wait_for_log_line, CaseRun};
use crate::parse_summary;

/// A copy of the shipped model in `dir`, its metadata saying `version`.
pub fn write_model_version(dir: &Path, version: &str) {
    crate::copy_shipped_model(dir, |meta| meta["version"] = version.into());
}

/// (model, model version) → results rows, from a client's results file.
fn models_in(results: &Path) -> BTreeMap<(String, String), usize> {
    let text = std::fs::read_to_string(results).expect("results file");
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("json line");
        let field = |name: &str| row[name].as_str().unwrap_or_default().to_string();
        *seen
            .entry((field("model"), field("model_version")))
            .or_insert(0) += 1;
    }
    seen
}

/// 5,000 requests; mid-run the server's model directory first gets truncated weights
/// (refused with a log line: the old model keeps serving), then a whole new model
/// (swapped in between batches). Nothing is lost or failed, and the replies before and
/// after the swap carry the old and the new version.
pub fn a_model_reload_mid_run_loses_nothing(backend_env: &[(String, String)]) {
    let mut run = CaseRun::new(backend_env, "reload");
    let model_dir = run.path("model");
    write_model_version(&model_dir, "1.0.0-before");
    run.set_env("CLASSIFIER_MODEL_DIR", &model_dir.to_string_lossy());
    run.set_env("CLASSIFIER_MODEL_POLL_MS", "100");
    let (total, folder) = run.many_images(25);
    assert!(total >= 5000, "at least 5,000 images ({total})");
    let server = run.start_server("server-reload");
    let log = run.server_log("server-reload");
    let results = run.path("results.jsonl");
    let results_arg = results.to_string_lossy().into_owned();
    // A small window keeps the run going long enough to swap models in its middle.
    let client = BackgroundClient::start(
        &[
            "classify",
            &folder,
            "--timeout",
            "300",
            "--window",
            "4",
            "--output",
            &results_arg,
        ],
        &run.env,
    );
    client.wait_for_answers(300, Duration::from_secs(120));

    let weights = model_dir.join("model.safetensors");
    let whole = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &whole[..whole.len() / 2]).expect("truncate");
    wait_for_log_line(&log, "refusing the new model", Duration::from_secs(30));
    write_model_version(&model_dir, "2.0.0-after");
    wait_for_log_line(&log, "model reloaded", Duration::from_secs(30));
    let answered_at_swap = client.answered();

    let (code, stdout) = client.finish_within(Duration::from_secs(300));
    let summary = parse_summary(&stdout);
    assert_eq!(code, 0, "{}", tail(&stdout));
    assert_eq!(
        (summary.classified, summary.errors, summary.unanswered),
        (total, 0, 0),
        "{}",
        tail(&stdout)
    );
    assert!(
        answered_at_swap < total,
        "the swap came after the run ({answered_at_swap} of {total} answered)"
    );
    let seen = models_in(&results);
    let name = "fashion-cnn".to_string();
    let before = seen
        .get(&(name.clone(), "1.0.0-before".into()))
        .copied()
        .unwrap_or(0);
    let after = seen
        .get(&(name, "2.0.0-after".into()))
        .copied()
        .unwrap_or(0);
    eprintln!("reload: {before} replies before the swap, {after} after ({answered_at_swap} answered at the swap)");
    assert_eq!(
        before + after,
        total,
        "only the two versions answered: {seen:?}"
    );
    assert!(before >= 300 && after > 0, "{seen:?}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(log_text.matches("model reloaded").count(), 1, "{log_text}");
    stop(server);
}

/// `--model NAME=DIR` twice: requests naming either model get that model's replies,
/// requests naming none get the first, and an unknown name is an `UNKNOWN_MODEL` error
/// listing the models served.
pub fn requests_choose_among_several_models(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "models");
    let (shirts, bags) = (run.path("shirts-model"), run.path("bags-model"));
    write_model_version(&shirts, "1.0.0-shirts");
    write_model_version(&bags, "1.0.0-bags");
    let shirts_arg = format!("shirts={}", shirts.display());
    let bags_arg = format!("bags={}", bags.display());
    let server = run.start_server_with(
        "server-models",
        &["--model", &shirts_arg, "--model", &bags_arg],
    );
    let classify = |model: Option<&str>, results: &str| {
        let results = run.path(results);
        let results_arg = results.to_string_lossy().into_owned();
        let mut args = vec![
            "classify",
            "examples",
            "--timeout",
            "90",
            "--output",
            &results_arg,
        ];
        if let Some(model) = model {
            args.extend(["--model-name", model]);
        }
        let (code, stdout, summary) = run.classify(&args);
        (code, stdout, summary, models_in(&results))
    };
    for (asked, served, version) in [
        (Some("bags"), "bags", "1.0.0-bags"),
        (None, "shirts", "1.0.0-shirts"),
    ] {
        let (code, stdout, summary, seen) = classify(asked, "results.jsonl");
        assert_eq!(code, 0, "{stdout}");
        assert_eq!(summary.classified, 200, "{stdout}");
        assert_eq!(
            seen,
            BTreeMap::from([((served.to_string(), version.to_string()), 200)]),
            "asked for {asked:?}"
        );
    }
    let (code, stdout, summary, _) = classify(Some("hats"), "unknown.jsonl");
    assert_eq!(code, 2, "{stdout}");
    assert_eq!((summary.classified, summary.errors), (0, 200), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("UNKNOWN_MODEL"))
        .unwrap_or_else(|| panic!("no UNKNOWN_MODEL line:\n{stdout}"));
    assert!(line.contains("shirts, bags"), "{line}");
    stop(server);
}
