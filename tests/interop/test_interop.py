"""Interop tests: our binaries against peers written from the wire contract alone.

Run by tests/interop/run.sh (which makes the virtualenv and generates the protobuf
classes). For every backend named in INTEROP_BACKENDS (default "pubsub kafka"):

- a foreign *client* (foreign_client.py) gets the same answers from `classifier-server`
  as `client-app` does for the same files: same predicted classes and probabilities,
  same error codes;
- `client-app` accepts the replies of a foreign *server* (foreign_server.py): every
  image classified, by that server, exit 0.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SERVER_BIN = os.environ.get("CLASSIFIER_SERVER_BIN", os.path.join(TARGET, "debug", "classifier-server"))
CLIENT_BIN = os.environ.get("CLIENT_APP_BIN", os.path.join(TARGET, "debug", "client-app"))
BACKENDS = os.environ.get("INTEROP_BACKENDS", "pubsub kafka").split()
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


def add_backend_tests(cls, checks, backends):
    """A test `test_<check>_<backend>` on `cls` for every `check_<check>` and backend."""
    for backend in backends:
        for check in checks:
            method = getattr(cls, f"check_{check}")
            setattr(cls, f"test_{check}_{backend}", lambda self, m=method, b=backend: m(self, b))


add_backend_tests(Interop, ("foreign_client_matches_client_app", "client_app_accepts_foreign_server"), BACKENDS)

if __name__ == "__main__":
    unittest.main(verbosity=2)
