#!/usr/bin/env python3
"""ONNX Runtime's answers for preprocessed inputs: the peer that checks an ONNX file we wrote
(`trainer export --onnx`) gives the same top-1 as our native path.

    onnx-top1.py MODEL.onnx INPUTS.npy      # prints a JSON list: the top-1 class per image

INPUTS.npy holds float32 inputs already preprocessed, shaped as the model's input
([N, C, H, W]). Run with the venv `scripts/onnxruntime-lib.sh` makes (.tools/ort-venv).
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, inputs = sys.argv[1], sys.argv[2]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.load(inputs)
    name = session.get_inputs()[0].name
    top1 = []
    for start in range(0, len(x), 512):
        (logits,) = session.run(None, {name: x[start:start + 512]})
        top1.extend(int(i) for i in logits.argmax(axis=1))
    json.dump(top1, sys.stdout)


if __name__ == "__main__":
    main()
