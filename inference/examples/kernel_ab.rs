//! Development timing of the fast path, robust to a noisy machine: the best (shortest)
//! of many calls per batch size, beside the median. Figures for the README come from
//! `trainer bench` (medians); this is for comparing kernel variants quickly.
//!
//! `cargo run --release -p classifier-inference --example kernel_ab -- [MODEL_DIR] [SECONDS]`

use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or("models/fashion-mnist", String::as_str);
    let seconds: f64 = args.get(2).map_or(Ok(2.0), |s| s.parse())?;
    let clf = classifier_inference::Classifier::load(std::path::Path::new(dir))?;
    let len = clf.input_len();
    for batch in [1usize, 32, 512] {
        let inputs: Vec<f32> = (0..batch * len)
            .map(|i| ((i * 7919) % 255) as f32 / 255.0)
            .collect();
        let mut times = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs_f64(seconds) || times.len() < 5 {
            let t = Instant::now();
            std::hint::black_box(clf.predict(&inputs, batch)?);
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let best = batch as f64 / times[0];
        let median = batch as f64 / times[times.len() / 2];
        println!(
            "batch {batch}: best {best:.0} images/s, median {median:.0} ({} calls)",
            times.len()
        );
    }
    Ok(())
}
