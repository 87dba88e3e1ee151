//! W3C trace context through the broker: a request can be followed from the client,
//! through a server's stages, and back.
//!
//! The context travels as the broker attributes `traceparent` and `tracestate` (Kafka
//! headers, Pub/Sub attributes, Redis `attr:` fields), written and parsed by
//! OpenTelemetry's own W3C propagator, never by hand. A process joins a trace by making
//! its `tracing` spans children of the context it received ([`join`]) and passes it on
//! from its current span ([`TraceContext::of_span`]); spans reach an exporter only where
//! an OpenTelemetry layer is installed: [`crate::init_tracing`] installs one exporting
//! over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set ([`otlp_provider`]), a test
//! installs its in-memory exporter. Without one, the spans cost nothing and a server
//! hands the context it received back unchanged, as a W3C participant that does not
//! trace should.

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` targets of the spans that follow requests, recorded at TRACE level by
/// an OpenTelemetry layer (and never by the logs, whose default level is higher).
pub const SPAN_TARGETS: [&str; 3] = [
    "classifier_server::trace",
    "client_app::trace",
    "classifier_gateway::trace",
];

/// The filter an OpenTelemetry layer needs: [`SPAN_TARGETS`] at every level, nothing else.
pub fn span_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_targets(
        SPAN_TARGETS
            .iter()
            .map(|target| (*target, tracing::Level::TRACE)),
    )
}

/// An OpenTelemetry layer recording the request spans ([`span_filter`]) into `provider`.
pub fn layer<S>(
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("classifier"))
        .with_filter(span_filter())
}

/// A tracer provider exporting over OTLP/HTTP (protobuf) in batches, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the
/// exporter reads them, and the other standard `OTEL_*` variables, itself); `None`
/// otherwise, or if the exporter cannot be made (said on stderr: logging is not set up
/// yet). The service is named by `OTEL_SERVICE_NAME`, else by the program's file name.
pub fn otlp_provider() -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTLP span export is off: the exporter could not be made: {error}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(program_name());
    }
    Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    )
}

/// The running program's file name (`classifier-server`, …).
fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg| {
            std::path::Path::new(&arg)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "classifier".into())
}

/// The attribute holding the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The attribute holding the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// A valid W3C trace context, as OpenTelemetry's W3C propagator read it (from
/// attributes) or as a recorded span holds it: written out as `traceparent` and
/// `tracestate` only when it travels on ([`TraceContext::write_to`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext(SpanContext);

impl TraceContext {
    /// The context in a message's attributes (`get` looks one up by name), or `None` when
    /// there is none or it is not valid W3C (a peer's garbage starts no trace).
    pub fn from_attributes<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        let mut carrier = HashMap::from([(TRACEPARENT, get(TRACEPARENT)?)]);
        if let Some(state) = get(TRACESTATE) {
            carrier.insert(TRACESTATE, state);
        }
        let context = TraceContextPropagator::new().extract(&Carrier(carrier));
        Self::valid(context.span().span_context())
    }

    /// The context to pass on from `span`: its own, when an OpenTelemetry layer records
    /// it; `None` otherwise.
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        if span.is_none() {
            return None;
        }
        Self::valid(span.context().span().span_context())
    }

    /// `span_context`, if it is valid.
    fn valid(span_context: &SpanContext) -> Option<Self> {
        span_context
            .is_valid()
            .then(|| TraceContext(span_context.clone()))
    }

    /// The trace id (32 hex digits).
    pub fn trace_id(&self) -> String {
        self.0.trace_id().to_string()
    }

    /// The id of the span this context names as the parent (16 hex digits).
    pub fn parent_id(&self) -> String {
        self.0.span_id().to_string()
    }

    /// The vendor entries (`tracestate`), possibly empty.
    pub fn tracestate(&self) -> String {
        self.0.trace_state().header()
    }

    /// Writes the context into message attributes as the W3C propagator does
    /// (`tracestate` only when not empty).
    pub fn write_to(&self, attributes: &mut BTreeMap<String, String>) {
        let context = Context::new().with_remote_span_context(self.0.clone());
        TraceContextPropagator::new().inject_context(&context, &mut Written(attributes));
    }
}

/// Makes `span` (just created, not yet entered) a child of the remote `parent`, when
/// there is one and an OpenTelemetry layer records `span`; otherwise does nothing.
pub fn join(span: &tracing::Span, parent: Option<&TraceContext>) {
    let Some(parent) = parent else { return };
    if span.is_none() {
        return;
    }
    let context = Context::new().with_remote_span_context(parent.0.clone());
    // Fails only without a layer or for a span already started: then nothing is traced.
    let _ = span.set_parent(context);
}

/// Links `span` (one that serves many requests, like a batch) to each request's context,
/// where an OpenTelemetry layer records it.
pub fn link<'a>(span: &tracing::Span, contexts: impl IntoIterator<Item = &'a TraceContext>) {
    if span.is_none() {
        return;
    }
    for context in contexts {
        span.add_link(context.0.clone());
    }
}

/// Attributes read by the propagator.
struct Carrier<'a>(HashMap<&'a str, &'a str>);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).copied()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().copied().collect()
    }
}

/// Attributes written by the propagator.
struct Written<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Written<'_> {
    /// Sets `key`, unless `value` is empty (the propagator writes an empty `tracestate`).
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.insert(key.to_string(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parsed(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        TraceContext::from_attributes(|name| match name {
            TRACEPARENT => Some(traceparent),
            TRACESTATE => tracestate,
            _ => None,
        })
    }

    #[test]
    fn a_w3c_traceparent_is_read_and_written_back_the_same() {
        let context = parsed(PARENT, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(context.tracestate(), "congo=t61rcWkgMzE");
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_id(), "00f067aa0ba902b7");
        let mut attributes = BTreeMap::new();
        context.write_to(&mut attributes);
        assert_eq!(attributes[TRACEPARENT], PARENT);
        assert_eq!(attributes[TRACESTATE], "congo=t61rcWkgMzE");
        let mut without_state = BTreeMap::new();
        parsed(PARENT, None)
            .expect("valid")
            .write_to(&mut without_state);
        assert_eq!(
            without_state.len(),
            1,
            "no empty tracestate: {without_state:?}"
        );
        assert_eq!(without_state[TRACEPARENT], PARENT);
    }

    #[test]
    fn garbage_and_all_zero_ids_start_no_trace() {
        for bad in [
            "",
            "hello",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parsed(bad, None), None, "{bad:?}");
        }
        assert_eq!(TraceContext::from_attributes(|_| None), None);
    }

    #[test]
    fn without_a_layer_spans_carry_no_context_and_joining_does_nothing() {
        let span = tracing::trace_span!("no subscriber");
        join(&span, parsed(PARENT, None).as_ref());
        assert_eq!(TraceContext::of_span(&span), None);
        assert_eq!(TraceContext::of_span(&tracing::Span::none()), None);
    }
}
