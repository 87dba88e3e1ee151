#!/usr/bin/env python3
"""Load on the HTTP gateway: Open Inference Protocol infer requests with wrk (Debian's
`wrk`), beside the CLI's own throughput in the same run.

    scripts/gateway-bench.py [--broker embedded|kafka|redis|pubsub] [--runs 3] [--seconds 10]

Release binaries from $CARGO_TARGET_DIR/release (default target/release). On a real
broker a `classifier-server` is started behind the gateway (the broker's usual variable,
e.g. KAFKA_BOOTSTRAP_SERVERS, says where it is); on the embedded one the gateway runs the
server in its process. For each concurrency (1 and 64 connections, one image per request,
JSON with the image base64-encoded) it prints requests/s and p50/p99 latency as wrk
measures them, medians of --runs runs; then `client-app bench` through the same broker
(the CLI's throughput at its window of 256); then the gateway's peak RSS (VmHWM) before
and after the runs, which must not grow with the number of images sent. With
--job-folder DIR (e.g. 20,000 images from scripts/make-bench-folder.py) it also uploads
the folder as one job (a tar) and times it until done, with the peak RSS after it.
"""

import argparse
import base64
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TARGET = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
IMAGE = os.path.join(ROOT, "examples", "bag", "00018.png")

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("GATEWAY_BENCH_BODY")):read("*a")
"""


def cpu_name():
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_gateway(env):
    process = subprocess.Popen(
        [os.path.join(TARGET, "classifier-gateway"), "--listen", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    line = process.stdout.readline().strip()
    prefix = "classifier-gateway listening on http://"
    if not line.startswith(prefix):
        process.kill()
        sys.exit(f"the gateway did not start: {line!r}")
    return process, line[len(prefix):]


def model_name(address):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["curl", "-sf", f"http://{address}/v2/models"], capture_output=True, text=True, timeout=30)
            models = json.loads(out.stdout or "{}").get("models", [])
            if models and models[0].get("state") == "READY":
                return models[0]["name"]
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            pass
        time.sleep(1)
    sys.exit("no model became ready behind the gateway")


def to_ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url, connections, seconds, body_file, script):
    threads = min(connections, 2)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        env=dict(os.environ, GATEWAY_BENCH_BODY=body_file), capture_output=True, text=True, check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        sys.exit(f"wrk saw {errors.group(1)} failed responses:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return rate, p50, p99, requests


def run_job(address, folder, work, pid):
    """Uploads `folder` as one tar job, waits until it is done; prints images/s and RSS."""
    archive = os.path.join(work, "job.tar")
    names = sorted(os.listdir(folder))
    with tarfile.open(archive, "w") as tar:
        for name in names:
            tar.add(os.path.join(folder, name), arcname=name)
    started = time.monotonic()
    with open(archive, "rb") as file:
        request = urllib.request.Request(
            f"http://{address}/v1/jobs", data=file.read(), method="POST",
            headers={"Content-Type": "application/x-tar"},
        )
    job = json.load(urllib.request.urlopen(request, timeout=600))
    uploaded = time.monotonic() - started
    while job["state"] == "running":
        time.sleep(0.2)
        job = json.load(urllib.request.urlopen(f"http://{address}/v1/jobs/{job['id']}", timeout=60))
    elapsed = time.monotonic() - started
    print(f"job of {job['files']} files ({os.path.getsize(archive) / 2**20:.1f} MiB tar): {job['state']}, "
          f"{job['classified']} classified, {elapsed:.1f} s upload to done ({uploaded:.1f} s to the 202) "
          f"= {job['files'] / elapsed:.0f} images/s; "
          f"gateway peak RSS {peak_rss_mib(pid):.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="embedded")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--job-folder", help="also send this folder as one job and time it")
    args = parser.parse_args()

    env = dict(os.environ, CLASSIFIER_BROKER=args.broker, RUST_LOG="warn")
    env["CLASSIFIER_REQUEST_TOPIC"] = f"gateway-bench-{os.getpid()}"
    processes = []
    try:
        if args.broker != "embedded":
            processes.append(subprocess.Popen([os.path.join(TARGET, "classifier-server")], env=env, cwd=ROOT))
        gateway, address = start_gateway(env)
        processes.append(gateway)
        name = model_name(address)
        url = f"http://{address}/v2/models/{name}/infer"
        work = tempfile.mkdtemp(prefix="gateway-bench-")
        body_file = os.path.join(work, "body.json")
        script = os.path.join(work, "post.lua")
        with open(IMAGE, "rb") as file:
            image = base64.b64encode(file.read()).decode()
        with open(body_file, "w") as file:
            json.dump({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}, file)
        with open(script, "w") as file:
            file.write(WRK_SCRIPT)

        wrk(url, 8, 2, body_file, script)  # warm-up
        rss_before = peak_rss_mib(gateway.pid)
        print(f"# gateway-bench: broker {args.broker}, CPU {cpu_name()}, {os.cpu_count()} CPUs, "
              f"{args.runs} runs of {args.seconds} s, one {os.path.getsize(IMAGE)}-byte PNG per request")
        sent = 0
        for connections in (1, 64):
            results = [wrk(url, connections, args.seconds, body_file, script) for _ in range(args.runs)]
            sent += sum(r[3] for r in results)
            rates = [r[0] for r in results]
            print(f"connections {connections:>3}: requests/s median {statistics.median(rates):8.0f} "
                  f"(runs {', '.join(f'{r:.0f}' for r in rates)}), "
                  f"p50 {statistics.median(r[1] for r in results):7.2f} ms, "
                  f"p99 {statistics.median(r[2] for r in results):7.2f} ms")
        rss_after = peak_rss_mib(gateway.pid)
        print(f"gateway peak RSS: {rss_before:.1f} MiB after warm-up, {rss_after:.1f} MiB after {sent} more images")
        if args.job_folder:
            run_job(address, args.job_folder, work, gateway.pid)

        bench = [os.path.join(TARGET, "client-app"), "bench", "--images", "4000", "--runs", str(args.runs),
                 "--no-floor", "--latency-images", "100"]
        if args.broker != "embedded":
            bench.append("--external-server")
        out = subprocess.run(bench, env=env, capture_output=True, text=True, cwd=ROOT, check=True).stdout
        print("client-app bench, same broker (window 256):")
        for line in out.splitlines():
            if "images/s" in line or "throughput" in line.lower() or "one at a time" in line:
                print("  " + line.strip())
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
