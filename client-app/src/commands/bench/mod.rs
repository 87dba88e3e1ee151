//! `client-app bench`: end-to-end speed through the configured broker.
//!
//! Sends the images of a folder (the shipped `examples/` by default), repeated up to the
//! requested count if there are fewer, through [`run_job`] — the same
//! code path as `classify` — optionally writing the results file as it goes
//! (`--output`), and reports medians over several runs of:
//!
//! - a **throughput** run: many images with a large window (requests in flight);
//! - a **latency** run at low load: one image at a time (window 1);
//! - the server's safe decoding cost per image ([`classifier_server::decode`]);
//! - the peak resident memory of this process (`VmHWM`);
//! - the **transport floor** ([`floor`]): the same runs through the same broker with the
//!   same messages but nothing done in between, so end to end can be read as a share of
//!   what the broker allows;
//! - **CPU per 1,000 images** of this process and of the broker, when the broker runs on
//!   this machine ([`cpu`]).
//!
//! On a broker that lives only in this process (the embedded one) the server
//! necessarily runs in this process. On Kafka or Pub/Sub an in-process
//! [`ModelServer`](classifier_server::ModelServer) connected to the real broker is started too,
//! unless `--external-server` says servers are already running; the output says which.
//! With an in-process server the peak memory is that of client and server together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::process::ExitCode;

use classifier_app::{
    cancel_on_signals, connect_with_retry, AppConfig, DecodeLimits, ServerConfig,
};
use classifier_server::decode::decode_image;
use classifier_server::load_classifier;
use tokio_util::sync::CancellationToken;
use unified_broker::SubscribeOptions;

mod cpu;
mod floor;
mod requests;

use super::{Common, ServerFlags};
use crate::inputs::{collect_inputs, InputFile};
use crate::job::{run_job, FileOutcome, JobOptions, JobReport, NoProgress};
use crate::InProcessServer;

/// What `client-app bench` does.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Folder (or files) of images to send, repeated as needed.
    #[arg(long, default_value = "examples")]
    pub input: PathBuf,
    /// Images per throughput run.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Requests in flight in the throughput runs (the client's default window).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Images per latency run (sent one at a time).
    #[arg(long, default_value_t = 200)]
    pub latency_images: usize,
    /// Runs of each kind (medians are printed).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Do not start an in-process server on Kafka / Pub/Sub: servers already run.
    #[arg(long)]
    pub external_server: bool,
    /// The servers' request topic and the in-process server's model.
    #[command(flatten)]
    pub server: ServerFlags,
    /// Write each run's results to FILE as they arrive, as `classify --output` does
    /// (rewritten per run), so the figures include that cost. With an `--input` folder
    /// of at least `--images` distinct files (`scripts/make-bench-folder.py`), a
    /// throughput run is then what `classify DIR --output FILE` does.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Skip the transport-floor runs (the same hops with no model).
    #[arg(long)]
    pub no_floor: bool,
    /// The broker's process, for its CPU time; by default the process listening on the
    /// configured broker port, when that is on this machine.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Option<u32>,
}

/// Median of a list (NaN for none).
fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// The `q`-quantile (nearest rank) of a list (NaN for none).
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// A memory figure of this process from `/proc/self/status` (e.g. `VmHWM`), in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// One run's figures: images/s, latency p50 and p99 in ms, files not classified.
struct RunFigures {
    images_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: usize,
}

fn figures(report: &JobReport) -> RunFigures {
    let latencies: Vec<f64> = report
        .results
        .iter()
        .filter_map(|r| r.latency.map(|l| l.as_secs_f64() * 1e3))
        .collect();
    RunFigures {
        images_per_second: report.results.len() as f64 / report.elapsed.as_secs_f64(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        failures: report
            .results
            .iter()
            .filter(|r| !matches!(r.outcome, FileOutcome::Classified { .. }))
            .count(),
    }
}

/// One measured job: `files` through [`run_job`], the rows written to `output` on a
/// thread of their own as they arrive if given.
async fn measured_job(
    broker: &Arc<dyn unified_broker::Broker>,
    files: Vec<InputFile>,
    options: &JobOptions,
    output: Option<&std::path::Path>,
) -> anyhow::Result<JobReport> {
    let Some(path) = output else {
        return run_job(Arc::clone(broker), files, options, &NoProgress).await;
    };
    let mut writer = crate::report::ResultsWriter::create(path, false)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        for burst in crate::report::bursts(&rx) {
            for result in &burst {
                writer.write(result)?;
            }
            writer.flush()?;
        }
        writer.finish()
    });
    // No display: what `classify --quiet --output` does.
    let progress = super::classify::Tee {
        display: Box::new(NoProgress),
        results: Some(tx),
    };
    let report = run_job(Arc::clone(broker), files, options, &progress).await;
    drop(progress); // ends the writer's loop
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the results writer panicked"))??;
    report
}

/// The request topic of a bench that starts its own server on a shared broker: `base`
/// and a random suffix. Servers already serving `base` then take none of the bench's
/// requests (they would skew its figures and answer its images), and the bench's server
/// none of theirs; nor does it meet what earlier runs left in the group's subscription
/// (on the Pub/Sub emulator, a stopped server's stream that the emulator still hands
/// messages to, which stalled a second bench run for as long as the ack deadline).
fn own_request_topic(base: &str) -> String {
    let id = crate::job::new_request_id();
    format!("{base}-bench-{}", &id[..id.len().min(8)])
}

/// Deletes the bench's own request topic and its server group's subscription once its
/// server has stopped (on Kafka a topic deleted under a live member was seen to crash
/// librdkafka). Failures are logged, not fatal: the figures are already printed.
async fn remove_request_topic(broker: &dyn unified_broker::Broker, server: &ServerConfig) {
    let (topic, group) = (&server.request_topic, &server.group);
    if let Err(error) = broker.delete_subscription(topic, group).await {
        tracing::debug!(topic, group, %error, "deleting the bench's server subscription failed");
    }
    if let Err(error) = broker.delete_topic(topic).await {
        tracing::warn!(topic, %error, "deleting the bench's request topic failed; delete it by hand");
    }
}

/// `files` repeated (in order) up to `n` entries.
fn repeat(files: &[InputFile], n: usize) -> Vec<InputFile> {
    files.iter().cycle().take(n).cloned().collect()
}

/// `client-app bench`: the config as for `classify`, then the benchmark; stops early on
/// SIGINT/SIGTERM.
pub async fn bench(common: &Common, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let mut config = common.config()?;
    config.apply_server_flags(&args.server)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    run(config, args, &shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the benchmark and prints its tables.
async fn run(
    mut config: AppConfig,
    args: &BenchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let files: Vec<InputFile> = collect_inputs(std::slice::from_ref(&args.input))?;
    anyhow::ensure!(!files.is_empty(), "no files under {}", args.input.display());
    config
        .broker
        .enable_transport_statistics(requests::INTERVAL);
    let backend = config.broker.backend().to_string();
    let broker = connect_with_retry(&config.broker, shutdown).await?;
    let in_process = broker.features().in_process_only || !args.external_server;
    let own_topic =
        in_process && !broker.features().in_process_only && args.server.request_topic.is_none();
    if own_topic {
        config.server.request_topic = own_request_topic(&config.server.request_topic);
    }
    let mut server = None;
    let mut stats = None;
    if in_process {
        let started = InProcessServer::start(&broker, &config.server).await?;
        stats = Some(started.stats());
        server = Some(started);
    }
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!(
        "client-app bench: broker {backend}; server {}; {} input files from {}; {} runs per figure (medians); load average before: {load}",
        match (in_process, own_topic) {
            (true, true) => format!(
                "in this process (ModelServer on the same broker), on a request topic of its own ({}, deleted at the end)",
                config.server.request_topic
            ),
            (true, false) => "in this process (ModelServer on the same broker)".to_string(),
            (false, _) => "external (already running)".to_string(),
        },
        files.len(),
        args.input.display(),
        args.runs.max(1),
    );
    let inputs = if files.len() >= args.images {
        "the throughput run sends distinct files".to_string()
    } else {
        format!(
            "the throughput run repeats the {} files (scripts/make-bench-folder.py makes a folder of distinct ones)",
            files.len()
        )
    };
    let rows = match &args.output {
        Some(path) => format!("results written to {} as they arrive", path.display()),
        None => "no results file (--output writes one, as classify does)".to_string(),
    };
    println!("inputs: {inputs}; {rows}");
    println!(
        "model kernels: SIMD level {} (CPU supports up to {}; CLASSIFIER_SIMD=avx512|avx2|portable forces one)",
        classifier_inference::simd_level(),
        classifier_inference::SimdLevel::detected()
    );
    println!(
        "server batching: max_batch_size {}, max_batch_wait_ms {}, max_in_flight {}",
        config.server.max_batch_size, config.server.max_batch_wait_ms, config.server.max_in_flight
    );

    let options = |window: usize| JobOptions {
        window,
        ..JobOptions::from_config(&config)
    };
    // Warm-up: topics, connections, the model's thread pools.
    run_job(
        Arc::clone(&broker),
        repeat(&files, 64),
        &options(64),
        &NoProgress,
    )
    .await?;

    let mut measure = Measure {
        broker: &broker,
        files: &files,
        output: args.output.as_deref(),
        shutdown,
        stats: stats.as_ref(),
        floor: if args.no_floor {
            None
        } else {
            let messages = floor::FloorMessages::new(&files, config.client.top_k as u32)?;
            let echo_options = SubscribeOptions {
                max_outstanding_messages: config.server.max_in_flight,
                ..SubscribeOptions::default()
            };
            Some(floor::Floor::start(&broker, messages, echo_options).await?)
        },
        broker_process: broker_process(&config, args.broker_pid),
    };
    println!();
    println!("## End to end (client send → reply received)");
    println!();
    println!(
        "| run | images | window | images/s | p50 ms | p99 ms | not classified | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let throughput = measure
        .kind("throughput", args.images, &options(args.window), args.runs)
        .await?;
    measure
        .kind(
            "latency (one at a time)",
            args.latency_images,
            &options(1),
            args.runs,
        )
        .await?;
    print_costs(&throughput, measure.broker_process, &backend);
    requests::print(
        &throughput.cpu.requests,
        &throughput.floor_cpu.requests,
        !in_process,
    );
    if let Some(floor) = measure.floor.take() {
        floor.stop().await;
    }

    if in_process {
        let classifier = load_classifier(&config.server)?;
        let model_only = model_only_images_per_second(&classifier, args.runs.max(1))?;
        println!();
        println!(
            "Model only, same process, batch 512 (best batch; `trainer bench` has the full table): \
             {model_only:.0} images/s. End to end (throughput run, median) is {:.0}% of that.",
            100.0 * throughput.images_per_second / model_only
        );
        if let Some(floor) = throughput.floor_images_per_second {
            println!(
                "The transport floor is {:.0}% of model-only; end to end is {:.0}% of the floor.",
                100.0 * floor / model_only,
                100.0 * throughput.images_per_second / floor
            );
        }
    }

    decode_costs(&files, args.runs.max(1), &config.server.limits)?;

    println!();
    println!(
        "Peak resident memory of this process (VmHWM): {:.1} MiB{}; now (VmRSS) {:.1} MiB",
        status_mib("VmHWM:").unwrap_or(f64::NAN),
        if in_process {
            ", client and in-process server together"
        } else {
            " (client only)"
        },
        status_mib("VmRSS:").unwrap_or(f64::NAN),
    );

    if let Some(server) = server {
        server.stop().await;
    }
    if own_topic {
        remove_request_topic(broker.as_ref(), &config.server).await;
    }
    if let Err(error) = broker.close().await {
        tracing::debug!(%error, "closing the broker client failed");
    }
    Ok(())
}

/// What every measured run needs: where to send, what, and what to watch.
struct Measure<'a> {
    broker: &'a Arc<dyn unified_broker::Broker>,
    files: &'a [InputFile],
    output: Option<&'a std::path::Path>,
    shutdown: &'a CancellationToken,
    /// The in-process server's counters (mean batch size), if there is one.
    stats: Option<&'a Arc<classifier_server::ServerStats>>,
    /// The transport floor; `None` with `--no-floor`.
    floor: Option<floor::Floor>,
    /// The broker's process on this machine, if found.
    broker_process: Option<cpu::Process>,
}

/// The medians of one kind of run, and the CPU it cost.
struct KindSummary {
    images_per_second: f64,
    floor_images_per_second: Option<f64>,
    cpu: CpuTally,
    floor_cpu: CpuTally,
}

/// CPU seconds used over some runs by this process and by the broker, and the images
/// those runs answered.
#[derive(Default)]
struct CpuTally {
    me: f64,
    broker: Option<f64>,
    images: usize,
    /// Kafka requests by type over the same runs.
    requests: requests::RequestTally,
}

impl CpuTally {
    /// Runs `work`, adding the CPU time this process and `broker` used meanwhile.
    async fn around<T>(
        &mut self,
        broker: Option<cpu::Process>,
        work: impl std::future::Future<Output = anyhow::Result<(T, usize)>>,
    ) -> anyhow::Result<T> {
        let read = || {
            (
                cpu::Process::Me.cpu_seconds(),
                broker.and_then(|b| b.cpu_seconds()),
            )
        };
        let requests_before = requests::snapshot();
        let (me_before, broker_before) = read();
        let (value, images) = work.await?;
        let (me_after, broker_after) = read();
        self.requests.add_since(requests_before, images).await;
        if let (Some(after), Some(before)) = (me_after, me_before) {
            self.me += after - before;
        }
        if let (Some(after), Some(before)) = (broker_after, broker_before) {
            *self.broker.get_or_insert(0.0) += after - before;
        }
        self.images += images;
        Ok(value)
    }

    /// Seconds per 1,000 images of (this process, the broker).
    fn per_thousand(&self) -> (f64, Option<f64>) {
        let per = |seconds: f64| 1_000.0 * seconds / self.images.max(1) as f64;
        (per(self.me), self.broker.map(per))
    }
}

impl Measure<'_> {
    /// `runs` runs of `images` images with `options`, each followed by a transport-floor
    /// run of the same size and window; prints the two rows and returns the medians.
    async fn kind(
        &mut self,
        name: &str,
        images: usize,
        options: &JobOptions,
        runs: usize,
    ) -> anyhow::Result<KindSummary> {
        let batches_before = self.stats.map(|s| s.snapshot());
        let (mut ends, mut floors) = (Vec::new(), Vec::new());
        let (mut cpu, mut floor_cpu) = (CpuTally::default(), CpuTally::default());
        for _ in 0..runs.max(1) {
            let job = measured_job(
                self.broker,
                repeat(self.files, images),
                options,
                self.output,
            );
            let job = async {
                let report = job.await?;
                let answered = report.results.len();
                Ok((report, answered))
            };
            let report = cpu
                .around(self.broker_process, interruptible(self.shutdown, job))
                .await?;
            ends.push(figures(&report));
            if let Some(floor) = &mut self.floor {
                let run = async { Ok((floor.run(images, options.window).await?, images)) };
                let run = floor_cpu
                    .around(self.broker_process, interruptible(self.shutdown, run))
                    .await?;
                floors.push(run);
            }
        }
        let mean_batch = match (self.stats, batches_before) {
            (Some(s), Some(before)) => {
                let now = s.snapshot();
                let batches = now.batches.saturating_sub(before.batches).max(1);
                format!(
                    "{:.1}",
                    now.classified.saturating_sub(before.classified) as f64 / batches as f64
                )
            }
            _ => "–".into(),
        };
        let pick = |f: fn(&RunFigures) -> f64| median(&ends.iter().map(f).collect::<Vec<_>>());
        let images_per_second = pick(|r| r.images_per_second);
        let window = options.window;
        println!(
            "| {name} | {images} | {window} | {images_per_second:.0} | {:.2} | {:.2} | {} | {mean_batch} |",
            pick(|r| r.p50_ms),
            pick(|r| r.p99_ms),
            ends.iter().map(|r| r.failures).sum::<usize>(),
        );
        let floor_images_per_second = (!floors.is_empty()).then(|| {
            let rate = median(&floors.iter().map(|f| f.images_per_second).collect::<Vec<_>>());
            let p50 = median(&floors.iter().map(|f| f.p50_ms).collect::<Vec<_>>());
            println!("| {name}: transport floor (no model) | {images} | {window} | {rate:.0} | {p50:.2} | – | – | – |");
            rate
        });
        Ok(KindSummary {
            images_per_second,
            floor_images_per_second,
            cpu,
            floor_cpu,
        })
    }
}

/// `work`, or an error once `shutdown` is cancelled (SIGINT/SIGTERM) before it ends.
async fn interruptible<T>(
    shutdown: &CancellationToken,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        result = work => result,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    }
}

/// The broker's process: `--broker-pid`, else whatever listens on the configured
/// broker's port on this machine.
fn broker_process(config: &AppConfig, pid: Option<u32>) -> Option<cpu::Process> {
    if let Some(pid) = pid {
        return Some(cpu::Process::Pid(pid));
    }
    let port = cpu::local_port(&config.broker.server_address()?)?;
    cpu::listening_process(port)
        .filter(|pid| *pid != std::process::id())
        .map(cpu::Process::Pid)
}

/// Prints the CPU cost per 1,000 images of the throughput runs and their floor.
fn print_costs(throughput: &KindSummary, broker: Option<cpu::Process>, backend: &str) {
    let (me, broker_seconds) = throughput.cpu.per_thousand();
    let (floor_me, floor_broker) = throughput.floor_cpu.per_thousand();
    let has_floor = throughput.floor_images_per_second.is_some();
    println!();
    println!("## CPU per 1,000 images (throughput runs, from /proc)");
    println!();
    println!("| process | end to end | transport floor |");
    println!("|---|---|---|");
    let floor = |value: Option<f64>| match (has_floor, value) {
        (true, Some(v)) => format!("{v:.3} s"),
        _ => "–".into(),
    };
    println!(
        "| this process (client{}) | {me:.3} s | {} |",
        if backend == "embedded" {
            ", server and embedded broker"
        } else {
            ", in-process server if any"
        },
        floor(Some(floor_me))
    );
    match (broker, broker_seconds) {
        (Some(cpu::Process::Pid(pid)), Some(seconds)) => println!(
            "| the broker (PID {pid}) | {seconds:.3} s | {} |",
            floor(floor_broker)
        ),
        _ if backend == "embedded" => {}
        _ => println!(
            "| the broker | not measured: no process on this machine listens on its port (or --broker-pid is not ours to read) | – |"
        ),
    }
}

/// Model-only inference speed (the server's own `predict`, batch 512, on an all-zero
/// batch: the cost does not depend on pixel values), median over `runs`.
fn model_only_images_per_second(
    classifier: &classifier_server::Classifier,
    runs: usize,
) -> anyhow::Result<f64> {
    const BATCH: usize = 512;
    let inputs = vec![0.0f32; BATCH * classifier.input_len()];
    // On every core: the in-process server's model thread, idle now, is a worker of the
    // global pool (see `on_every_core`).
    classifier_inference::threads::on_every_core(|| {
        classifier.predict(&inputs, BATCH)?; // warm-up
        let mut rates = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let mut images = 0usize;
            while start.elapsed() < Duration::from_millis(500) {
                std::hint::black_box(classifier.predict(&inputs, BATCH)?);
                images += BATCH;
            }
            rates.push(images as f64 / start.elapsed().as_secs_f64());
        }
        Ok(median(&rates))
    })?
}

/// The server's safe decoding ([`decode_image`]: sniffing, header checks, limits) per
/// image, for the first file of the input (a 28×28 PNG for `examples/`), on one thread.
fn decode_costs(files: &[InputFile], runs: usize, limits: &DecodeLimits) -> anyhow::Result<()> {
    let Some(file) = files.first() else {
        return Ok(());
    };
    let bytes = std::fs::read(&file.path)?;
    let image = decode_image(&bytes, limits)?;
    let mut rates = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            std::hint::black_box(decode_image(&bytes, limits)?);
            n += 1;
        }
        rates.push(start.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    println!();
    println!(
        "Safe decode (classifier_server::decode::decode_image) of {} ({}×{}, {} bytes): {:.1} µs per image on one thread (preprocessing and the 640×480 JPEG: `trainer bench`)",
        file.display_name,
        image.width(),
        image.height(),
        bytes.len(),
        median(&rates)
    );
    Ok(())
}
