"""A server we did not write in Rust: answers ClassifyRequests from the broker.

    python foreign_server.py --backend pubsub|kafka|redis --request-topic T [--idle-exit SECS]

Joins the servers' group on the request topic and answers every request with one
prediction of class "python-peer" (model "interop-peer", server id
"python-interop-server"), echoing what the contract says a reply echoes; a payload that
is not a ClassifyRequest gets a MALFORMED_REQUEST error reply when the attributes name a
reply route. Acks (commits) a request only after its reply was published, as the
contract requires of every server. It records no traces, so it copies a request's
`traceparent`/`tracestate` to the reply unchanged. Ends after SIGTERM or --idle-exit seconds without
a request, printing how many requests it answered.
"""

import argparse
import signal
import sys
import time

import wire
from wire import classifier_pb2

SERVER_ID = "python-interop-server"


def answer(payload, attributes):
    """The reply topic and serialized ClassifyResponse for one request, or None."""
    request = classifier_pb2.ClassifyRequest()
    try:
        request.ParseFromString(payload)
    except Exception:
        request = None
    if request is None or not request.request_id:
        reply_topic = attributes.get(wire.REPLY_TOPIC)
        request_id = attributes.get(wire.REQUEST_ID)
        if not reply_topic or not request_id:
            return None
        response = classifier_pb2.ClassifyResponse(
            schema_version=wire.SCHEMA_VERSION,
            request_id=request_id,
            job_id=attributes.get(wire.JOB_ID, ""),
            server_id=SERVER_ID,
            error=classifier_pb2.ClassifyError(
                code=classifier_pb2.MALFORMED_REQUEST, reason="not a ClassifyRequest"
            ),
        )
        return reply_topic, response
    response = classifier_pb2.ClassifyResponse(
        schema_version=wire.SCHEMA_VERSION,
        request_id=request.request_id,
        job_id=request.job_id,
        server_id=SERVER_ID,
        file_name=request.file_name,
        sent_at_unix_micros=request.sent_at_unix_micros,
        batch_size=1,
        predictions=classifier_pb2.Predictions(
            top_k=[classifier_pb2.Prediction(class_name="python-peer", class_index=0, probability=1.0)],
            model_name="interop-peer",
            model_version="1",
        ),
    )
    for name, value in request.attributes.items():
        response.attributes[name] = value
    return request.reply_topic or attributes.get(wire.REPLY_TOPIC), response


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--request-topic", default="classify-requests")
    parser.add_argument("--idle-exit", type=float, default=120)
    args = parser.parse_args()

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    transport = wire.transport(args.backend)
    transport.ensure_topic(args.request_topic)
    reader = transport.open_reader(args.request_topic, wire.SERVER_GROUP)
    print("foreign server: ready", flush=True)
    answered = 0
    last = time.monotonic()
    while not stopping and time.monotonic() - last < args.idle_exit:
        received = reader.receive(timeout=1)
        if received is None:
            continue
        last = time.monotonic()
        outcome = answer(received.payload, received.attributes)
        if outcome is not None:
            reply_topic, response = outcome
            attributes = {
                wire.REQUEST_ID: response.request_id,
                wire.JOB_ID: response.job_id,
                wire.CONTENT_TYPE: wire.CONTENT_TYPE_RESPONSE,
            }
            for name in ("traceparent", "tracestate"):
                if name in received.attributes:
                    attributes[name] = received.attributes[name]
            # On Redis, replies go with NOMKSTREAM: a missing reply stream is a client gone.
            options = {"create": False} if args.backend == "redis" else {}
            try:
                transport.publish(reply_topic, response.SerializeToString(), attributes, **options)
                answered += 1
            except LookupError:
                pass
        received.ack()
    reader.close()
    print(f"foreign server: answered {answered}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
