"""The server's token-protected /metrics scraped by Prometheus itself (Debian's
prometheus, a client nobody here wrote): the job that sends the bearer token from a
credentials file, as the README says to configure it, is up and its samples are stored;
the job without the token is down with a 401; the job with a wrong token is down too;
and the token appears nowhere in the server's output.

Needs the debug binaries (cargo build --workspace --bins) and `prometheus` on PATH
(run.sh installs Debian's package when missing). The server runs on the embedded broker:
scraping needs no broker traffic.
"""

import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVER = os.path.join(ROOT, "target", "debug", "classifier-server")
TOKEN = "scrape-me-7f3a9c"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(what, check, seconds=60):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as e:  # not listening yet
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class PrometheusScrapes(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.metrics_port, self.prom_port = free_port(), free_port()
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        config = os.path.join(self.tmp.name, "server.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nmetrics_token_sha256 = ["{digest}"]\n')
        self.server_log = os.path.join(self.tmp.name, "server.log")
        self.server = self.spawn(
            [SERVER, "--config", config, "--broker", "embedded",
             "--metrics-addr", f"127.0.0.1:{self.metrics_port}"], self.server_log)
        self.addCleanup(stop, self.server)
        # Scraped before it listens, the job with the token would start down.
        wait_for("the server's metrics port", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2).status == 200)
        self.prometheus = self.start_prometheus()
        self.addCleanup(stop, self.prometheus)

    def start_prometheus(self):
        token_file = os.path.join(self.tmp.name, "token")
        wrong_file = os.path.join(self.tmp.name, "wrong")
        with open(token_file, "w") as f:
            f.write(TOKEN)
        with open(wrong_file, "w") as f:
            f.write("not-the-token")
        target = f"127.0.0.1:{self.metrics_port}"
        jobs = [
            {"job_name": "with-token", "authorization": {"credentials_file": token_file}},
            {"job_name": "without-token"},
            {"job_name": "wrong-token", "authorization": {"credentials_file": wrong_file}},
        ]
        for job in jobs:
            job["static_configs"] = [{"targets": [target]}]
        config = os.path.join(self.tmp.name, "prometheus.yml")
        with open(config, "w") as f:  # JSON is YAML
            json.dump({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                       "scrape_configs": jobs}, f)
        return self.spawn(
            ["prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(self.tmp.name, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}"],
            os.path.join(self.tmp.name, "prometheus.log"))

    @staticmethod
    def spawn(command, log):
        """Starts `command` with its output in the file `log`."""
        with open(log, "w") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        self.assertEqual(body["status"], "success", body)
        return body["data"]

    def up(self):
        """Job name → value of `up`, once every job has been scraped."""
        rows = self.api("query", query="up")["result"]
        values = {row["metric"]["job"]: row["value"][1] for row in rows}
        # A first scrape may still race the server's start: wait for the token's job.
        return values if len(values) == 3 and values.get("with-token") == "1" else None

    def test_only_the_job_with_the_token_is_up_and_stored(self):
        up = wait_for("every job scraped", self.up)
        self.assertEqual(up, {"with-token": "1", "without-token": "0", "wrong-token": "0"})
        targets = self.api("targets")["activeTargets"]
        errors = {t["labels"]["job"]: t["lastError"] for t in targets}
        self.assertEqual(errors["with-token"], "")
        for job in ("without-token", "wrong-token"):
            self.assertIn("401", errors[job], errors)
        stored = wait_for("a server sample stored", lambda: self.api(
            "query", query='classifier_requests_received_total{job="with-token"}')["result"])
        self.assertEqual(stored[0]["value"][1], "0")
        with open(self.server_log) as f:
            self.assertNotIn(TOKEN, f.read(), "the token must never be logged")
        print(f"prometheus: up {up}; refused jobs' errors {errors['without-token']!r}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
