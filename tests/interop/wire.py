"""The wire contract of proto/README.md, spoken by code we did not write in Rust.

Everything here comes from the written contract, not from our Rust code: topic and
subscription names, message attributes / Kafka headers, reply routing and the protobuf
types (generated from proto/ by grpcio-tools into the directory named by
INTEROP_GENERATED). Three transports with one small interface:

    transport.ensure_topic(topic)
    transport.publish(topic, payload, attributes)
    transport.open_reader(topic, group)   -> reader with .receive(timeout) / .close()
    transport.delete_topic(topic)

Pub/Sub uses Google's own Python client (google-cloud-pubsub) against the emulator named
by PUBSUB_EMULATOR_HOST; Kafka uses confluent-kafka against KAFKA_BOOTSTRAP_SERVERS;
Redis Streams uses redis-py against REDIS_URL.

Traces: requests carry a W3C `traceparent` written by OpenTelemetry's Python propagator
(opentelemetry-api), and the reply's is read back with it (`new_trace`, `trace_of`).
"""

import os
import sys
import time
import uuid

sys.path.insert(0, os.environ["INTEROP_GENERATED"])
import classifier_pb2  # noqa: E402  (generated from proto/proto/classifier.proto)

# Attribute (Pub/Sub) / header (Kafka) names of the contract.
REQUEST_ID = "request-id"
REPLY_TOPIC = "reply-topic"
JOB_ID = "job-id"
CONTENT_TYPE = "content-type"
CONTENT_TYPE_REQUEST = "application/x-protobuf; message=classifier.v1.ClassifyRequest"
CONTENT_TYPE_RESPONSE = "application/x-protobuf; message=classifier.v1.ClassifyResponse"
TRACEPARENT = "traceparent"
SCHEMA_VERSION = 2

# The servers' consumer group (config `server.group`).
SERVER_GROUP = "classifier-server"


def now_micros():
    return int(time.time() * 1_000_000)


def new_id():
    return uuid.uuid4().hex


def new_trace():
    """A fresh W3C trace context (random trace and span ids, sampled), as the attributes
    OpenTelemetry's own propagator writes for it, and its trace id."""
    import random

    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span_context = trace.SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    carrier = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return carrier, span_context.trace_id


def trace_of(attributes):
    """The trace id in a message's `traceparent`, read by OpenTelemetry's propagator
    (None when there is none or it is invalid)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract(attributes)
    span_context = trace.get_current_span(context).get_span_context()
    return span_context.trace_id if span_context.is_valid else None


class Received:
    """One message read from a topic, settled with ack() / nack()."""

    def __init__(self, payload, attributes, ack, nack):
        self.payload = payload
        self.attributes = attributes
        self.ack = ack
        self.nack = nack


# ---------------------------------------------------------------- Pub/Sub


class PubSubTransport:
    """Topics are Pub/Sub topics; group G on topic T is the subscription `T--G`."""

    def __init__(self, project="local-project"):
        from google.cloud import pubsub_v1

        if not os.environ.get("PUBSUB_EMULATOR_HOST"):
            raise SystemExit("PUBSUB_EMULATOR_HOST is not set")
        self.project = project
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()

    def _topic(self, topic):
        return self.publisher.topic_path(self.project, topic)

    def _subscription(self, topic, group):
        return self.subscriber.subscription_path(self.project, f"{topic}--{group}")

    def ensure_topic(self, topic):
        from google.api_core.exceptions import AlreadyExists

        try:
            self.publisher.create_topic(name=self._topic(topic))
        except AlreadyExists:
            pass

    def ensure_subscription(self, topic, group):
        from google.api_core.exceptions import AlreadyExists

        try:
            self.subscriber.create_subscription(
                name=self._subscription(topic, group),
                topic=self._topic(topic),
                ack_deadline_seconds=30,
            )
        except AlreadyExists:
            pass

    def publish(self, topic, payload, attributes):
        self.publisher.publish(self._topic(topic), payload, **attributes).result(timeout=30)

    def open_reader(self, topic, group):
        self.ensure_topic(topic)
        self.ensure_subscription(topic, group)
        return PubSubReader(self.subscriber, self._subscription(topic, group))

    def delete_topic(self, topic):
        from google.api_core.exceptions import NotFound

        for subscription in self.publisher.list_topic_subscriptions(topic=self._topic(topic)):
            try:
                self.subscriber.delete_subscription(subscription=subscription)
            except NotFound:
                pass
        try:
            self.publisher.delete_topic(topic=self._topic(topic))
        except NotFound:
            pass


class PubSubReader:
    """Synchronous pull: simple, and enough for a test peer."""

    def __init__(self, subscriber, subscription):
        self.subscriber = subscriber
        self.subscription = subscription
        self.buffer = []

    def receive(self, timeout):
        from google.api_core.exceptions import DeadlineExceeded

        deadline = time.monotonic() + timeout
        while not self.buffer and time.monotonic() < deadline:
            try:
                response = self.subscriber.pull(
                    subscription=self.subscription, max_messages=100, timeout=5
                )
            except DeadlineExceeded:
                continue
            for item in response.received_messages:
                ack_id = item.ack_id

                def ack(ack_id=ack_id):
                    self.subscriber.acknowledge(subscription=self.subscription, ack_ids=[ack_id])

                def nack(ack_id=ack_id):
                    self.subscriber.modify_ack_deadline(
                        subscription=self.subscription, ack_ids=[ack_id], ack_deadline_seconds=0
                    )

                self.buffer.append(
                    Received(item.message.data, dict(item.message.attributes), ack, nack)
                )
        return self.buffer.pop(0) if self.buffer else None

    def close(self):
        for message in self.buffer:
            message.nack()
        self.buffer = []


# ---------------------------------------------------------------- Kafka


class KafkaTransport:
    """Topics are Kafka topics; attributes are headers; group G on topic T is the
    consumer group `T.G`. A private reply topic is read by manual assignment (no group
    join), as the contract allows."""

    def __init__(self):
        from confluent_kafka.admin import AdminClient

        self.servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not self.servers:
            raise SystemExit("KAFKA_BOOTSTRAP_SERVERS is not set")
        self.admin = AdminClient({"bootstrap.servers": self.servers})
        self.producer = None

    def ensure_topic(self, topic, partitions=1):
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import NewTopic

        futures = self.admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
        for future in futures.values():
            try:
                future.result(timeout=30)
            except Exception as error:  # KafkaException wrapping a KafkaError
                if error.args and getattr(error.args[0], "code", lambda: None)() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise

    def publish(self, topic, payload, attributes, key=None):
        from confluent_kafka import Producer

        if self.producer is None:
            self.producer = Producer({"bootstrap.servers": self.servers, "linger.ms": 5})
        failures = []

        def delivered(error, _message):
            if error is not None:
                failures.append(error)

        self.producer.produce(
            topic,
            value=payload,
            key=key,
            headers=[(name, value.encode()) for name, value in attributes.items()],
            on_delivery=delivered,
        )
        if self.producer.flush(30) != 0 or failures:
            raise RuntimeError(f"kafka publish to {topic} failed: {failures}")

    def open_reader(self, topic, group, private=False):
        from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING

        consumer = Consumer(
            {
                "bootstrap.servers": self.servers,
                "group.id": f"{topic}.{group}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 20,
            }
        )
        if private:
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        else:
            consumer.subscribe([topic])
        return KafkaReader(consumer)

    def delete_topic(self, topic):
        for future in self.admin.delete_topics([topic]).values():
            try:
                future.result(timeout=30)
            except Exception:
                pass


class KafkaReader:
    def __init__(self, consumer):
        self.consumer = consumer

    def receive(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.consumer.poll(1.0)
            if message is None:
                continue
            if message.error():
                print(f"kafka: {message.error()}", file=sys.stderr)
                continue
            attributes = {name: value.decode() for name, value in (message.headers() or [])}

            def ack(message=message):
                self.consumer.commit(message=message, asynchronous=False)

            return Received(message.value(), attributes, ack, lambda: None)
        return None

    def close(self):
        self.consumer.close()


# ---------------------------------------------------------------- Redis Streams


class RedisTransport:
    """Topic T is the stream key T; group G on it is the consumer group G (not T.G). An
    entry holds `payload`, `key` and one `attr:<name>` field per attribute. Groups start
    at the stream's end (`$`), created with MKSTREAM; replies are published with
    NOMKSTREAM, so a reply stream must exist before the reply."""

    def __init__(self):
        import redis

        url = os.environ.get("REDIS_URL")
        if not url:
            raise SystemExit("REDIS_URL is not set")
        self.redis = redis.Redis.from_url(url)

    def ensure_topic(self, topic):
        # An empty stream: one entry added and trimmed away at once, only if the key is
        # not there yet (MAXLEN 0 on a live stream would drop its entries).
        if not self.redis.exists(topic):
            self.redis.xadd(topic, {"created": "1"}, maxlen=0, approximate=False)

    def ensure_subscription(self, topic, group):
        import redis

        try:
            self.redis.xgroup_create(topic, group, id="$", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def publish(self, topic, payload, attributes, key=None, create=True):
        fields = {"payload": payload}
        if key is not None:
            fields["key"] = key
        for name, value in attributes.items():
            fields[f"attr:{name}"] = value
        entry = self.redis.xadd(topic, fields, nomkstream=not create)
        if entry is None:
            raise LookupError(f"redis: stream {topic} does not exist")

    def open_reader(self, topic, group):
        self.ensure_subscription(topic, group)
        return RedisReader(self.redis, topic, group)

    def delete_topic(self, topic):
        self.redis.delete(topic)


class RedisReader:
    def __init__(self, client, topic, group):
        self.redis = client
        self.topic = topic
        self.group = group
        self.consumer = f"python-{new_id()[:8]}"
        self.buffer = []

    def receive(self, timeout):
        if not self.buffer:
            answer = self.redis.xreadgroup(
                self.group, self.consumer, {self.topic: ">"}, count=100,
                block=max(1, int(timeout * 1000)),
            )
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    self.buffer.append(self._received(entry_id, fields))
        return self.buffer.pop(0) if self.buffer else None

    def _received(self, entry_id, fields):
        attributes = {
            name.decode()[len("attr:"):]: value.decode()
            for name, value in fields.items()
            if name.startswith(b"attr:")
        }

        def ack():
            self.redis.xack(self.topic, self.group, entry_id)

        # Unacked entries stay pending in the group and are claimed by another member.
        return Received(fields.get(b"payload", b""), attributes, ack, lambda: None)

    def close(self):
        self.buffer = []


def transport(backend):
    if backend == "pubsub":
        return PubSubTransport()
    if backend == "kafka":
        return KafkaTransport()
    if backend == "redis":
        return RedisTransport()
    raise SystemExit(f"unknown backend {backend!r}: expected pubsub, kafka or redis")
