"""Interop tests: our binaries against peers written from the wire contract alone.

Run by tests/interop/run.sh (which makes the virtualenv and generates the protobuf
classes). For every backend named in INTEROP_BACKENDS (default "pubsub kafka redis"):

- a foreign *client* (foreign_client.py) gets the same answers from `classifier-server`
  as `client-app` does for the same files: same predicted classes and probabilities,
  same error codes; every reply comes back in the foreign client's W3C trace; requests
  whose deadline has passed are answered DEADLINE_EXCEEDED;
- `client-app` accepts the replies of a foreign *server* (foreign_server.py): every
  image classified, by that server, exit 0;
- `client-app` and `classifier-server`, told `OTEL_EXPORTER_OTLP_ENDPOINT`, export their
  spans over OTLP/HTTP to a receiver that decodes them with the OpenTelemetry project's
  own protobuf classes (opentelemetry-proto): one trace from the job's span through the
  server's spans of each request.
"""

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SERVER_BIN = os.environ.get("CLASSIFIER_SERVER_BIN", os.path.join(TARGET, "debug", "classifier-server"))
CLIENT_BIN = os.environ.get("CLIENT_APP_BIN", os.path.join(TARGET, "debug", "client-app"))
BACKENDS = os.environ.get("INTEROP_BACKENDS", "pubsub kafka redis").split()
IMAGES_PER_CLASS = 2


def sample_folder(with_bad_file):
    """A temporary copy of a few example images per class (plus a text file)."""
    folder = tempfile.mkdtemp(prefix="interop-")
    examples = os.path.join(ROOT, "examples")
    for class_dir in sorted(os.listdir(examples)):
        source = os.path.join(examples, class_dir)
        if not os.path.isdir(source):
            continue
        os.makedirs(os.path.join(folder, class_dir))
        for name in sorted(os.listdir(source))[:IMAGES_PER_CLASS]:
            shutil.copy(os.path.join(source, name), os.path.join(folder, class_dir, name))
    if with_bad_file:
        with open(os.path.join(folder, "notes.txt"), "w") as file:
            file.write("not an image\n")
    return folder


def files_under(folder):
    return sorted(
        os.path.join(directory, name) for directory, _, names in os.walk(folder) for name in names
    )


def environment(backend, request_topic):
    env = dict(os.environ)
    env.update(
        CLASSIFIER_BROKER=backend,
        CLASSIFIER_REQUEST_TOPIC=request_topic,
        CLASSIFIER_DEAD_LETTER_TOPIC="",
        RUST_LOG=env.get("RUST_LOG", "warn"),
    )
    return env


def run_client_app(backend, request_topic, folder):
    """`client-app classify` on the folder; its exit status and results by file (read
    from the results file it writes beside the folder, removed afterwards)."""
    output = folder + ".jsonl"
    completed = subprocess.run(
        [CLIENT_BIN, "classify", folder, "--quiet", "--timeout", "90", "--output", output],
        env=environment(backend, request_topic),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = {}
    if os.path.exists(output):
        with open(output) as file:
            for line in file:
                row = json.loads(line)
                rows[row["file"]] = row
        os.remove(output)
    return completed, rows


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Interop(unittest.TestCase):
    maxDiff = None

    def check_foreign_client_matches_client_app(self, backend):
        topic = f"interop-requests-{os.getpid()}-{backend}-{int(time.time())}"
        folder = sample_folder(with_bad_file=True)
        self.addCleanup(shutil.rmtree, folder, True)
        server = subprocess.Popen(
            [SERVER_BIN], env=environment(backend, topic), cwd=ROOT, stdout=subprocess.DEVNULL
        )
        self.addCleanup(stop, server)

        completed, ours = run_client_app(backend, topic, folder)
        self.assertEqual(completed.returncode, 2, f"client-app (1 bad file → exit 2): {completed.stderr[-2000:]}")

        foreign = subprocess.run(
            [sys.executable, os.path.join(HERE, "foreign_client.py"), "--backend", backend,
             "--request-topic", topic, "--root", os.path.dirname(folder), "--timeout", "90", *files_under(folder)],
            env=environment(backend, topic),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(foreign.returncode, 0, f"foreign client: {foreign.stderr[-3000:]}")
        theirs = {row["file"]: row for row in map(json.loads, foreign.stdout.splitlines())}

        self.assertEqual(sorted(theirs), sorted(ours))
        self.assertEqual(len(theirs), 10 * IMAGES_PER_CLASS + 1)
        classified = 0
        for name, row in ours.items():
            other = theirs[name]
            self.assertEqual(other["status"], row["status"], name)
            if row["status"] == "classified":
                classified += 1
                self.assertEqual(other["predicted_class"], row["predicted_class"], name)
                self.assertAlmostEqual(other["probability"], row["probability"], places=5, msg=name)
                ours_top = [(c, round(float(p), 4)) for c, p in (kv.rsplit(":", 1) for kv in row["top_k"].split(";"))]
                theirs_top = [(c, round(p, 4)) for c, p in other["top_k"]]
                self.assertEqual(theirs_top, ours_top, name)
            else:
                self.assertEqual(other["error_code"], row["error_code"], name)
        self.assertEqual(classified, 10 * IMAGES_PER_CLASS)
        self.assertEqual(theirs[os.path.basename(folder) + "/notes.txt"]["error_code"], "UNSUPPORTED_FORMAT")
        traces = {row["file"]: row["trace"] for row in theirs.values()}
        self.assertEqual(set(traces.values()), {"same"}, traces)

        # The same files with a deadline 10 s ago: no inference, DEADLINE_EXCEEDED each.
        expired = subprocess.run(
            [sys.executable, os.path.join(HERE, "foreign_client.py"), "--backend", backend,
             "--request-topic", topic, "--root", os.path.dirname(folder), "--timeout", "90",
             "--deadline-in", "-10", *files_under(folder)[:4]],
            env=environment(backend, topic),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(expired.returncode, 0, f"foreign client: {expired.stderr[-3000:]}")
        codes = [json.loads(line).get("error_code") for line in expired.stdout.splitlines()]
        self.assertEqual(codes, ["DEADLINE_EXCEEDED"] * 4, expired.stdout)

    def check_client_app_accepts_foreign_server(self, backend):
        topic = f"interop-foreign-server-{os.getpid()}-{backend}-{int(time.time())}"
        folder = sample_folder(with_bad_file=False)
        self.addCleanup(shutil.rmtree, folder, True)
        server = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "foreign_server.py"), "--backend", backend,
             "--request-topic", topic, "--idle-exit", "300"],
            env=environment(backend, topic),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(server.stdout.close)
        self.addCleanup(stop, server)
        self.assertEqual(server.stdout.readline().strip(), "foreign server: ready")

        completed, rows = run_client_app(backend, topic, folder)
        self.assertEqual(completed.returncode, 0, f"client-app: {completed.stderr[-2000:]}")
        self.assertEqual(len(rows), 10 * IMAGES_PER_CLASS)
        for name, row in rows.items():
            self.assertEqual(row["status"], "classified", name)
            self.assertEqual(row["predicted_class"], "python-peer", name)
            self.assertEqual(row["server_id"], "python-interop-server", name)
        stop(server)
        summary = server.stdout.read()
        self.assertIn(f"answered {10 * IMAGES_PER_CLASS}", summary)


class OtlpReceiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on a free loopback port: decodes every POST to
    /v1/traces as an ExportTraceServiceRequest and keeps its spans as dicts."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), OtlpHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self):
        with self.lock:
            return list(self.spans)


class OtlpHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/traces" or "protobuf" not in self.headers.get("Content-Type", ""):
            self.send_response(404)
            self.end_headers()
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        dict(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            links=[link.span_id.hex() for link in span.links],
                        )
                    )
        with self.server.lock:
            self.server.spans.extend(spans)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_):
        pass


class Traces(unittest.TestCase):
    maxDiff = None

    def check_spans_exported_over_otlp(self, backend):
        receiver = OtlpReceiver()
        self.addCleanup(receiver.server_close)
        self.addCleanup(receiver.shutdown)
        topic = f"interop-traces-{os.getpid()}-{backend}-{int(time.time())}"
        folder = sample_folder(with_bad_file=False)
        self.addCleanup(shutil.rmtree, folder, True)
        env = environment(backend, topic)
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
        server = subprocess.Popen([SERVER_BIN], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        self.addCleanup(stop, server)
        completed = subprocess.run(
            [CLIENT_BIN, "classify", folder, "--quiet", "--timeout", "90"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr[-2000:])
        stop(server)  # SIGTERM: the server sends its last spans on the way out

        files = 10 * IMAGES_PER_CLASS
        deadline = time.monotonic() + 30
        while True:
            spans = receiver.received()
            jobs = [s for s in spans if s["name"] == "classify job" and s["service"] == "client-app"]
            job = jobs[0] if len(jobs) == 1 else None
            requests = [
                s for s in spans
                if job and s["name"] == "classify request" and s["service"] == "classifier-server"
                and s["trace_id"] == job["trace_id"] and s["parent_span_id"] == job["span_id"]
            ]
            if len(requests) == files or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        names = sorted({(s["service"], s["name"]) for s in spans})
        self.assertIsNotNone(job, f"one job span expected; got {names}")
        self.assertEqual(len(requests), files, f"server spans of the job's trace; got {names}")
        ids = {s["span_id"] for s in requests}
        for child in ("decode", "reply"):
            parents = {s["parent_span_id"] for s in spans if s["name"] == child}
            self.assertTrue(ids <= parents, f"every request span has a {child} span")
        linked = {link for s in spans if s["name"] == "inference" for link in s["links"]}
        self.assertTrue(ids <= linked, "every request is linked from the batch that ran it")


def add_backend_tests(cls, checks, backends):
    """A test `test_<check>_<backend>` on `cls` for every `check_<check>` and backend."""
    for backend in backends:
        for check in checks:
            method = getattr(cls, f"check_{check}")
            setattr(cls, f"test_{check}_{backend}", lambda self, m=method, b=backend: m(self, b))


add_backend_tests(Interop, ("foreign_client_matches_client_app", "client_app_accepts_foreign_server"), BACKENDS)
add_backend_tests(Traces, ("spans_exported_over_otlp",), BACKENDS)

if __name__ == "__main__":
    unittest.main(verbosity=2)
