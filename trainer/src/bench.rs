//! `trainer bench`: how fast the model runs on this machine, as tables of medians.
//!
//! - **peak**: the machine's float32 FMA peak at the SIMD level the kernels run at
//!   ([`classifier_inference::simd::fma_peak_gflops`]: a tight loop of independent FMA
//!   chains on every thread at once), and at the other levels the CPU has;
//! - **inference**: [`Classifier::predict`] images/s at several batch sizes, the achieved
//!   GFLOP/s (FLOPs per image counted from the architecture) and its share of that peak;
//! - **peer** (with `--peer`): ONNX Runtime on the same CNN shape (`scripts/ort-peer.sh`),
//!   timed between two rounds of ours at every SIMD level asked for, and the ratios;
//! - **agreement**: the fast inference path against candle's reference forward pass on
//!   real test images (argmax agreement, largest probability difference);
//! - **training**: images/s of real training steps (augmentation, forward, backward,
//!   AdamW) on Fashion-MNIST, extrapolated to seconds per 60,000-image epoch;
//! - **decode**: decode + preprocess cost per image for a 28×28 PNG and a 640×480 JPEG,
//!   with the `image` decoders and the [`Preprocessor`] the server uses (the server's
//!   own safe-decoding wrapper is measured by `client-app bench`).
//!
//! Every figure is the median of `runs` runs; each run repeats its work for at least
//! `min_seconds`. The machine's load average is printed, since other work skews numbers.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use classifier_inference::simd::{fma_peak_gflops, SimdLevel};
use image::{DynamicImage, ImageFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use classifier_inference::{Classifier, Preprocessor};

use crate::data;
use crate::evaluate;
use crate::train::{self, TrainConfig};

/// What `trainer bench` measures, and how long.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Model directory (model.safetensors + metadata.json).
    pub model: PathBuf,
    /// Fashion-MNIST idx files; without them inference uses random inputs and the
    /// training benchmark is skipped.
    pub fashion_mnist: Option<PathBuf>,
    /// Repetitions of each measurement (the median is printed).
    pub runs: usize,
    /// Minimum seconds of work per inference / decode run.
    pub min_seconds: f64,
    /// Inference batch sizes.
    pub batch_sizes: Vec<usize>,
    /// Training steps (batches of 128) per training run; 0 skips training.
    pub train_batches: usize,
    /// Also time candle's reference forward pass at every batch size, for the speed-up.
    pub candle_reference: bool,
    /// Parts to run, any of "peak" (alias "ceiling"), "inference", "agreement",
    /// "training", "decode"; empty runs them all. The peer comparison runs whenever
    /// `peer` is set.
    pub sections: Vec<String>,
    /// The ONNX Runtime peer: a command taking comma-separated batch sizes and printing
    /// `ort batch B: N images/s` lines (`scripts/ort-peer.sh`); `None` skips the peer.
    pub peer: Option<PathBuf>,
    /// SIMD levels timed beside the peer (unsupported ones fall back, and are said to);
    /// empty: every level the CPU supports.
    pub simd_levels: Vec<SimdLevel>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            model: PathBuf::from("models/fashion-mnist"),
            fashion_mnist: None,
            runs: 5,
            min_seconds: 0.3,
            batch_sizes: vec![1, 8, 32, 128, 512],
            train_batches: 60,
            candle_reference: true,
            sections: Vec::new(),
            peer: None,
            simd_levels: Vec::new(),
        }
    }
}

/// Median of a list of measurements (NaN for none).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Repeats `work` (which reports how many items it did) for at least `min_seconds`;
/// returns items per second.
fn rate(min_seconds: f64, mut work: impl FnMut() -> anyhow::Result<usize>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut items = 0usize;
    loop {
        items += work()?;
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= min_seconds {
            return Ok(items as f64 / elapsed);
        }
    }
}

/// CPU time (user + system) this process used so far, in seconds, from `/proc/self/stat`
/// (100 ticks per second); NaN where that file does not exist.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / 100.0
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs every benchmark and prints the tables on stdout.
pub fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    let runs = opts.runs.max(1);
    let wants = |name: &str| opts.sections.is_empty() || opts.sections.iter().any(|s| s == name);
    let clf = Classifier::load(&opts.model)?;
    let meta = clf.metadata().clone();
    let threads = rayon::current_num_threads();
    println!(
        "trainer bench: model {} ({} {}), {} rayon threads, SIMD level {} (CPU supports up to {}), {} runs per figure (medians), load average before: {}",
        opts.model.display(),
        meta.name,
        meta.version,
        threads,
        clf.simd_level(),
        SimdLevel::detected(),
        runs,
        load_average()
    );
    if let Some(cpu) = cpu_model() {
        println!("CPU: {cpu}");
    }
    let dataset = match &opts.fashion_mnist {
        Some(dir) => Some(data::load_fashion_mnist(dir).context("loading Fashion-MNIST")?),
        None => None,
    };
    let pre = Preprocessor::new(&meta);
    let len = clf.input_len();
    let max_batch = opts.batch_sizes.iter().copied().max().unwrap_or(1);
    let pool_images = max_batch.max(1000);
    let inputs: Vec<f32> = match &dataset {
        Some(ds) if meta.input_channels == 1 => {
            let mut v = Vec::with_capacity(pool_images * len);
            for i in 0..pool_images {
                let img = DynamicImage::ImageLuma8(ds.test.gray_image(i % ds.test.n));
                pre.append_input(&img, &mut v);
            }
            v
        }
        _ => {
            let mut rng = StdRng::seed_from_u64(7);
            (0..pool_images * len)
                .map(|_| rng.random_range(-1.0f32..2.0))
                .collect()
        }
    };

    // ---- FMA peak ----
    let flops = clf.flops_per_image();
    let level = clf.simd_level();
    let peak = if wants("peak") || wants("ceiling") {
        fma_peak(level, runs, opts.min_seconds)
    } else {
        f64::NAN
    };
    println!("Architecture: {}", meta.architecture);
    // No bound to quote where the peak was not measured (`--only` left it out).
    let bound = if peak.is_nan() {
        String::new()
    } else {
        format!(
            " → at the {level} FMA peak of {peak:.1} GFLOP/s: {:.0} images/s",
            peak * 1e9 / flops as f64
        )
    };
    println!(
        "Model FLOPs per image (multiply-adds ×2 of the convolutions and linear layers, from the architecture): {:.3} MFLOP{bound}",
        flops as f64 / 1e6
    );

    // ---- inference ----
    if wants("inference") {
        inference(&clf, &inputs, opts, peak, flops)?;
    }

    // ---- ONNX Runtime beside ours ----
    if let Some(command) = &opts.peer {
        peer(&clf, &inputs, opts, command)?;
    }

    // ---- agreement with the candle reference ----
    if let Some(ds) = dataset.as_ref().filter(|_| wants("agreement")) {
        if meta.input_channels == 1 {
            agreement(&clf, ds, &pre)?;
        }
    }

    // ---- training ----
    if wants("training") {
        match (&dataset, opts.train_batches) {
            (Some(ds), b) if b > 0 => training(ds, runs, b)?,
            _ => {
                println!();
                println!("(training benchmark skipped: needs --fashion-mnist DIR and --train-batches > 0)");
            }
        }
    }

    // ---- decode ----
    if wants("decode") {
        decode(&pre, dataset.as_ref(), runs, opts.min_seconds)?;
    }
    println!();
    println!("load average after: {}", load_average());
    Ok(())
}

/// The inference table: the fast path ([`Classifier::predict`]) and, measured in the same
/// runs for a ratio that load does not skew, candle's reference forward pass.
fn inference(
    clf: &Classifier,
    inputs: &[f32],
    opts: &BenchOptions,
    peak: f64,
    flops: u64,
) -> anyhow::Result<()> {
    let runs = opts.runs.max(1);
    let len = clf.input_len();
    let pool_images = inputs.len() / len;
    println!();
    println!(
        "## Inference at {} (model only; candle = the reference forward pass through candle tensors, same runs)",
        clf.simd_level()
    );
    println!();
    println!(
        "| batch | images/s | ms per batch | GFLOP/s | % of FMA peak | CPU µs per image | candle images/s | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut best = (0usize, 0f64);
    for &batch in &opts.batch_sizes {
        let batch = batch.max(1).min(pool_images);
        let mut offset = 0usize;
        let mut next = || {
            if offset + batch > pool_images {
                offset = 0;
            }
            offset += batch;
            &inputs[(offset - batch) * len..offset * len]
        };
        let mut fast = || -> anyhow::Result<usize> {
            std::hint::black_box(clf.predict(next(), batch)?);
            Ok(batch)
        };
        fast()?; // warm-up: thread pools, buffers
        let mut fast_rates = Vec::new();
        let mut candle_rates = Vec::new();
        let mut cpu_per_image = Vec::new();
        for _ in 0..runs {
            let cpu = cpu_seconds();
            let start = Instant::now();
            let r = rate(opts.min_seconds, &mut fast)?;
            let images = r * start.elapsed().as_secs_f64();
            cpu_per_image.push((cpu_seconds() - cpu) / images * 1e6);
            fast_rates.push(r);
            if opts.candle_reference {
                let x = &inputs[..batch * len];
                candle_rates.push(rate(opts.min_seconds, || {
                    std::hint::black_box(clf.predict_candle(x, batch)?);
                    Ok(batch)
                })?);
            }
        }
        let ips = median(&fast_rates);
        let gflops = ips * flops as f64 / 1e9;
        if ips > best.1 {
            best = (batch, ips);
        }
        let (candle, ratio) = if candle_rates.is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let c = median(&candle_rates);
            (format!("{c:.0}"), format!("{:.2}×", ips / c))
        };
        println!(
            "| {batch} | {ips:.0} | {:.3} | {gflops:.1} | {} | {:.0} | {candle} | {ratio} |",
            batch as f64 * 1e3 / ips,
            share_of_peak(gflops, peak),
            median(&cpu_per_image)
        );
    }
    println!();
    println!(
        "Best: {:.0} images/s at batch {} ({} of the FMA peak)",
        best.1,
        best.0,
        share_of_peak(best.1 * flops as f64 / 1e9, peak)
    );
    Ok(())
}

/// `gflops` as a percentage of `peak`, or "–" where the peak was not measured.
fn share_of_peak(gflops: f64, peak: f64) -> String {
    if peak.is_nan() {
        "–".to_string()
    } else {
        format!("{:.1}%", 100.0 * gflops / peak)
    }
}

/// Prints the FMA peak table (the kernels' level on all threads and on one, then the
/// CPU's other levels on all threads) and returns the peak at `level` on all threads, in
/// GFLOP/s: the median of `runs` runs of `min_seconds` each.
fn fma_peak(level: SimdLevel, runs: usize, min_seconds: f64) -> f64 {
    let threads = rayon::current_num_threads();
    let duration = Duration::from_secs_f64(min_seconds.max(0.05));
    let measure = |l: SimdLevel, one: bool| {
        let rates: Vec<f64> = (0..runs)
            .map(|_| {
                if one {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .map(|p| p.install(|| fma_peak_gflops(l, duration)))
                        .unwrap_or(f64::NAN)
                } else {
                    fma_peak_gflops(l, duration)
                }
            })
            .collect();
        median(&rates)
    };
    let peak = measure(level, false);
    println!();
    println!("## Machine peak: float32 FMA (a tight loop of independent FMA chains on every thread at once)");
    println!();
    println!("| SIMD level | threads | GFLOP/s |");
    println!("|---|---|---|");
    println!("| {level} (the kernels' level) | {threads} | {peak:.1} |");
    if threads > 1 {
        println!("| {level} | 1 | {:.1} |", measure(level, true));
    }
    for other in SimdLevel::supported().into_iter().rev() {
        if other != level {
            println!("| {other} | {threads} | {:.1} |", measure(other, false));
        }
    }
    println!();
    peak
}

/// The CPU's model name from `/proc/cpuinfo` (`None` where there is none).
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Rates (images/s) of `runs` runs of [`Classifier::predict`] on batches of `batch`
/// images taken in turn from `inputs`, each run at least `min_seconds` long.
fn predict_rates(
    clf: &Classifier,
    inputs: &[f32],
    batch: usize,
    runs: usize,
    min_seconds: f64,
) -> anyhow::Result<Vec<f64>> {
    let len = clf.input_len();
    let pool_images = inputs.len() / len;
    let batch = batch.max(1).min(pool_images);
    let mut offset = 0usize;
    let mut work = || -> anyhow::Result<usize> {
        if offset + batch > pool_images {
            offset = 0;
        }
        offset += batch;
        std::hint::black_box(clf.predict(&inputs[(offset - batch) * len..offset * len], batch)?);
        Ok(batch)
    };
    work()?; // warm-up: thread pools, buffers
    (0..runs).map(|_| rate(min_seconds, &mut work)).collect()
}

/// Runs the peer `command` for one batch size and returns its images/s.
fn peer_rate(command: &std::path::Path, batch: usize) -> anyhow::Result<f64> {
    let out = Command::new(command)
        .arg(batch.to_string())
        .output()
        .with_context(|| format!("running the peer {}", command.display()))?;
    if !out.status.success() {
        bail!(
            "the peer {} failed ({}): {}",
            command.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_peer_line(&stdout, batch).with_context(|| {
        format!(
            "no `ort batch {batch}: N images/s` line in the output of {}: {}",
            command.display(),
            stdout.trim()
        )
    })
}

/// The images/s of the `ort batch {batch}: N images/s` line of the peer's output.
pub fn parse_peer_line(output: &str, batch: usize) -> Option<f64> {
    let prefix = format!("ort batch {batch}:");
    output.lines().find_map(|l| {
        l.trim()
            .strip_prefix(&prefix)?
            .trim()
            .strip_suffix("images/s")?
            .trim()
            .parse()
            .ok()
    })
}

/// ONNX Runtime beside ours: for each batch size, ours at every level asked for, then
/// the peer, then ours again (the medians pool both rounds, so load that comes and goes
/// skews both sides alike), and the ratios ours / ORT.
fn peer(
    clf: &Classifier,
    inputs: &[f32],
    opts: &BenchOptions,
    command: &std::path::Path,
) -> anyhow::Result<()> {
    let runs = opts.runs.max(1);
    let mut levels: Vec<SimdLevel> = if opts.simd_levels.is_empty() {
        SimdLevel::supported().into_iter().rev().collect()
    } else {
        opts.simd_levels.clone()
    };
    levels.dedup();
    let ours: Vec<Classifier> = levels.iter().map(|&l| clf.with_simd_level(l)).collect();
    for (asked, c) in levels.iter().zip(&ours) {
        if c.simd_level() != *asked {
            println!(
                "(this CPU lacks {asked}: that column runs at {})",
                c.simd_level()
            );
        }
    }
    println!();
    println!(
        "## Peer: ONNX Runtime on the same CNN shape ({}), ours timed before and after it",
        command.display()
    );
    println!();
    let mut header = "| batch | ORT images/s |".to_string();
    let mut rule = "|---|---|".to_string();
    for c in &ours {
        header += &format!(" ours {0} images/s | {0} / ORT |", c.simd_level());
        rule += "---|---|";
    }
    println!("{header}");
    println!("{rule}");
    for &batch in &opts.batch_sizes {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); ours.len()];
        for (r, c) in rates.iter_mut().zip(&ours) {
            r.extend(predict_rates(c, inputs, batch, runs, opts.min_seconds)?);
        }
        let ort = peer_rate(command, batch)?;
        for (r, c) in rates.iter_mut().zip(&ours) {
            r.extend(predict_rates(c, inputs, batch, runs, opts.min_seconds)?);
        }
        let mut row = format!("| {batch} | {ort:.0} |");
        for r in &rates {
            let m = median(r);
            row += &format!(" {m:.0} | {:.2}× |", m / ort);
        }
        println!("{row}");
    }
    println!();
    println!("load average after the peer: {}", load_average());
    Ok(())
}

/// Compares the fast inference path with candle's reference forward pass on the test set.
fn agreement(clf: &Classifier, ds: &data::FashionMnist, pre: &Preprocessor) -> anyhow::Result<()> {
    let n = ds.test.n;
    let mut inputs = Vec::with_capacity(n * pre.input_len());
    for i in 0..n {
        pre.append_input(
            &DynamicImage::ImageLuma8(ds.test.gray_image(i)),
            &mut inputs,
        );
    }
    let fast = clf.predict(&inputs, n)?;
    let reference = clf.predict_candle(&inputs, n)?;
    let mut same = 0usize;
    let mut correct = 0usize;
    let mut max_diff = 0f32;
    for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
        let af = evaluate::argmax(f);
        if af == evaluate::argmax(r) {
            same += 1;
        }
        if af == ds.test.labels[i] as usize {
            correct += 1;
        }
        for (a, b) in f.iter().zip(r) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    println!();
    println!(
        "Agreement with candle's reference forward pass on the {n} test images: same class for {same}/{n}, largest probability difference {max_diff:.2e}; test accuracy {:.2}%",
        100.0 * correct as f64 / n as f64
    );
    Ok(())
}

/// Times real training steps and extrapolates to one Fashion-MNIST epoch.
fn training(ds: &data::FashionMnist, runs: usize, batches: usize) -> anyhow::Result<()> {
    let norm = data::gray_normalization(&ds.train.pixels);
    let full = ds.train.to_dataset(&norm);
    let cfg = TrainConfig {
        epochs: Some(1),
        ..TrainConfig::default()
    };
    let images = (batches * cfg.batch_size).min(full.len());
    let mut rates = Vec::new();
    for r in 0..runs {
        let start = (r * images) % full.len().saturating_sub(images).max(1);
        let indices: Vec<usize> = (start..start + images).collect();
        let subset = full.subset(&indices);
        let mut seconds = f64::NAN;
        train::train_net(&subset, None, 10, &cfg, |s| seconds = s.seconds)?;
        rates.push(images as f64 / seconds);
    }
    let ips = median(&rates);
    println!();
    println!(
        "## Training at {} ({} steps of {} images per run: augmentation, forward, backward, AdamW)",
        classifier_inference::simd_level(),
        images.div_ceil(cfg.batch_size),
        cfg.batch_size
    );
    println!();
    println!("| images/s | s per 60,000-image epoch |");
    println!("|---|---|");
    println!("| {ips:.0} | {:.1} |", 60_000.0 / ips);
    Ok(())
}

/// A 640×480 RGB test "photo": smooth gradients, a few shapes and sensor-like noise, so
/// the JPEG has realistic entropy.
fn synthetic_photo(w: u32, h: u32) -> image::RgbImage {
    let mut rng = StdRng::seed_from_u64(3);
    image::RgbImage::from_fn(w, h, |x, y| {
        let fx = x as f32 / w as f32;
        let fy = y as f32 / h as f32;
        let disc = ((fx - 0.5).powi(2) + (fy - 0.45).powi(2)).sqrt() < 0.2;
        let base = if disc {
            [200.0, 60.0 + 80.0 * fy, 40.0]
        } else {
            [90.0 + 100.0 * fx, 120.0 + 60.0 * fy, 180.0 - 90.0 * fx]
        };
        let n: f32 = rng.random_range(-12.0..12.0);
        image::Rgb(base.map(|v: f32| (v + n).clamp(0.0, 255.0) as u8))
    })
}

/// Decodes `bytes` the way the server does (format sniffed, decoder limits set) and
/// preprocesses the image into `out`.
fn decode_preprocess(bytes: &[u8], pre: &Preprocessor, out: &mut Vec<f32>) -> anyhow::Result<()> {
    let format = image::guess_format(bytes)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    let img = reader.decode()?;
    out.clear();
    pre.append_input(&img, out);
    Ok(())
}

/// Decode + preprocess cost per image for a 28×28 PNG and a 640×480 JPEG.
fn decode(
    pre: &Preprocessor,
    ds: Option<&data::FashionMnist>,
    runs: usize,
    min_seconds: f64,
) -> anyhow::Result<()> {
    let gray = match ds {
        Some(ds) => ds.test.gray_image(0),
        None => image::GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * 9 + y * 3) as u8])),
    };
    let mut png = Vec::new();
    DynamicImage::ImageLuma8(gray).write_to(&mut Cursor::new(&mut png), ImageFormat::Png)?;
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&synthetic_photo(640, 480))?;
    println!();
    println!("## Decode + preprocess (one thread, per image)");
    println!();
    println!("| input | bytes | decode + preprocess µs | decode only µs | images/s per core |");
    println!("|---|---|---|---|---|");
    for (name, bytes) in [("28×28 PNG", &png), ("640×480 JPEG (q85)", &jpeg)] {
        let mut out = Vec::new();
        let full = median(
            &(0..runs)
                .map(|_| {
                    rate(min_seconds, || {
                        decode_preprocess(bytes, pre, &mut out)?;
                        Ok(1)
                    })
                })
                .collect::<anyhow::Result<Vec<f64>>>()?,
        );
        let only = median(
            &(0..runs)
                .map(|_| {
                    rate(min_seconds, || {
                        std::hint::black_box(image::load_from_memory(bytes)?);
                        Ok(1)
                    })
                })
                .collect::<anyhow::Result<Vec<f64>>>()?,
        );
        println!(
            "| {name} | {} | {:.1} | {:.1} | {full:.0} |",
            bytes.len(),
            1e6 / full,
            1e6 / only
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_lines_are_parsed_per_batch() {
        let out = "ort batch 1: 7602 images/s\nort batch 32: 16175 images/s\n";
        assert_eq!(parse_peer_line(out, 1), Some(7602.0));
        assert_eq!(parse_peer_line(out, 32), Some(16175.0));
        assert_eq!(parse_peer_line(out, 3), None);
        assert_eq!(parse_peer_line("ort batch 1: fast images/s", 1), None);
    }
}
