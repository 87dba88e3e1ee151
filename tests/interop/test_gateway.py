"""The HTTP gateway against clients nobody here wrote: Triton's `tritonclient[http]` and
KServe's `InferenceRESTClient`, both from PyPI, speaking the Open Inference Protocol v2.

Run by tests/interop/run.sh. For the embedded broker (the gateway runs a server in its
process) and for Kafka, Pub/Sub and Redis (a `classifier-server` process behind the
gateway, over the real broker; GATEWAY_BACKENDS names fewer):

- health, server and model metadata, model readiness as each client reads them;
- inference with the binary data extension (Triton's default) and in JSON (images
  base64-encoded), the classification extension, and KServe's client: the same top-1
  classes and probabilities as `client-app classify` gives for the same files;
- a corrupt image and an unknown model are refused with the server's error code;
- API keys: a client without the key gets 401, with it gets answers.
"""

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from test_interop import ROOT, SERVER_BIN, TARGET, add_backend_tests, environment, files_under, run_client_app, sample_folder, stop

GATEWAY_BIN = os.environ.get("CLASSIFIER_GATEWAY_BIN", os.path.join(TARGET, "debug", "classifier-gateway"))
BACKENDS = os.environ.get("GATEWAY_BACKENDS", "embedded kafka pubsub redis").split()
API_KEY = "interop-key-Zx81"


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


def text(value):
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return value.decode() if isinstance(value, bytes) else value


def wait_for_model(client, headers=None):
    """The one model's index entry, once a server answers for it (a server on a real
    broker may still be joining its group)."""
    deadline = time.monotonic() + 120
    while True:
        models = client.get_model_repository_index(headers=headers)
        if models and models[0]["state"] == "READY":
            return models
        if time.monotonic() > deadline:
            raise AssertionError(f"no model became ready: {models}")
        time.sleep(1)


def start_gateway(backend, topic, api_key, data_dir):
    """A gateway on a free loopback port, its jobs in `data_dir` (the caller's temporary
    folder); returns (process, host:port)."""
    env = environment(backend, topic)
    env["RUST_LOG"] = "warn"
    config = os.path.join(data_dir, "gateway.toml")
    with open(config, "w") as file:
        file.write(f"[gateway]\ndata_dir = {json.dumps(data_dir)}\n")
        if api_key:
            digest = hashlib.sha256(api_key.encode()).hexdigest()
            file.write(f'api_key_sha256 = ["{digest}"]\n')
    env["CLASSIFIER_CONFIG"] = config
    process = subprocess.Popen(
        [GATEWAY_BIN, "--broker", backend, "--listen", "127.0.0.1:0"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline().strip()
    prefix = "classifier-gateway listening on http://"
    if not line.startswith(prefix):
        stop(process)
        raise AssertionError(f"gateway did not start: {line!r}")
    return process, line[len(prefix):]


class Gateway(unittest.TestCase):
    maxDiff = None

    def serve(self, backend, api_key=None):
        """A gateway (and, on a real broker, a server behind it) for this test."""
        topic = f"gateway-requests-{os.getpid()}-{backend}-{self._testMethodName[-20:]}"
        if backend != "embedded":
            server = subprocess.Popen([SERVER_BIN], env=environment(backend, topic), cwd=ROOT, stdout=subprocess.DEVNULL)
            self.addCleanup(stop, server)
        data_dir = tempfile.mkdtemp(prefix="gateway-data-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        gateway, address = start_gateway(backend, topic, api_key, data_dir)
        self.addCleanup(stop, gateway)
        self.addCleanup(gateway.stdout.close)
        return topic, address

    def check_triton_client(self, backend):
        topic, address = self.serve(backend)
        client = triton.InferenceServerClient(url=address, network_timeout=120.0, connection_timeout=120.0)
        self.assertTrue(client.is_server_live())
        self.assertTrue(client.is_server_ready())
        self.assertIn("binary_tensor_data", client.get_server_metadata()["extensions"])
        [model] = wait_for_model(client)
        name = model["name"]
        self.assertEqual(model["state"], "READY")
        self.assertTrue(client.is_model_ready(name))
        metadata = client.get_model_metadata(name)
        self.assertEqual(metadata["inputs"], [{"name": "image", "datatype": "BYTES", "shape": [-1]}])
        classes = metadata["parameters"]["class_names"]
        self.assertEqual(len(classes), 10)
        self.assertEqual(metadata["outputs"][0], {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]})

        folder = sample_folder(with_bad_file=False)
        self.addCleanup(shutil.rmtree, folder, True)
        files = files_under(folder)
        completed, ours = run_client_app(backend, topic, folder)
        self.assertEqual(completed.returncode, 0, completed.stderr[-2000:])
        images = [read_bytes(path) for path in files]

        # The binary data extension, every output (Triton's client asks for binary).
        tensor = triton.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        result = client.infer(name, [tensor])
        probabilities = result.as_numpy("probabilities")
        labels = [text(label) for label in result.as_numpy("label")]
        self.assertEqual(probabilities.shape, (len(images), 10))
        for row, label, path in zip(probabilities, labels, files):
            mine = ours[os.path.relpath(path, os.path.dirname(folder))]
            self.assertEqual(label, mine["predicted_class"], path)
            self.assertEqual(classes[int(np.argmax(row))], mine["predicted_class"], path)
            self.assertAlmostEqual(float(row.max()), mine["probability"], places=5, msg=path)
            self.assertAlmostEqual(float(row.sum()), 1.0, places=4)

        # JSON: images base64-encoded, top 3 by the classification extension.
        tensor = triton.InferInput("image", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([base64.b64encode(image) for image in images[:2]], dtype=np.object_), binary_data=False)
        wanted = [triton.InferRequestedOutput("probabilities", binary_data=False, class_count=3)]
        result = client.infer(name, [tensor], outputs=wanted, request_id="req-7")
        self.assertEqual(result.get_response()["id"], "req-7")
        top = result.as_numpy("probabilities")
        self.assertEqual(top.shape, (2, 3))
        for row, path in zip(top, files[:2]):
            score, index, label = text(row[0]).split(":", 2)
            mine = ours[os.path.relpath(path, os.path.dirname(folder))]
            self.assertEqual(label, mine["predicted_class"])
            self.assertEqual(classes[int(index)], label)
            self.assertAlmostEqual(float(score), mine["probability"], places=5)

        # Refusals carry the reason.
        bad = triton.InferInput("image", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"\x89PNG\r\n\x1a\n but not really"], dtype=np.object_))
        with self.assertRaises(InferenceServerException) as caught:
            client.infer(name, [bad])
        self.assertIn("CORRUPT_IMAGE", str(caught.exception))
        with self.assertRaises(InferenceServerException) as caught:
            client.get_model_metadata("no-such-model")
        self.assertEqual(caught.exception.status(), "404")
        self.assertFalse(client.is_model_ready("no-such-model"))

    def check_kserve_client(self, backend):
        topic, address = self.serve(backend)
        folder = sample_folder(with_bad_file=False)
        self.addCleanup(shutil.rmtree, folder, True)
        files = files_under(folder)[:4]
        completed, ours = run_client_app(backend, topic, folder)
        self.assertEqual(completed.returncode, 0, completed.stderr[-2000:])
        encoded = [base64.b64encode(read_bytes(path)).decode() for path in files]

        async def talk():
            client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
            base = f"http://{address}"
            try:
                self.assertTrue(await client.is_server_live(base))
                self.assertTrue(await client.is_server_ready(base))
                name = wait_for_model(triton.InferenceServerClient(url=address))[0]["name"]
                self.assertTrue(await client.is_model_ready(base, name))
                request = InferRequest(
                    model_name=name,
                    infer_inputs=[InferInput(name="image", shape=[len(encoded)], datatype="BYTES", data=encoded)],
                    request_id="kserve-1",
                )
                return await client.infer(base, request, model_name=name)
            finally:
                await client.close()

        response = asyncio.run(talk())
        self.assertEqual(response.id, "kserve-1")
        outputs = {output.name: output for output in response.outputs}
        probabilities = outputs["probabilities"].as_numpy()
        self.assertEqual(probabilities.shape, (len(files), 10))
        for label, row, path in zip(outputs["label"].data, probabilities, files):
            mine = ours[os.path.relpath(path, os.path.dirname(folder))]
            self.assertEqual(label, mine["predicted_class"], path)
            self.assertAlmostEqual(float(row.max()), mine["probability"], places=5, msg=path)

    def test_api_keys_embedded(self):
        _, address = self.serve("embedded", api_key=API_KEY)
        image = read_bytes(files_under(os.path.join(ROOT, "examples"))[0])
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        client = triton.InferenceServerClient(url=address)
        self.assertTrue(client.is_server_live(), "health stays open for probes")
        with self.assertRaises(InferenceServerException) as caught:
            client.get_model_repository_index()
        self.assertEqual(caught.exception.status(), "401")
        with self.assertRaises(InferenceServerException) as caught:
            client.infer("fashion-cnn", [tensor], headers={"Authorization": "Bearer wrong"})
        self.assertEqual(caught.exception.status(), "401")
        headers = {"Authorization": f"Bearer {API_KEY}"}
        [model] = wait_for_model(client, headers=headers)
        result = client.infer(model["name"], [tensor], headers=headers)
        self.assertEqual(result.as_numpy("probabilities").shape, (1, 10))


add_backend_tests(Gateway, ("triton_client", "kserve_client"), BACKENDS)

if __name__ == "__main__":
    unittest.main(verbosity=2)
