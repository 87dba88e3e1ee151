//! Intake: takes deliveries from the subscription while fewer than `max_in_flight` are
//! unfinished, and hands them to the decode pool a chunk at a time.
//!
//! A permit of the in-flight semaphore travels with each request ([`Work`]) until it is
//! acked (or given up), so memory is bounded whatever the backlog on the broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use classifier_app::trace::TraceContext;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use unified_broker::{Delivery, Resubscribing, Subscriber};

use super::decode_pool::{DecodePool, Prepared};
use super::stats::ServerStats;

/// One request travelling through the pipeline, holding its in-flight permit.
pub(super) struct Work {
    /// The request as received; acked once its reply is out.
    pub delivery: Delivery,
    /// When intake took it, for the reply's queue time.
    pub received_at: Instant,
    /// The server's span of this request (`classify request`), a child of the trace
    /// context the request came with; disabled unless an OpenTelemetry layer records
    /// it. It ends when the work is done with (after the ack).
    pub span: tracing::Span,
    /// The W3C trace context the request came with, if any.
    pub trace: Option<TraceContext>,
    _slot: InFlightSlot,
}

impl Work {
    /// A request taken under `permit`, counted in `stats`' in-flight gauge until it is
    /// done with (acked, or given up).
    pub fn new(
        delivery: Delivery,
        received_at: Instant,
        permit: OwnedSemaphorePermit,
        stats: &ServerStats,
    ) -> Self {
        Work {
            delivery,
            received_at,
            span: tracing::Span::none(),
            trace: None,
            _slot: InFlightSlot::new(permit, stats),
        }
    }

    /// Starts the request's span, joined to the trace context its message carries.
    pub fn start_span(&mut self) {
        let message = self.delivery.message();
        self.trace = TraceContext::from_attributes(|name| message.attribute(name));
        self.span = tracing::trace_span!(target: TRACE_TARGET, "classify request");
        classifier_app::trace::join(&self.span, self.trace.as_ref());
    }

    /// Writes the trace context into `reply`: the request's span's own (so the client
    /// sees this server as the parent), or the one the request came with, unchanged,
    /// when spans are not recorded.
    pub fn stamp_trace(&self, reply: &mut unified_broker::Message) {
        let context = TraceContext::of_span(&self.span).or_else(|| self.trace.clone());
        if let Some(context) = context {
            context.write_to(&mut reply.attributes);
        }
    }
}

/// The `tracing` target of the server's per-request spans (`classify request`,
/// `decode`, `inference`, `reply`), at TRACE level: off in the logs, recorded only by
/// an OpenTelemetry layer that asks for them.
pub(super) const TRACE_TARGET: &str = "classifier_server::trace";

/// A request's place in flight: its permit, and its count in the in-flight gauge, both
/// given back when it is dropped.
struct InFlightSlot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl InFlightSlot {
    fn new(permit: OwnedSemaphorePermit, stats: &ServerStats) -> Self {
        stats.slot_taken();
        InFlightSlot {
            _permit: permit,
            gauge: stats.in_flight_gauge(),
        }
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Requests decoded together in one job on a decode thread, at most: enough to make the
/// hand-over cheap, few enough that both decode threads get work.
pub(super) const DECODE_CHUNK: usize = 16;

/// Pause after a receive error before asking the subscription again.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Takes work while there is room, until `shutdown` (or the end of the subscription),
/// then returns the subscriber for closing. Dropping `prepared` at the end tells the
/// later stages that nothing more comes once the decode pool is done.
pub(super) async fn run(
    mut subscriber: Resubscribing,
    in_flight: &Arc<Semaphore>,
    decode_pool: &DecodePool,
    prepared: mpsc::Sender<Vec<Prepared>>,
    stats: &ServerStats,
    shutdown: &CancellationToken,
) -> Resubscribing {
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(in_flight).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let next = tokio::select! {
            next = subscriber.next() => next,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Some(Ok(delivery)) => {
                let chunk = take_chunk(&mut subscriber, in_flight, delivery, permit, stats).await;
                ServerStats::add(&stats.received, chunk.len() as u64);
                decode_pool.submit(chunk, prepared.clone());
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "receiving from the broker failed; retrying");
                tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
            }
            None => {
                tracing::warn!("the broker client was closed; stopping");
                break;
            }
        }
    }
    subscriber
}

/// `first` and whatever else is already waiting (with room for it), up to
/// [`DECODE_CHUNK`]: decoded in the same job, one hand-over to the decode threads per
/// chunk instead of per request.
async fn take_chunk<S: Subscriber + ?Sized>(
    subscriber: &mut S,
    in_flight: &Arc<Semaphore>,
    first: Delivery,
    permit: OwnedSemaphorePermit,
    stats: &ServerStats,
) -> Vec<Work> {
    let received_at = Instant::now();
    let mut chunk = vec![Work::new(first, received_at, permit, stats)];
    while chunk.len() < DECODE_CHUNK {
        let Ok(permit) = Arc::clone(in_flight).try_acquire_owned() else {
            break;
        };
        let ready = tokio::select! {
            biased;
            next = subscriber.next() => next,
            () = std::future::ready(()) => None,
        };
        match ready {
            Some(Ok(delivery)) => chunk.push(Work::new(delivery, received_at, permit, stats)),
            Some(Err(error)) => {
                tracing::warn!(%error, "receiving from the broker failed; retrying");
                break;
            }
            None => break,
        }
    }
    chunk
}

#[cfg(test)]
mod tests {
    use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
    use unified_broker::{Broker, Message, SubscribeOptions};

    use super::*;

    /// A subscriber holding `n` waiting messages.
    async fn subscriber_with(n: usize) -> Box<dyn Subscriber> {
        let broker = EmbeddedBroker::new(EmbeddedConfig::default());
        broker
            .ensure_topic_and_subscription("requests", "servers")
            .await
            .expect("create");
        let messages = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
        broker
            .publish_batch("requests", messages)
            .await
            .expect("publish");
        broker
            .subscribe("requests", "servers", SubscribeOptions::default())
            .await
            .expect("subscribe")
    }

    /// The first chunk `take_chunk` takes from a subscriber holding `waiting` messages,
    /// with room for `room` in flight, and the in-flight semaphore.
    async fn first_chunk(waiting: usize, room: usize) -> (Vec<Work>, Arc<Semaphore>) {
        first_chunk_counted(waiting, room, &ServerStats::default()).await
    }

    /// [`first_chunk`], counting in `stats`.
    async fn first_chunk_counted(
        waiting: usize,
        room: usize,
        stats: &ServerStats,
    ) -> (Vec<Work>, Arc<Semaphore>) {
        let mut subscriber = subscriber_with(waiting).await;
        let in_flight = Arc::new(Semaphore::new(room));
        let first = subscriber.next().await.expect("open").expect("a delivery");
        let permit = Arc::clone(&in_flight).try_acquire_owned().expect("room");
        let chunk = take_chunk(&mut *subscriber, &in_flight, first, permit, stats).await;
        (chunk, in_flight)
    }

    #[tokio::test]
    async fn work_is_counted_in_flight_until_dropped() {
        let stats = ServerStats::default();
        let (chunk, _) = first_chunk_counted(3, 100, &stats).await;
        let in_flight = || stats.in_flight_gauge().get();
        assert_eq!(in_flight(), 3);
        let mut chunk = chunk.into_iter();
        {
            // Acking takes the delivery out of the work; the slot goes with the rest.
            let first = chunk.next().expect("one");
            first.delivery.ack().expect("ack");
            assert_eq!(in_flight(), 3);
        }
        assert_eq!(in_flight(), 2);
        drop(chunk);
        assert_eq!(in_flight(), 0);
    }

    #[tokio::test]
    async fn a_chunk_takes_what_waits_up_to_the_chunk_size() {
        let (chunk, in_flight) = first_chunk(DECODE_CHUNK + 4, 100).await;
        assert_eq!(chunk.len(), DECODE_CHUNK);
        assert_eq!(in_flight.available_permits(), 100 - DECODE_CHUNK);
        let payloads: Vec<_> = chunk
            .iter()
            .map(|work| work.delivery.message().payload.clone())
            .collect();
        assert_eq!(payloads[0].as_ref(), b"m0");
        assert_eq!(
            payloads[DECODE_CHUNK - 1].as_ref(),
            format!("m{}", DECODE_CHUNK - 1).as_bytes()
        );
        // Finishing the work gives the permits back.
        drop(chunk);
        assert_eq!(in_flight.available_permits(), 100);
    }

    #[tokio::test]
    async fn a_chunk_stops_where_the_in_flight_limit_is() {
        let (chunk, _in_flight) = first_chunk(10, 3).await;
        assert_eq!(chunk.len(), 3);
    }

    #[tokio::test]
    async fn a_chunk_does_not_wait_for_more() {
        let (chunk, _in_flight) = tokio::time::timeout(Duration::from_secs(5), first_chunk(2, 100))
            .await
            .expect("returns without waiting for a third message");
        assert_eq!(chunk.len(), 2);
    }
}
