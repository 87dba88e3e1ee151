//! The binaries work from anywhere, as `cargo install` leaves them: no repository, no
//! `models/` beside them. The client is copied out of the target directory and run from
//! an empty working directory with an empty home, so it can only use what
//! `classifier_server::model_source` resolves: the built-in model, the per-user model
//! directory, or a directory named by `--model` / `CLASSIFIER_MODEL_DIR`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration_tests::{binary, copy_examples, parse_summary};

/// An installed client: the binary in its own `bin/`, an empty home and working
/// directory, and 2 example images per class.
struct Installed {
    root: tempfile::TempDir,
}

impl Installed {
    fn new() -> Installed {
        let root = tempfile::tempdir().expect("tempdir");
        for dir in ["bin", "home", "work", "images"] {
            std::fs::create_dir(root.path().join(dir)).expect("mkdir");
        }
        std::fs::copy(binary("client-app"), root.path().join("bin/client-app"))
            .expect("install the client");
        copy_examples(&root.path().join("images"), 2);
        Installed { root }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    /// `client-app classify <images>` with only `env` set besides `HOME` and `PATH`.
    fn classify(&self, extra_args: &[&str], env: &[(&str, &Path)]) -> Output {
        let images = self.path("images");
        Command::new(self.path("bin/client-app"))
            .arg("classify")
            .arg(&images)
            .args(extra_args)
            .current_dir(self.path("work"))
            .env_clear()
            .env("HOME", self.path("home"))
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("client-app runs")
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A copy of the shipped model whose class names all start with `prefix`, so the
/// output shows which model answered.
fn renamed_model(dir: &Path, prefix: &str) {
    integration_tests::copy_shipped_model(dir, |meta| {
        let names = meta["class_names"].as_array_mut().expect("class_names");
        for name in names.iter_mut() {
            *name = format!("{prefix}{}", name.as_str().expect("a name")).into();
        }
    });
}

#[test]
fn the_installed_client_uses_its_built_in_model_from_anywhere() {
    let installed = Installed::new();
    let output = installed.classify(&[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = parse_summary(&stdout(&output));
    assert_eq!((summary.files, summary.classified), (20, 20));
    let accuracy = summary.accuracy_percent.expect("accuracy line");
    assert!(accuracy >= 70.0, "the shipped model answered: {accuracy}%");
}

#[test]
fn a_model_in_the_per_user_directory_is_used_without_flags() {
    let installed = Installed::new();
    renamed_model(
        &installed.path("home/.local/share/image-classifier/model"),
        "user-",
    );
    let output = installed.classify(&[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert_eq!(parse_summary(&text).classified, 20);
    assert!(
        text.contains("→  user-"),
        "per-user model's classes: {text}"
    );
}

#[test]
fn a_named_model_directory_wins_over_the_per_user_one() {
    let installed = Installed::new();
    renamed_model(
        &installed.path("home/.local/share/image-classifier/model"),
        "user-",
    );
    let named = installed.path("named-model");
    renamed_model(&named, "named-");
    let by_flag = installed.classify(&["--model", &named.to_string_lossy()], &[]);
    assert!(by_flag.status.success(), "{}", stderr(&by_flag));
    assert!(
        stdout(&by_flag).contains("→  named-"),
        "{}",
        stdout(&by_flag)
    );
    let by_env = installed.classify(&[], &[("CLASSIFIER_MODEL_DIR", &named)]);
    assert!(by_env.status.success(), "{}", stderr(&by_env));
    assert!(stdout(&by_env).contains("→  named-"), "{}", stdout(&by_env));
}

#[test]
fn a_named_directory_without_a_model_is_a_clear_error() {
    let installed = Installed::new();
    let missing = installed.path("no-model-here");
    for output in [
        installed.classify(&["--model", &missing.to_string_lossy()], &[]),
        installed.classify(&[], &[("CLASSIFIER_MODEL_DIR", &missing)]),
    ] {
        assert!(!output.status.success());
        let error = stderr(&output);
        assert!(error.contains("cannot load the model from"), "{error}");
        assert!(error.contains(&*missing.to_string_lossy()), "{error}");
        assert!(error.contains("--model"), "{error}");
    }
}
