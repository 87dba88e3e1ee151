//! `trainer` CLI: train the CNN, evaluate a saved model, benchmark, export it as ONNX or
//! export sample test images. The commands live in the library ([`trainer::cli`]); this
//! file sets up the process and dispatches.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // candle's elementwise thread pool spin-waits on its workers; on a 2-core machine that
    // fights the rayon threads running our convolution kernels and costs ~20% of an epoch.
    // Our heavy kernels parallelise themselves, so run candle's own ops on one thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let _tracing = classifier_app::init_tracing("info");
    // Training and `trainer bench` call the model from this thread, as the server does
    // from its model thread: a worker of the compute pool.
    classifier_inference::threads::adopt_calling_thread();
    trainer::cli::run(
        trainer::cli::Cli::parse(),
        trainer::cli::quoted_command_line(),
    )
}
