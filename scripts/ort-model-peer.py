#!/usr/bin/env python3
"""The ONNX Runtime peer for scripts/onnx-engines-bench.sh: images/s of one ONNX image
classifier at several batch sizes, model only (random preprocessed inputs), with the
same thread count as our engines.

    ort-model-peer.py MODEL.onnx SECONDS THREADS BATCH...   # one line per batch:
                                                            # "ort batch B: N images/s"
"""
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    item = [d if isinstance(d, int) else 224 for d in inp.shape[1:]]
    for batch in (int(b) for b in sys.argv[4:]):
        x = np.random.default_rng(1).standard_normal([batch, *item]).astype(np.float32)
        session.run(None, {inp.name: x})
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {inp.name: x})
            runs += 1
        elapsed = time.perf_counter() - start
        print(f"ort batch {batch}: {runs * batch / elapsed:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
