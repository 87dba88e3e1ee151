//! Images/s of a model directory's engine (ONNX or native) at several batch sizes, model
//! only (preprocessed inputs, no decoding), the way the server's model thread calls it:
//!
//!     cargo run --release -p classifier-inference --example onnx-bench -- DIR [SECS] [BATCH..]
//!
//! Defaults: 3 seconds per batch size, batches 1 8 32. Load time (which includes the
//! engine's optimisation) is reported apart. Besides images/s, the CPU time per image:
//! on a machine shared with other work it is the steadier figure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use classifier_inference::Classifier;

/// CPU time (user + system) of this process so far, from /proc (Linux only): on a
/// shared machine, CPU ms per image say more than images/s.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // After the command: state is field 3, utime 14 and stime 15 (1-based) → 11, 12.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .context("usage: onnx-bench DIR [SECS] [BATCH..]")?,
    );
    let secs: f64 = args.next().map_or(Ok(3.0), |s| s.parse()).context("SECS")?;
    let batches: Vec<usize> = args
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .context("BATCH")?;
    let batches = if batches.is_empty() {
        vec![1, 8, 32]
    } else {
        batches
    };

    let started = Instant::now();
    let classifier = Classifier::load(&dir)?;
    let loaded = started.elapsed();
    let meta = classifier.metadata();
    println!(
        "{} ({}): {}",
        meta.name,
        classifier.engine_name(),
        meta.architecture
    );
    println!(
        "load {:.0} ms; {:.2} GFLOP/image; {} threads available",
        loaded.as_secs_f64() * 1e3,
        classifier.flops_per_image() as f64 / 1e9,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let len = classifier.input_len();
    for batch in batches {
        let inputs: Vec<f32> = (0..batch * len)
            .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        classifier.predict(&inputs, batch)?;
        let (mut runs, begin, cpu_begin) = (0u64, Instant::now(), cpu_seconds());
        while begin.elapsed() < Duration::from_secs_f64(secs) {
            std::hint::black_box(classifier.predict(&inputs, batch)?);
            runs += 1;
        }
        let elapsed = begin.elapsed().as_secs_f64();
        let images = runs as f64 * batch as f64;
        let cpu = cpu_seconds().zip(cpu_begin).map(|(end, start)| end - start);
        println!(
            "batch {batch:>3}: {:>8.1} images/s ({:.2} ms per batch, {runs} runs){}",
            images / elapsed,
            elapsed * 1e3 / runs as f64,
            cpu.map_or(String::new(), |cpu| format!(
                "; {:.2} CPU ms per image, {:.2} cores busy",
                cpu * 1e3 / images,
                cpu / elapsed
            ))
        );
    }
    Ok(())
}
