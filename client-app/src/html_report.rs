//! `--report report.html`: one self-contained HTML page about a job, for people who
//! would rather look than read: the summary, the confusion matrix as a coloured grid,
//! per-class precision and recall, the least confident predictions as thumbnails, and
//! the errors. Everything is inline (styles, and thumbnails as `data:` PNGs), so the
//! file can be mailed or archived on its own.

use std::fmt::Write as _;
use std::io::Cursor;
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;

use crate::job::{FileOutcome, FileResult, JobReport};
use crate::report::{Accuracy, Counts};

/// How many of the least confident predictions are shown with thumbnails.
pub const LOW_CONFIDENCE_SHOWN: usize = 24;

/// Thumbnails are scaled to fit this many pixels a side.
const THUMBNAIL_PX: u32 = 64;

/// Files larger than this get no thumbnail (they are not read again for the report).
const THUMBNAIL_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Writes the report for `report` (with `accuracy` when the folders name the classes).
pub fn write_html_report(
    report: &JobReport,
    accuracy: Option<&Accuracy>,
    path: &Path,
) -> anyhow::Result<()> {
    std::fs::write(path, render(report, accuracy))
        .with_context(|| format!("cannot write the report {}", path.display()))
}

/// The page, as a string.
pub fn render(report: &JobReport, accuracy: Option<&Accuracy>) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Classification report · job {}</title><style>{STYLE}</style></head><body>\n",
        escape(&report.job_id)
    );
    summary(&mut page, report, accuracy);
    if let Some(accuracy) = accuracy {
        confusion(&mut page, accuracy);
        per_class(&mut page, accuracy);
    }
    let classes = accuracy.map_or(&[][..], |a| a.classes.as_slice());
    low_confidence(&mut page, report, classes);
    errors(&mut page, report);
    page.push_str("</body></html>\n");
    page
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;\
padding:0 1em;color:#1d2330;background:#fafbfc}h1{font-size:1.6em;margin-bottom:.2em}\
h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #dde1e7;padding-bottom:.2em}\
.sub{color:#5b6474}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}\
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:.6em 1em;min-width:8em}\
.card b{display:block;font-size:1.5em}.ok b{color:#1a7f37}.bad b{color:#cf222e}.warn b{color:#9a6700}\
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #dde1e7;padding:.3em .55em;\
text-align:right}th{background:#f0f2f5;font-weight:600}td.l,th.l{text-align:left}\
.cm td{min-width:2.6em;text-align:center}.cm th.rot{writing-mode:vertical-rl;transform:rotate(180deg);\
text-align:left;padding:.5em .3em}.bar{display:inline-block;height:.7em;background:#4c8dd6;\
border-radius:2px;vertical-align:middle;margin-right:.4em}.grid{display:flex;flex-wrap:wrap;gap:.8em}\
.tile{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:.5em;width:10.5em;font-size:.85em}\
.tile img{width:64px;height:64px;image-rendering:pixelated;display:block;margin:0 auto .3em;\
background:#eee;object-fit:contain}.tile .f{word-break:break-all;color:#5b6474}\
.wrong{border-color:#cf222e}.code{font-family:ui-monospace,monospace;color:#cf222e}";

fn summary(page: &mut String, report: &JobReport, accuracy: Option<&Accuracy>) {
    let counts = Counts::of(report);
    let seconds = report.elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        (counts.classified + counts.failed) as f64 / seconds
    } else {
        0.0
    };
    let _ = write!(
        page,
        "<h1>Classification report</h1><div class=\"sub\">job {} · {} files in {seconds:.2} s \
         ({rate:.0} images/s)</div><div class=\"cards\">",
        escape(&report.job_id),
        counts.files
    );
    let mut card = |class: &str, value: String, label: &str| {
        let _ = write!(
            page,
            "<div class=\"card {class}\"><b>{value}</b>{label}</div>"
        );
    };
    card("ok", counts.classified.to_string(), "classified");
    let failed_class = if counts.failed > 0 { "bad" } else { "" };
    card(failed_class, counts.failed.to_string(), "errors");
    let unanswered_class = if counts.unanswered > 0 { "warn" } else { "" };
    card(
        unanswered_class,
        counts.unanswered.to_string(),
        "unanswered",
    );
    card(
        "",
        report.duplicate_replies.to_string(),
        "duplicate replies",
    );
    if report.rejected_replies > 0 {
        card(
            "bad",
            report.rejected_replies.to_string(),
            "rejected replies (not from this job)",
        );
    }
    if let Some(accuracy) = accuracy {
        card(
            "ok",
            format!("{:.1}%", accuracy.ratio() * 100.0),
            &format!("accuracy ({} labelled)", accuracy.total),
        );
    }
    page.push_str("</div>\n");
}

fn confusion(page: &mut String, accuracy: &Accuracy) {
    page.push_str(
        "<h2>Confusion matrix</h2><p class=\"sub\">Rows: the folder (true class); columns: \
         the prediction. Green: right, red: wrong; the stronger, the larger the share of \
         the row.</p><table class=\"cm\"><tr><th class=\"l\">true ╲ predicted</th>",
    );
    for class in &accuracy.classes {
        let _ = write!(page, "<th class=\"rot\">{}</th>", escape(class));
    }
    page.push_str("</tr>");
    for (t, row) in accuracy.matrix.iter().enumerate() {
        let total: usize = row.iter().sum();
        let _ = write!(
            page,
            "<tr><th class=\"l\">{}</th>",
            escape(&accuracy.classes[t])
        );
        for (p, &count) in row.iter().enumerate() {
            let share = if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            };
            let (r, g, b) = if t == p { (26, 127, 55) } else { (207, 34, 46) };
            // Off-diagonal cells are scaled up: a 5% confusion should be visible.
            let alpha = if t == p {
                share
            } else {
                (share * 4.0).min(1.0)
            };
            let ink = if alpha > 0.55 { "#fff" } else { "#1d2330" };
            let shown = if count == 0 {
                String::new()
            } else {
                count.to_string()
            };
            let _ = write!(
                page,
                "<td style=\"background:rgba({r},{g},{b},{alpha:.3});color:{ink}\" \
                 title=\"{count} of {total}\">{shown}</td>"
            );
        }
        page.push_str("</tr>");
    }
    page.push_str("</table>\n");
}

fn per_class(page: &mut String, accuracy: &Accuracy) {
    page.push_str(
        "<h2>Per class</h2><table><tr><th class=\"l\">class</th><th>files</th>\
         <th>precision</th><th>recall</th><th>F1</th></tr>",
    );
    let n = accuracy.classes.len();
    for (c, class) in accuracy.classes.iter().enumerate() {
        let truth: usize = accuracy.matrix[c].iter().sum();
        let predicted: usize = (0..n).map(|t| accuracy.matrix[t][c]).sum();
        let hit = accuracy.matrix[c][c];
        let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
        let (precision, recall) = (ratio(hit, predicted), ratio(hit, truth));
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            _ => None,
        };
        let _ = write!(
            page,
            "<tr><td class=\"l\">{}</td><td>{truth}</td>{}{}{}</tr>",
            escape(class),
            bar_cell(precision),
            bar_cell(recall),
            bar_cell(f1)
        );
    }
    page.push_str("</table>\n");
}

fn bar_cell(value: Option<f64>) -> String {
    match value {
        Some(v) => format!(
            "<td class=\"l\"><span class=\"bar\" style=\"width:{:.1}em\"></span>{:.1}%</td>",
            v * 5.0,
            v * 100.0
        ),
        None => "<td>–</td>".into(),
    }
}

/// The least confident predictions as tiles; a tile is framed red when its folder names
/// one of `classes` (the model's, as far as the accuracy knows them) and the prediction
/// is another: folders that name no class (`holiday/`, `2024-05/`) mark nothing.
fn low_confidence(page: &mut String, report: &JobReport, classes: &[String]) {
    let mut classified: Vec<(&FileResult, &str, f32)> = report
        .results
        .iter()
        .filter_map(|r| match &r.outcome {
            FileOutcome::Classified { top_k, .. } => top_k
                .first()
                .map(|best| (r, best.class_name.as_str(), best.probability)),
            _ => None,
        })
        .collect();
    if classified.is_empty() {
        return;
    }
    classified.sort_by(|a, b| a.2.total_cmp(&b.2));
    let _ = write!(
        page,
        "<h2>Least confident predictions</h2><p class=\"sub\">The {} classified images the \
         model was least sure of; a red frame marks a prediction that disagrees with the \
         class its folder names.</p><div class=\"grid\">",
        classified.len().min(LOW_CONFIDENCE_SHOWN)
    );
    let known: std::collections::HashSet<String> = classes
        .iter()
        .map(|c| crate::report::normalize_class(c))
        .collect();
    for (result, class, probability) in classified.into_iter().take(LOW_CONFIDENCE_SHOWN) {
        let folder = result.input.folder.as_deref();
        let wrong = folder.is_some_and(|f| {
            let f = crate::report::normalize_class(f);
            known.contains(&f) && f != crate::report::normalize_class(class)
        });
        let image = match thumbnail(&result.input.path) {
            Some(png) => format!("<img alt=\"\" src=\"data:image/png;base64,{png}\">"),
            None => "<img alt=\"(no preview)\">".into(),
        };
        let truth = folder.map_or(String::new(), |f| format!("<br>folder: {}", escape(f)));
        let _ = write!(
            page,
            "<div class=\"tile{}\">{image}<b>{}</b> {:.1}%{truth}<div class=\"f\">{}</div></div>",
            if wrong { " wrong" } else { "" },
            escape(class),
            probability * 100.0,
            escape(&result.input.display_name)
        );
    }
    page.push_str("</div>\n");
}

fn errors(page: &mut String, report: &JobReport) {
    let failed: Vec<&FileResult> = report
        .results
        .iter()
        .filter(|r| !matches!(r.outcome, FileOutcome::Classified { .. }))
        .collect();
    if failed.is_empty() {
        return;
    }
    let _ = write!(
        page,
        "<h2>Errors and unanswered ({})</h2><table><tr><th class=\"l\">file</th>\
         <th class=\"l\">code</th><th class=\"l\">reason</th></tr>",
        failed.len()
    );
    for result in failed {
        let (code, reason) = match &result.outcome {
            FileOutcome::Failed { code, reason } => (code.as_str(), reason.as_str()),
            _ => ("UNANSWERED", "no reply before the timeout"),
        };
        let _ = write!(
            page,
            "<tr><td class=\"l\">{}</td><td class=\"l code\">{}</td><td class=\"l\">{}</td></tr>",
            escape(&result.input.display_name),
            escape(code),
            escape(reason)
        );
    }
    page.push_str("</table>\n");
}

/// The image at `path` scaled to fit [`THUMBNAIL_PX`], as base64 PNG; `None` if it is
/// gone (moved by `--sort-into --move`), too large, or not decodable.
fn thumbnail(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > THUMBNAIL_MAX_FILE_BYTES {
        return None;
    }
    let mut reader = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(8192);
    limits.max_image_height = Some(8192);
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    let image = reader.decode().ok()?;
    let small = if image.width() > THUMBNAIL_PX || image.height() > THUMBNAIL_PX {
        image.thumbnail(THUMBNAIL_PX, THUMBNAIL_PX)
    } else {
        image
    };
    let mut png = Vec::new();
    small
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(png))
}

/// `text` safe inside HTML elements and double-quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::failure::FailureCode;
    use crate::inputs::InputFile;
    use crate::job::classified;
    use classifier_proto::ErrorCode;

    fn result(name: &str, folder: &str, outcome: FileOutcome, path: PathBuf) -> FileResult {
        FileResult {
            input: InputFile {
                path,
                display_name: name.into(),
                folder: Some(folder.into()),
                relative: PathBuf::from(name),
            },
            request_id: format!("r-{name}"),
            outcome,
            server_id: "s".into(),
            latency: Some(Duration::from_millis(3)),
        }
    }

    /// A job's report of `results`, with nothing else to tell.
    fn report_of(job_id: &str, results: Vec<FileResult>) -> JobReport {
        JobReport {
            job_id: job_id.into(),
            results,
            duplicate_replies: 0,
            rejected_replies: 0,
            elapsed: Duration::from_secs(1),
            answered_by: Default::default(),
        }
    }

    #[test]
    fn the_page_shows_matrix_classes_thumbnails_and_escaped_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let png = dir.path().join("a.png");
        image::GrayImage::from_pixel(28, 28, image::Luma([200]))
            .save(&png)
            .expect("png");
        let report = report_of(
            "job-1",
            vec![
                result("cat/a.png", "cat", classified("cat", 0.51), png),
                result(
                    "dog/b.png",
                    "dog",
                    classified("cat", 0.97),
                    dir.path().join("gone.png"),
                ),
                result(
                    "x/<evil>.png",
                    "x",
                    FileOutcome::Failed {
                        code: FailureCode::Server(ErrorCode::CorruptImage),
                        reason: "bad \"bytes\" & more".into(),
                    },
                    dir.path().join("x.png"),
                ),
            ],
        );
        let accuracy = crate::report::accuracy(&report, &["cat".into(), "dog".into()]);
        let page = render(&report, accuracy.as_ref());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<h2>Confusion matrix</h2>"), "{page}");
        assert!(page.contains("<h2>Per class</h2>"));
        assert!(page.contains("50.0%"), "accuracy card: {page}");
        assert_eq!(
            page.matches("data:image/png;base64,").count(),
            1,
            "one readable image"
        );
        assert!(
            page.contains("(no preview)"),
            "a missing file has no thumbnail"
        );
        assert!(
            page.contains("tile wrong"),
            "dog predicted as cat is marked"
        );
        assert!(page.contains("x/&lt;evil&gt;.png"));
        assert!(page.contains("bad &quot;bytes&quot; &amp; more"));
        assert!(!page.contains("<evil>"));
        // The least confident comes first.
        let (a, b) = (page.find("51.0%"), page.find("97.0%"));
        assert!(a.is_some() && a < b, "{page}");
    }

    #[test]
    fn folders_that_name_no_class_frame_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = report_of(
            "job-2",
            vec![
                result(
                    "holiday/a.png",
                    "holiday",
                    classified("cat", 0.6),
                    dir.path().join("a"),
                ),
                result(
                    "2024-05/b.png",
                    "2024-05",
                    classified("dog", 0.7),
                    dir.path().join("b"),
                ),
            ],
        );
        let accuracy = crate::report::accuracy(&report, &["cat".into(), "dog".into()]);
        let page = render(&report, accuracy.as_ref());
        assert_eq!(page.matches("class=\"tile\"").count(), 2, "{page}");
        assert!(!page.contains("tile wrong"), "{page}");
    }
}
