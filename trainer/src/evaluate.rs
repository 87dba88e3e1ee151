//! How well a model does, class by class: the confusion matrix of a labelled set and the
//! per-class precision and recall read off it, printed at the end of training and by
//! `trainer evaluate` (on Fashion-MNIST's test set or on a folder of class folders).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::bail;
use classifier_inference::{Classifier, Preprocessor};

use crate::data;

/// Images per call to the classifier when evaluating.
const EVAL_BATCH: usize = 500;

/// Counts of (true class, predicted class) over a labelled set, with the class names to
/// print them under. Row = true class, column = prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Display names, in the model's output order.
    pub class_names: Vec<String>,
    /// `confusion[truth][prediction]` = number of images.
    pub confusion: Vec<Vec<usize>>,
}

impl Evaluation {
    /// An empty matrix for these classes.
    pub fn new(class_names: Vec<String>) -> Self {
        let k = class_names.len();
        Evaluation {
            class_names,
            confusion: vec![vec![0; k]; k],
        }
    }

    /// Counts one image whose true class is `truth` and predicted class `prediction`
    /// (indices outside the class list are ignored: callers pass model outputs).
    pub fn record(&mut self, truth: usize, prediction: usize) {
        if let Some(cell) = self
            .confusion
            .get_mut(truth)
            .and_then(|row| row.get_mut(prediction))
        {
            *cell += 1;
        }
    }

    /// Number of images counted.
    pub fn total(&self) -> usize {
        self.confusion.iter().flatten().sum()
    }

    /// Number of images predicted as their true class.
    pub fn correct(&self) -> usize {
        (0..self.confusion.len())
            .map(|c| self.confusion[c][c])
            .sum()
    }

    /// Fraction of images predicted correctly (0 for an empty set).
    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / self.total().max(1) as f64
    }

    /// Images whose true class is `class`.
    pub fn support(&self, class: usize) -> usize {
        self.confusion[class].iter().sum()
    }

    /// Of the images of `class`, the fraction predicted as `class` (its accuracy);
    /// `None` when the set has no image of it.
    pub fn recall(&self, class: usize) -> Option<f64> {
        let n = self.support(class);
        (n > 0).then(|| self.confusion[class][class] as f64 / n as f64)
    }

    /// Of the images predicted as `class`, the fraction that are `class`; `None` when
    /// nothing was predicted as it.
    pub fn precision(&self, class: usize) -> Option<f64> {
        let predicted: usize = self.confusion.iter().map(|row| row[class]).sum();
        (predicted > 0).then(|| self.confusion[class][class] as f64 / predicted as f64)
    }

    /// The per-class table: images, recall (= the class's accuracy) and precision.
    pub fn per_class_table(&self) -> String {
        let name_width = self.name_width();
        let mut out = format!(
            "{:>3}  {:<name_width$}  {:>7}  {:>7}  {:>9}\n",
            "#", "class", "images", "recall", "precision"
        );
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
        for (c, name) in self.class_names.iter().enumerate() {
            out += &format!(
                "{c:>3}  {name:<name_width$}  {:>7}  {:>7}  {:>9}\n",
                self.support(c),
                pct(self.recall(c)),
                pct(self.precision(c)),
            );
        }
        out += &format!(
            "     {:<name_width$}  {:>7}  {:>7}\n",
            "all",
            self.total(),
            format!("{:.2}%", self.accuracy() * 100.0)
        );
        out
    }

    /// The confusion matrix: a row per true class, a column per predicted class (numbered
    /// as in [`Evaluation::per_class_table`]).
    pub fn confusion_table(&self) -> String {
        let name_width = self.name_width();
        let cell = self
            .confusion
            .iter()
            .flatten()
            .map(|n| n.to_string().len())
            .max()
            .unwrap_or(1)
            .max(self.class_names.len().saturating_sub(1).to_string().len())
            + 1;
        let mut out = format!("{:>3}  {:<name_width$} ", "", "true \\ predicted");
        for c in 0..self.class_names.len() {
            out += &format!("{c:>cell$}");
        }
        out.push('\n');
        for (t, name) in self.class_names.iter().enumerate() {
            out += &format!("{t:>3}  {name:<name_width$} ");
            for n in &self.confusion[t] {
                out += &format!("{n:>cell$}");
            }
            out.push('\n');
        }
        out
    }

    /// Width of the class-name column.
    fn name_width(&self) -> usize {
        self.class_names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max("true \\ predicted".len())
    }
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accuracy {:.2}% ({} of {} images)\n\nper class:\n{}\nconfusion matrix:\n{}",
            self.accuracy() * 100.0,
            self.correct(),
            self.total(),
            self.per_class_table(),
            self.confusion_table()
        )
    }
}

/// Index of the largest value (first one on ties); 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Runs `clf` over preprocessed `images` (`labels.len()` of them, concatenated) and counts
/// each prediction against its label (labels index the model's classes).
pub fn evaluate_inputs(
    clf: &Classifier,
    images: &[f32],
    labels: &[u32],
) -> anyhow::Result<Evaluation> {
    let mut eval = Evaluation::new(clf.metadata().class_names.clone());
    let len = clf.input_len();
    for (chunk, truth) in images
        .chunks(EVAL_BATCH * len)
        .zip(labels.chunks(EVAL_BATCH))
    {
        for (p, &t) in clf.predict(chunk, truth.len())?.iter().zip(truth) {
            eval.record(t as usize, argmax(p));
        }
    }
    Ok(eval)
}

/// Evaluates a saved model on Fashion-MNIST's t10k set, fed through the same
/// [`Preprocessor`] as the server uses (from the decoded test images, not the raw bytes).
pub fn evaluate_fashion_mnist(model_dir: &Path, data_dir: &Path) -> anyhow::Result<Evaluation> {
    let clf = Classifier::load(model_dir)?;
    let ds = data::load_fashion_mnist(data_dir)?;
    if clf.metadata().class_names.len() != data::FASHION_MNIST_CLASS_NAMES.len() {
        bail!(
            "the model has {} classes, Fashion-MNIST has 10",
            clf.metadata().class_names.len()
        );
    }
    let pre = Preprocessor::new(clf.metadata());
    let mut inputs = Vec::with_capacity(ds.test.n * pre.input_len());
    for i in 0..ds.test.n {
        pre.append_input(
            &image::DynamicImage::ImageLuma8(ds.test.gray_image(i)),
            &mut inputs,
        );
    }
    let labels: Vec<u32> = ds.test.labels.iter().map(|&l| l as u32).collect();
    evaluate_inputs(&clf, &inputs, &labels)
}

/// The result of evaluating on a folder: the counts, and the files that were not images.
#[derive(Debug)]
pub struct FolderEvaluation {
    /// Counts over the readable images.
    pub evaluation: Evaluation,
    /// Files that could not be decoded (not counted).
    pub skipped: Vec<PathBuf>,
}

/// Evaluates a saved model on a folder of class folders. Each folder must be named like one
/// of the model's classes (its folder name or display name); a model class with no folder
/// just has no images. A folder that matches no class is an error naming the known ones.
pub fn evaluate_image_folder(model_dir: &Path, dir: &Path) -> anyhow::Result<FolderEvaluation> {
    let clf = Classifier::load(model_dir)?;
    let meta = clf.metadata();
    let pre = Preprocessor::new(meta);
    let folder = data::load_image_folder(dir, &pre)?;
    let mut to_model = Vec::with_capacity(folder.class_dirs.len());
    for name in &folder.class_dirs {
        let found = meta
            .class_dirs
            .iter()
            .position(|d| d == name)
            .or_else(|| meta.class_names.iter().position(|n| n == name));
        match found {
            Some(i) => to_model.push(i as u32),
            None => bail!(
                "folder {name:?} in {} is not a class of model {} (its classes: {})",
                dir.display(),
                meta.name,
                meta.class_dirs.join(", ")
            ),
        }
    }
    let labels: Vec<u32> = folder
        .data
        .labels
        .iter()
        .map(|&l| to_model[l as usize])
        .collect();
    Ok(FolderEvaluation {
        evaluation: evaluate_inputs(&clf, &folder.data.images, &labels)?,
        skipped: folder.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("class-{i}")).collect()
    }

    #[test]
    fn counts_precision_and_recall() {
        let mut e = Evaluation::new(names(3));
        // truth 0: 3 right, 1 as class 1; truth 1: 2 right; truth 2: none.
        for (t, p) in [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 1)] {
            e.record(t, p);
        }
        e.record(7, 0); // out of range: ignored
        assert_eq!((e.total(), e.correct()), (6, 5));
        assert!((e.accuracy() - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(e.recall(0), Some(0.75));
        assert_eq!(e.precision(1), Some(2.0 / 3.0));
        assert_eq!(e.recall(2), None);
        assert_eq!(e.precision(2), None);
        assert_eq!(e.confusion[0], vec![3, 1, 0]);
    }

    #[test]
    fn tables_show_every_class_and_cell() {
        let mut e = Evaluation::new(vec!["cat".into(), "dog".into()]);
        for (t, p) in [(0, 0), (0, 1), (1, 1), (1, 1), (1, 1)] {
            e.record(t, p);
        }
        let per_class = e.per_class_table();
        assert!(per_class.contains("cat"), "{per_class}");
        assert!(per_class.contains("50.00%"), "{per_class}");
        assert!(per_class.contains("100.00%"), "{per_class}");
        assert!(per_class.contains("80.00%"), "{per_class}");
        let matrix = e.confusion_table();
        let rows: Vec<Vec<&str>> = matrix
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            vec![vec!["0", "cat", "1", "1"], vec!["1", "dog", "0", "3"]]
        );
        assert!(e.to_string().starts_with("accuracy 80.00% (4 of 5 images)"));
    }

    #[test]
    fn argmax_picks_first_max() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), 1);
        assert_eq!(argmax(&[]), 0);
    }
}
