"""A client we did not write in Rust: classifies files through the broker.

    python foreign_client.py --backend pubsub|kafka|redis --request-topic T --root DIR FILE...

Publishes one ClassifyRequest per file to the request topic (after making sure the topic
and the servers' group exist, so no request is missed), reads the replies from a reply
topic of its own, and prints one JSON line per file:
{"file": ..., "status": "classified"|"error"|"unanswered", "predicted_class": ...,
 "probability": ..., "top_k": [[class, probability], ...], "error_code": ..., "server_id": ...,
 "trace": "same"|"missing"|"other"}

Every request carries a deadline (--deadline-in seconds from now; the timeout by
default) and the job's W3C traceparent; "trace" says whether the reply came back in the
same trace.
"""

import argparse
import json
import os
import sys
import time

import wire
from wire import classifier_pb2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--request-topic", default="classify-requests")
    parser.add_argument("--root", required=True, help="file names are relative to this")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--deadline-in", type=float, help="seconds; default: --timeout")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    transport = wire.transport(args.backend)
    job_id = wire.new_id()
    reply_topic = f"classify-replies-{job_id}"
    transport.ensure_topic(reply_topic)
    if args.backend == "kafka":
        reader = transport.open_reader(reply_topic, "client", private=True)
    else:
        reader = transport.open_reader(reply_topic, "client")
    transport.ensure_topic(args.request_topic)
    if args.backend in ("pubsub", "redis"):
        # Pub/Sub keeps messages only for subscriptions that exist; a Redis group starts
        # at the stream's end. Kafka's group starts at the earliest offset by itself.
        transport.ensure_subscription(args.request_topic, wire.SERVER_GROUP)
    trace_attributes, trace_id = wire.new_trace()
    deadline_in = args.timeout if args.deadline_in is None else args.deadline_in

    pending = {}
    for path in args.files:
        name = os.path.relpath(path, args.root)
        with open(path, "rb") as file:
            image = file.read()
        request_id = wire.new_id()
        request = classifier_pb2.ClassifyRequest(
            schema_version=wire.SCHEMA_VERSION,
            request_id=request_id,
            job_id=job_id,
            image=image,
            file_name=name,
            content_type="image/png" if name.endswith(".png") else "application/octet-stream",
            reply_topic=reply_topic,
            sent_at_unix_micros=wire.now_micros(),
            top_k=args.top_k,
            deadline_unix_micros=wire.now_micros() + int(deadline_in * 1_000_000),
        )
        attributes = {
            wire.REQUEST_ID: request_id,
            wire.REPLY_TOPIC: reply_topic,
            wire.JOB_ID: job_id,
            wire.CONTENT_TYPE: wire.CONTENT_TYPE_REQUEST,
            **trace_attributes,
        }
        transport.publish(args.request_topic, request.SerializeToString(), attributes)
        pending[request_id] = name

    results = {}
    deadline = time.monotonic() + args.timeout
    while pending and time.monotonic() < deadline:
        received = reader.receive(timeout=1)
        if received is None:
            continue
        response = classifier_pb2.ClassifyResponse()
        response.ParseFromString(received.payload)
        received.ack()
        name = pending.pop(response.request_id, None)
        if name is None:
            continue  # a duplicate, or not ours
        trace = wire.trace_of(received.attributes)
        row = {
            "file": name,
            "server_id": response.server_id,
            "trace": "missing" if trace is None else "same" if trace == trace_id else "other",
        }
        if response.WhichOneof("outcome") == "predictions":
            top = [[p.class_name, p.probability] for p in response.predictions.top_k]
            row.update(status="classified", predicted_class=top[0][0], probability=top[0][1], top_k=top)
        else:
            code = classifier_pb2.ErrorCode.Name(response.error.code)
            row.update(status="error", error_code=code, error_reason=response.error.reason)
        results[name] = row
    for name in pending.values():
        results[name] = {"file": name, "status": "unanswered"}

    reader.close()
    transport.delete_topic(reply_topic)
    for name in sorted(results):
        print(json.dumps(results[name]))
    return 0 if all(r["status"] != "unanswered" for r in results.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
