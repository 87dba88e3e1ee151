//! The dispatcher's trust and bookkeeping on the embedded broker, with the test playing
//! the server: only a reply with the gateway's job id and a request id still awaited is
//! handed to a caller, and a caller that gives up leaves nothing waiting.

use std::sync::Arc;
use std::time::Duration;

use classifier_app::ServerConfig;
use classifier_gateway::dispatch::{DispatchError, Dispatcher, ImageRequest};
use classifier_proto::{ClassifyRequest, ClassifyResponse, ProstMessage};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use unified_broker::{Broker, BrokerConfig, Message, SubscribeOptions};

async fn dispatcher() -> (Arc<dyn Broker>, Arc<Dispatcher>, CancellationToken) {
    let broker = unified_broker::connect(&BrokerConfig::default())
        .await
        .expect("embedded broker");
    let stop = CancellationToken::new();
    let (dispatcher, _reader) = Dispatcher::start(
        Arc::clone(&broker),
        &ServerConfig::default(),
        16,
        stop.clone(),
    )
    .await
    .expect("dispatcher starts");
    (broker, dispatcher, stop)
}

fn image() -> ImageRequest {
    ImageRequest {
        image: b"not looked at here".to_vec(),
        model_name: String::new(),
        top_k: 1,
        trace: None,
    }
}

async fn reply(broker: &dyn Broker, topic: &str, job_id: &str, request_id: &str, server_id: &str) {
    let response = ClassifyResponse {
        job_id: job_id.to_string(),
        request_id: request_id.to_string(),
        server_id: server_id.to_string(),
        ..ClassifyResponse::default()
    };
    broker
        .publish(topic, Message::new(response.encode_to_vec()))
        .await
        .expect("reply published");
}

/// A subscription to the requests the dispatcher sends, as the servers' group.
async fn as_the_server(broker: &dyn Broker) -> Box<dyn unified_broker::Subscriber> {
    let server = ServerConfig::default();
    broker
        .subscribe(
            &server.request_topic,
            &server.group,
            SubscribeOptions::default(),
        )
        .await
        .expect("subscribes as the server")
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn only_an_awaited_reply_with_our_job_id_is_taken() {
    let (broker, dispatcher, stop) = dispatcher().await;
    let mut requests = as_the_server(&*broker).await;
    let call = tokio::spawn({
        let dispatcher = Arc::clone(&dispatcher);
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            dispatcher.classify(vec![image()], deadline).await
        }
    });
    let delivery = requests
        .next()
        .await
        .expect("a request")
        .expect("delivered");
    let request = ClassifyRequest::decode(delivery.message().payload.as_ref()).expect("decodes");
    assert_eq!(request.request_id.len(), 32, "128 random bits as hex");
    let topic = request.reply_topic.clone();

    reply(
        &*broker,
        &topic,
        "someone-else",
        &request.request_id,
        "forger",
    )
    .await;
    reply(
        &*broker,
        &topic,
        &request.job_id,
        "0123456789abcdef0123456789abcdef",
        "forger",
    )
    .await;
    eventually("two rejected replies", || {
        dispatcher.rejected_replies() == 2
    })
    .await;
    assert!(!call.is_finished(), "a forged reply ended the call");

    reply(
        &*broker,
        &topic,
        &request.job_id,
        &request.request_id,
        "real",
    )
    .await;
    let replies = call.await.expect("joins").expect("answered");
    assert_eq!(replies[0].server_id, "real");
    assert_eq!(dispatcher.pending(), 0);

    // A second reply to the same request finds nobody waiting.
    reply(
        &*broker,
        &topic,
        &request.job_id,
        &request.request_id,
        "again",
    )
    .await;
    eventually("the duplicate rejected", || {
        dispatcher.rejected_replies() == 3
    })
    .await;
    delivery.ack().expect("acked");
    stop.cancel();
}

#[tokio::test]
async fn a_caller_that_gives_up_leaves_nothing_waiting() {
    let (_broker, dispatcher, stop) = dispatcher().await;
    let soon = Instant::now() + Duration::from_millis(200);
    let outcome = dispatcher.classify(vec![image(), image()], soon).await;
    assert!(
        matches!(outcome, Err(DispatchError::DeadlineExceeded)),
        "{outcome:?}"
    );
    assert_eq!(dispatcher.pending(), 0);

    // A caller dropped midway (its HTTP connection closed) takes its entries out too.
    let call = tokio::spawn({
        let dispatcher = Arc::clone(&dispatcher);
        async move {
            let later = Instant::now() + Duration::from_secs(60);
            dispatcher.classify(vec![image(); 3], later).await
        }
    });
    eventually("three waiting", || dispatcher.pending() == 3).await;
    call.abort();
    eventually("none waiting", || dispatcher.pending() == 0).await;
    stop.cancel();
}

/// A request to the servers carries the caller's deadline (the broker request's
/// `deadline_unix_micros`, so a server skips the model once the caller has gone) and the
/// caller's W3C trace context as `traceparent`/`tracestate` attributes.
#[tokio::test]
async fn requests_carry_the_callers_deadline_and_trace_context() {
    let (broker, dispatcher, stop) = dispatcher().await;
    let mut requests = as_the_server(&*broker).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let trace = classifier_app::trace::TraceContext::from_attributes(|name| match name {
        "traceparent" => Some(parent),
        "tracestate" => Some("congo=t61rcWkgMzE"),
        _ => None,
    });
    assert!(trace.is_some(), "the W3C example parses");
    let sent_at = classifier_proto::unix_micros_now();
    let call = tokio::spawn({
        let dispatcher = Arc::clone(&dispatcher);
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let traced = ImageRequest { trace, ..image() };
            dispatcher.classify(vec![traced], deadline).await
        }
    });
    let delivery = requests
        .next()
        .await
        .expect("a request")
        .expect("delivered");
    let message = delivery.message();
    let request = ClassifyRequest::decode(message.payload.as_ref()).expect("decodes");
    let ahead = request.deadline_unix_micros - sent_at;
    assert!(
        (19_000_000..=21_000_000).contains(&ahead),
        "deadline {ahead} µs after sending, not the caller's 20 s"
    );
    assert_eq!(message.attribute("traceparent"), Some(parent));
    assert_eq!(message.attribute("tracestate"), Some("congo=t61rcWkgMzE"));
    delivery.ack().expect("acked");
    call.abort();
    stop.cancel();
}
