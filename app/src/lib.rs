//! What the binaries (`classifier-server`, `client-app`, `classifier-gateway`, `trainer`)
//! share, so each `main.rs` only parses its flags and dispatches:
//!
//! - [`config`]: the config file (`[broker]`, `[server]`, `[client]`, `[gateway]`), with the
//!   environment and flags laid over it through one [`overlay`];
//! - [`init_tracing`]: log output on stderr, filtered by `RUST_LOG`, and the OTLP export
//!   of request spans when `OTEL_EXPORTER_OTLP_ENDPOINT` asks for it;
//! - [`cancel_on_signals`]: SIGINT/SIGTERM as a cancellation token;
//! - [`connect_with_retry`]: a broker connection that waits out a broker still starting;
//! - [`trace`]: W3C trace context (`traceparent`) carried in broker attributes, and
//!   `tracing` spans joining it;
//! - [`lock`]: a mutex lock that survives a panicked holder (defined in
//!   `unified_broker::sync`, whose queues needed it first).

#[cfg(feature = "broker")]
pub mod config;
pub mod overlay;
#[cfg(feature = "broker")]
pub mod trace;

use tokio_util::sync::CancellationToken;

#[cfg(feature = "broker")]
pub use config::{AppConfig, ClientConfig, DecodeLimits, GatewayConfig, NamedModel, ServerConfig};
/// The poison-tolerant lock, defined once for the workspace beside the broker code that
/// needed it first.
#[cfg(feature = "broker")]
pub use unified_broker::sync::lock;

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default: `default_level`).
/// Logs go to stderr so a command's results on stdout stay clean for pipes.
///
/// When the standard OpenTelemetry variable `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, the spans that follow requests across
/// the broker ([`trace`]) are also exported there over OTLP/HTTP; off otherwise. Keep
/// the returned guard until the process ends: dropping it sends what is still buffered.
pub fn init_tracing(default_level: &str) -> TracingGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);
    #[cfg(feature = "broker")]
    {
        let provider = trace::otlp_provider();
        let spans = provider.as_ref().map(trace::layer);
        let _ = registry.with(spans).try_init();
        TracingGuard { provider }
    }
    #[cfg(not(feature = "broker"))]
    {
        let _ = registry.try_init();
        TracingGuard {}
    }
}

/// Returned by [`init_tracing`]: exports the spans still buffered when dropped.
#[must_use = "dropping the guard at once stops the span export"]
pub struct TracingGuard {
    #[cfg(feature = "broker")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        #[cfg(feature = "broker")]
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("exporting the last spans failed: {error}");
            }
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM (Ctrl-C only, off Unix): every long-running
/// mode stops the same way, finishing what is in flight.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Connects to the broker, retrying with backoff while it is unreachable, until it
/// answers or `shutdown` is cancelled (a server started beside its broker must not die
/// because it won the race). Logs what it waits for.
#[cfg(feature = "broker")]
pub async fn connect_with_retry(
    config: &unified_broker::BrokerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<std::sync::Arc<dyn unified_broker::Broker>> {
    use anyhow::Context;
    match unified_broker::retry_while_unavailable("a connection", shutdown.cancelled(), || {
        unified_broker::connect(config)
    })
    .await
    {
        Some(result) => result.context("connecting to the broker"),
        None => anyhow::bail!("stopped while waiting for the broker"),
    }
}
