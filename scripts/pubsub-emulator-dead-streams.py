#!/usr/bin/env python3
"""A minimal reproduction, with Google's own Python client, of the Pub/Sub emulator's
"dead streams" defect that two Pub/Sub cases of our suite are skipped for.

The defect (found 2026-12-02 with a logging HTTP/2 proxy and jstack on the emulator's
JVM; see unified-broker/tests/conformance_pubsub.rs): the emulator never ends a
StreamingPull whose client went away. Its pusher thread goes on pulling the subscription
and hands messages to the dead stream, where nobody acks them; they come back only when
their ack deadline expires, and then race the live subscriber against every dead stream
again. Real Pub/Sub ends a stream when its client cancels it.

No code of this project runs here: only google-cloud-pubsub, the emulator and this file.
Each round opens a subscriber (the client's `subscribe`), publishes one message, waits
for it, and then cancels the subscriber as any client does when it stops:

  - "shared": every round on one subscription, so round k has k - 1 cancelled
    subscribers of the same subscription before it;
  - "fresh" (the control): every round on a new subscription, so there are none.

On a correct broker both columns are milliseconds. On the emulator (0.8.20, the one
scripts/pubsub-start.sh runs) the shared column grows to the subscription's ack
deadline and beyond as dead streams pile up, while the fresh column stays fast.

    scripts/pubsub-start.sh
    PUBSUB_EMULATOR_HOST=127.0.0.1:8085 .tools/interop-venv/bin/python \\
        scripts/pubsub-emulator-dead-streams.py [--rounds 5]

(.tools/interop-venv is made by tests/interop/run.sh, or by hand: python3 -m venv
.tools/interop-venv && .tools/interop-venv/bin/pip install -r tests/interop/requirements.txt)
Exit status 0 either way; the figures are the result.
"""

import argparse
import os
import statistics
import sys
import threading
import time
import uuid

from google.cloud import pubsub_v1

PROJECT = "dead-streams-repro"
ACK_DEADLINE_SECONDS = 10
# Longer than a few ack deadlines: a message a dead stream took can come back to a dead
# stream again.
WAIT_SECONDS = 120


def new_subscription(subscriber, topic, name):
    path = subscriber.subscription_path(PROJECT, name)
    subscriber.create_subscription(
        request={"name": path, "topic": topic, "ack_deadline_seconds": ACK_DEADLINE_SECONDS}
    )
    return path


def one_round(publisher, subscriber, topic, subscription):
    """Seconds from publish to delivery of one message to a newly opened subscriber, or
    None when it did not arrive within WAIT_SECONDS. The subscriber is cancelled after."""
    body = uuid.uuid4().hex.encode()
    arrived = threading.Event()

    def callback(message):
        message.ack()
        if message.data == body:
            arrived.set()

    # The client's lease extension at the subscription's deadline: a message a dead
    # stream holds comes back after ACK_DEADLINE_SECONDS, not the client's default 60 s.
    flow = pubsub_v1.types.FlowControl(
        max_messages=10,
        min_duration_per_lease_extension=ACK_DEADLINE_SECONDS,
        max_duration_per_lease_extension=ACK_DEADLINE_SECONDS,
    )
    future = subscriber.subscribe(subscription, callback=callback, flow_control=flow)
    time.sleep(1.0)  # let the stream open before the message exists
    started = time.monotonic()
    publisher.publish(topic, body).result(timeout=30)
    got = arrived.wait(WAIT_SECONDS)
    elapsed = time.monotonic() - started
    future.cancel()  # what a stopping client does: the stream is reset
    try:
        future.result(timeout=30)
    except Exception:  # cancelled futures raise; the cancel is what matters
        pass
    return elapsed if got else None


def shown(seconds):
    return "not delivered" if seconds is None else f"{seconds:7.2f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        sys.exit("set PUBSUB_EMULATOR_HOST (scripts/pubsub-start.sh prints it)")

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    run = uuid.uuid4().hex[:8]
    topic = publisher.topic_path(PROJECT, f"dead-streams-{run}")
    publisher.create_topic(request={"name": topic})
    shared = new_subscription(subscriber, topic, f"dead-streams-{run}-shared")

    print(f"emulator {os.environ['PUBSUB_EMULATOR_HOST']}, ack deadline {ACK_DEADLINE_SECONDS} s")
    print("round  cancelled before  shared subscription  fresh subscription (control)")
    rows = []
    for k in range(1, args.rounds + 1):
        on_shared = one_round(publisher, subscriber, topic, shared)
        fresh = new_subscription(subscriber, topic, f"dead-streams-{run}-fresh-{k}")
        on_fresh = one_round(publisher, subscriber, topic, fresh)
        subscriber.delete_subscription(request={"subscription": fresh})
        rows.append((on_shared, on_fresh))
        print(f"{k:5}  {k - 1:16}  {shown(on_shared):>19}  {shown(on_fresh):>29}", flush=True)

    # Deleting the subscription is what ends the emulator's dead pushers.
    subscriber.delete_subscription(request={"subscription": shared})
    publisher.delete_topic(request={"topic": topic})

    def median(values):
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    later = rows[1:] or rows
    print(
        f"median from round 2 on: shared {shown(median([r[0] for r in later]))}, "
        f"fresh {shown(median([r[1] for r in later]))}; "
        f"not delivered: shared {sum(r[0] is None for r in rows)}, "
        f"fresh {sum(r[1] is None for r in rows)} of {len(rows)}"
    )


if __name__ == "__main__":
    main()
