#!/usr/bin/env python3
"""Random-weight ONNX image classifiers of the architectures people export (issue 23), built
node by node with the `onnx` package's helpers: nothing is downloaded, no PyTorch needed.

    scripts/make-onnx-models.py fixtures [DIR]     # tiny models + ONNX Runtime references
                                                   # (default DIR: inference/tests/fixtures/onnx)
    scripts/make-onnx-models.py full [DIR] [NAME..] # 224x224 models for benchmarks
                                                   # (default DIR: .tools/onnx-models, gitignored;
                                                   # default NAMEs: resnet18 mobilenetv3-small)
    scripts/make-onnx-models.py list               # what each command makes

Needs onnx, onnxruntime and numpy (`scripts/ort-peer.sh` installs them into .tools/ort-venv:
run this script with .tools/ort-venv/bin/python).

Architectures, laid out as `torch.onnx.export` / tf2onnx write them:
  resnet18            torchvision ResNet-18: Conv 7x7/2, MaxPool, 4 stages of 2 basic blocks,
                      GlobalAveragePool, Flatten, Gemm (transB=1) to 1000 logits.
  mobilenetv3-small   torchvision MobileNetV3-Small: depthwise Conv (group=C), HardSwish
                      (opset >= 14; before that HardSigmoid + Mul, as torch exports it),
                      squeeze-excite GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul,
                      classifier Gemm -> HardSwish -> Gemm.
  mobilenetv2         torchvision MobileNetV2: ReLU6 as Clip(min, max inputs), inverted residuals.
  efficientnet-b0     torchvision EfficientNet-B0: SiLU as Sigmoid + Mul, squeeze-excite with
                      Sigmoid, MBConv stages.
  keras-mobilenet     a Keras MobileNet (v1) converted by tf2onnx: NHWC input, Transpose to NCHW,
                      'same' padding as asymmetric pads and as auto_pad=SAME_UPPER, ReLU6 as Clip,
                      Transpose back, ReduceMean over H, W, MatMul + Add, Softmax (the model outputs
                      probabilities, not logits).

Weights: He-normal convolutions; every BatchNormalization's running mean/variance is set from
the activations it really sees on a batch of synthetic images (calibrated in order, with ONNX
Runtime), then folded into the Conv before it, as torch.onnx.export does in eval mode (one
fixture keeps BatchNormalization nodes). The last layer is centred and scaled so the logits vary
between images with a standard deviation of about 2: probabilities are neither one-hot nor flat,
and top-1 depends on the image. Outputs are checked finite and different between images.

Fixtures (each < 2 MB), per model NAME:
  NAME.onnx              the model
  NAME.labels.txt        one class name per line (as many as the model's outputs)
  NAME.input.npy         the input tensor, float32, already preprocessed (NCHW, or NHWC for the
                         Keras models), 2 images (1 for the fixed-batch model)
  NAME.ref.json          ONNX Runtime's outputs on that input: "output" (raw), "probabilities"
                         (softmax in float64 of the raw logits, or the raw output when the model
                         already ends in Softmax), "top1", "top5", shapes, opset, ORT version
Plus models that must be refused: bad-unknown-op.onnx (an operator no engine has),
bad-input-rank.onnx (a rank-2 input: not an image classifier), bad-truncated.onnx (the first
half of a valid file's bytes).

Input images for the references: smooth synthetic colour images (sums of random sinusoids) in
[0, 1], normalised with the ImageNet mean/std (torchvision recipe) in NCHW; for the Keras models
scaled to [-1, 1] (Keras MobileNet's preprocess_input) in NHWC.

The numbers are reproducible for a given numpy and ONNX Runtime; a newer ONNX Runtime may
calibrate a few last bits differently, so regenerated files are not byte-identical: commit the
model together with its reference, never one without the other.
"""
import json
import math
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FIXTURE_LIMIT = 2 * 1024 * 1024
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# IR version that the exporter of each opset era writes (torch 1.x/2.x, tf2onnx).
IR_FOR_OPSET = {11: 6, 13: 7, 17: 8, 18: 8}


def make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Builder:
    """A graph under construction: nodes in topological order, initialisers by name, the
    BatchNormalization nodes to calibrate and the classifier layer to centre and scale."""

    def __init__(self, opset, seed, fold_bn=True):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.fold_bn = fold_bn
        self.nodes = []
        self.inits = {}
        self.bns = []  # dicts: node, x (input name), gamma/beta/mean/var init names
        self.head = None  # (weight name, bias name, output name, weight layout "KC" or "CK")
        self.used = set()

    # -- plumbing ---------------------------------------------------------------------------
    def init(self, name, arr, dtype=np.float32):
        assert name not in self.inits, name
        self.inits[name] = np.asarray(arr, dtype)
        return name

    def shared(self, name, arr, dtype=np.float32):
        if name not in self.inits:
            self.init(name, arr, dtype)
        return name

    def node(self, op, inputs, name, **attrs):
        assert name not in self.used, name
        self.used.add(name)
        out = name + "_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # -- layers -----------------------------------------------------------------------------
    def conv(self, x, cin, cout, k, scope, stride=1, groups=1, bias=False, pads=None,
             auto_pad=None, gain=2.0):
        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * math.sqrt(gain / fan_in)
        ins = [x, self.init(scope + ".weight", w)]
        if bias:
            ins.append(self.init(scope + ".bias", self.rng.standard_normal(cout) * 0.05))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], dilations=[1, 1], group=groups)
        if auto_pad:
            attrs["auto_pad"] = auto_pad
        else:
            attrs["pads"] = pads if pads is not None else [k // 2] * 4
        return self.node("Conv", ins, f"/{scope}/Conv", **attrs)

    def bn(self, x, c, scope, gamma=(0.8, 1.2)):
        names = [self.init(scope + ".weight", self.rng.uniform(*gamma, c)),
                 self.init(scope + ".bias", self.rng.standard_normal(c) * 0.1),
                 self.init(scope + ".running_mean", np.zeros(c)),
                 self.init(scope + ".running_var", np.ones(c))]
        out = self.node("BatchNormalization", [x] + names, f"/{scope}/BatchNormalization",
                        epsilon=1e-5, momentum=0.9)
        self.bns.append(dict(node=self.nodes[-1], x=x, g=names[0], b=names[1], m=names[2],
                             v=names[3]))
        return out

    def act(self, x, kind, scope):
        if kind is None:
            return x
        if kind == "relu":
            return self.node("Relu", [x], f"/{scope}/Relu")
        if kind == "relu6":
            lo = self.shared("clip_min_0", np.array(0.0))
            hi = self.shared("clip_max_6", np.array(6.0))
            return self.node("Clip", [x, lo, hi], f"/{scope}/Clip")
        if kind == "hardsigmoid":
            return self.node("HardSigmoid", [x], f"/{scope}/HardSigmoid", alpha=1.0 / 6, beta=0.5)
        if kind == "hardswish":
            if self.opset >= 14:
                return self.node("HardSwish", [x], f"/{scope}/HardSwish")
            hs = self.node("HardSigmoid", [x], f"/{scope}/HardSigmoid", alpha=1.0 / 6, beta=0.5)
            return self.node("Mul", [x, hs], f"/{scope}/Mul")
        if kind == "silu":
            s = self.node("Sigmoid", [x], f"/{scope}/Sigmoid")
            return self.node("Mul", [x, s], f"/{scope}/Mul")
        if kind == "sigmoid":
            return self.node("Sigmoid", [x], f"/{scope}/Sigmoid")
        raise ValueError(kind)

    def cba(self, x, cin, cout, k, scope, stride=1, groups=1, act="relu", bn_gamma=(0.8, 1.2),
            pads=None, auto_pad=None):
        """Conv -> BatchNormalization -> activation (torchvision's Conv2dNormActivation)."""
        y = self.conv(x, cin, cout, k, scope + "/0" if act else scope + "/conv", stride, groups,
                      pads=pads, auto_pad=auto_pad)
        y = self.bn(y, cout, scope + "/1" if act else scope + "/bn", bn_gamma)
        return self.act(y, act, scope + "/2")

    def gap(self, x, scope):
        return self.node("GlobalAveragePool", [x], f"/{scope}/GlobalAveragePool")

    def reduce_mean(self, x, axes, keepdims, scope):
        if self.opset >= 18:
            a = self.init(scope + ".axes", np.array(axes), np.int64)
            return self.node("ReduceMean", [x, a], f"/{scope}/ReduceMean", keepdims=keepdims)
        return self.node("ReduceMean", [x], f"/{scope}/ReduceMean", axes=axes, keepdims=keepdims)

    def gemm(self, x, cin, cout, scope, gain=1.0, head=False):
        w = self.rng.standard_normal((cout, cin)) * math.sqrt(gain / cin)
        wn = self.init(scope + ".weight", w)
        bname = self.init(scope + ".bias", self.rng.standard_normal(cout) * 0.05)
        out = self.node("Gemm", [x, wn, bname], f"/{scope}/Gemm", alpha=1.0, beta=1.0, transB=1)
        if head:
            self.head = (wn, bname, out, "KC")
        return out

    def se(self, x, c, squeeze, scope, act="relu", scale_act="hardsigmoid"):
        """Squeeze-excite: GlobalAveragePool -> Conv -> act -> Conv -> scale_act -> Mul."""
        p = self.gap(x, scope + "/avgpool")
        s = self.conv(p, c, squeeze, 1, scope + "/fc1", bias=True, pads=[0, 0, 0, 0])
        s = self.act(s, act, scope + "/activation")
        s = self.conv(s, squeeze, c, 1, scope + "/fc2", bias=True, pads=[0, 0, 0, 0], gain=1.0)
        s = self.act(s, scale_act, scope + "/scale_activation")
        return self.node("Mul", [s, x], f"/{scope}/Mul")

    # -- finishing --------------------------------------------------------------------------
    def model(self, graph_name, inp, in_shape, out, out_name, out_shape, extra_outputs=(),
              metadata=None):
        """A ModelProto; `out` is renamed `out_name` (exports name their outputs)."""
        nodes = [helper.make_node(n.op_type, list(n.input),
                                  [out_name if o == out else o for o in n.output], name=n.name)
                 for n in self.nodes]
        for src, dst in zip(self.nodes, nodes):
            dst.attribute.extend(src.attribute)
        inits = [numpy_helper.from_array(a, k) for k, a in self.inits.items()]
        outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)]
        outputs += [helper.make_tensor_value_info(e, TensorProto.FLOAT, None)
                    for e in extra_outputs if e != out]  # the last output is the one asked for
        g = helper.make_graph(nodes, graph_name,
                              [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
                              outputs, inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)],
                              producer_name="make-onnx-models.py", producer_version="1")
        m.ir_version = IR_FOR_OPSET[self.opset]
        for k, v in (metadata or {}).items():
            p = m.metadata_props.add()
            p.key, p.value = k, v
        return m

    def calibrate(self, build, x):
        """Sets each BatchNormalization's running statistics from the activations it sees on
        x, in graph order, then centres and scales the classifier layer."""
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        for bn in self.bns:
            m = build(extra_outputs=[bn["x"]])
            s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            a = s.run([m.graph.output[-1].name], {s.get_inputs()[0].name: x})[0].astype(np.float64)
            self.inits[bn["m"]] = a.mean(axis=(0, 2, 3)).astype(np.float32)
            self.inits[bn["v"]] = a.var(axis=(0, 2, 3)).astype(np.float32)
        wn, bname, out, layout = self.head
        m = build(extra_outputs=[out])
        s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        logits = s.run([m.graph.output[-1].name], {s.get_inputs()[0].name: x})[0]
        logits = logits.astype(np.float64)
        mu = logits.mean(axis=0)
        scale = 2.0 / max((logits - mu).std(), 1e-12)
        self.inits[wn] = (self.inits[wn] * scale).astype(np.float32)
        self.inits[bname] = ((self.inits[bname] - mu) * scale).astype(np.float32)

    def fold(self):
        """Folds every BatchNormalization into the Conv that feeds it (torch eval export)."""
        if not self.fold_bn:
            return
        producers = {o: n for n in self.nodes for o in n.output}
        consumers = {}
        for n in self.nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for bn in self.bns:
            conv = producers[bn["x"]]
            assert conv.op_type == "Conv" and len(consumers[bn["x"]]) == 1
            g, b = self.inits[bn["g"]].astype(np.float64), self.inits[bn["b"]].astype(np.float64)
            mean, var = self.inits[bn["m"]].astype(np.float64), self.inits[bn["v"]].astype(np.float64)
            k = g / np.sqrt(var + 1e-5)
            wname = conv.input[1]
            self.inits[wname] = (self.inits[wname] * k[:, None, None, None]).astype(np.float32)
            if len(conv.input) > 2:
                bias0 = self.inits[conv.input[2]].astype(np.float64)
                bias_name = conv.input[2]
            else:
                bias0 = np.zeros_like(k)
                bias_name = wname[: -len(".weight")] + ".bias" if wname.endswith(".weight") \
                    else wname + "_bias"
                conv.input.append(bias_name)
            self.inits[bias_name] = ((bias0 - mean) * k + b).astype(np.float32)
            conv.output[0] = bn["node"].output[0]
            for n in (bn["g"], bn["b"], bn["m"], bn["v"]):
                del self.inits[n]
            self.nodes.remove(bn["node"])
        self.bns = []


# -- architectures ----------------------------------------------------------------------------
def resnet18(b, x, width=1.0, classes=1000):
    w = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
    y = b.conv(x, 3, w[0], 7, "conv1", stride=2, pads=[3, 3, 3, 3])
    y = b.bn(y, w[0], "bn1")
    y = b.act(y, "relu", "relu")
    y = b.node("MaxPool", [y], "/maxpool/MaxPool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1], ceil_mode=0)
    cin = w[0]
    for stage, cout in enumerate(w, start=1):
        for blk in range(2):
            s = f"layer{stage}/layer{stage}.{blk}"
            stride = 2 if stage > 1 and blk == 0 else 1
            h = b.conv(y, cin, cout, 3, s + "/conv1", stride=stride)
            h = b.bn(h, cout, s + "/bn1")
            h = b.act(h, "relu", s + "/relu")
            h = b.conv(h, cout, cout, 3, s + "/conv2")
            h = b.bn(h, cout, s + "/bn2", gamma=(0.3, 0.6))
            if stride != 1 or cin != cout:
                idn = b.conv(y, cin, cout, 1, s + "/downsample/0", stride=stride, pads=[0] * 4)
                idn = b.bn(idn, cout, s + "/downsample/1")
            else:
                idn = y
            y = b.node("Add", [h, idn], f"/{s}/Add")
            y = b.act(y, "relu", s + "/relu_1")
            cin = cout
    y = b.gap(y, "avgpool")
    y = b.node("Flatten", [y], "/Flatten", axis=1)
    return b.gemm(y, cin, classes, "fc", head=True)


MNV3_SMALL = [  # kernel, expanded, out, SE, activation, stride (torchvision)
    (3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hardswish", 2), (5, 240, 40, True, "hardswish", 1),
    (5, 240, 40, True, "hardswish", 1), (5, 120, 48, True, "hardswish", 1),
    (5, 144, 48, True, "hardswish", 1), (5, 288, 96, True, "hardswish", 2),
    (5, 576, 96, True, "hardswish", 1), (5, 576, 96, True, "hardswish", 1)]


def mobilenetv3_small(b, x, width=1.0, classes=1000, hidden=1024):
    c = make_divisible(16 * width)
    y = b.cba(x, 3, c, 3, "features/0", stride=2, act="hardswish")
    cin = c
    for i, (k, exp, out, use_se, act, stride) in enumerate(MNV3_SMALL, start=1):
        exp, out = make_divisible(exp * width), make_divisible(out * width)
        s = f"features/{i}/block"
        h, j = y, 0
        if exp != cin:
            h = b.cba(h, cin, exp, 1, f"{s}/{j}", act=act, pads=[0] * 4)
            j += 1
        h = b.cba(h, exp, exp, k, f"{s}/{j}", stride=stride, groups=exp, act=act)
        j += 1
        if use_se:
            h = b.se(h, exp, make_divisible(exp // 4), f"{s}/{j}")
            j += 1
        h = b.cba(h, exp, out, 1, f"{s}/{j}", act=None, pads=[0] * 4, bn_gamma=(0.3, 0.6))
        if stride == 1 and cin == out:
            h = b.node("Add", [h, y], f"/features/{i}/Add")
        y, cin = h, out
    last = 6 * cin
    y = b.cba(y, cin, last, 1, f"features/{len(MNV3_SMALL) + 1}", act="hardswish", pads=[0] * 4)
    y = b.gap(y, "avgpool")
    y = b.node("Flatten", [y], "/Flatten", axis=1)
    y = b.gemm(y, last, hidden, "classifier/0", gain=2.0)
    y = b.act(y, "hardswish", "classifier/1")
    return b.gemm(y, hidden, classes, "classifier/3", head=True)


MNV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
        (6, 160, 3, 2), (6, 320, 1, 1)]  # expansion, channels, repeats, stride


def mobilenetv2(b, x, width=1.0, classes=1000, last=1280, depth=None):
    c = make_divisible(32 * width)
    y = b.cba(x, 3, c, 3, "features/0", stride=2, act="relu6")
    cin, i = c, 1
    for t, ch, n, s0 in MNV2:
        out = make_divisible(ch * width)
        for r in range(min(n, depth) if depth else n):
            stride = s0 if r == 0 else 1
            s = f"features/{i}/conv"
            h, j = y, 0
            hidden = cin * t
            if t != 1:
                h = b.cba(h, cin, hidden, 1, f"{s}/{j}", act="relu6", pads=[0] * 4)
                j += 1
            h = b.cba(h, hidden, hidden, 3, f"{s}/{j}", stride=stride, groups=hidden, act="relu6")
            j += 1
            h = b.conv(h, hidden, out, 1, f"{s}/{j}", pads=[0] * 4)
            h = b.bn(h, out, f"{s}/{j + 1}", gamma=(0.3, 0.6))
            if stride == 1 and cin == out:
                h = b.node("Add", [y, h], f"/features/{i}/Add")
            y, cin, i = h, out, i + 1
    y = b.cba(y, cin, last, 1, f"features/{i}", act="relu6", pads=[0] * 4)
    y = b.gap(y, "avgpool")
    y = b.node("Flatten", [y], "/Flatten", axis=1)
    return b.gemm(y, last, classes, "classifier/1", head=True)


EFFNET_B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1)]  # expansion, kernel, stride, in, out, layers


def efficientnet_b0(b, x, width=1.0, classes=1000, last=1280, depth=None):
    c = make_divisible(32 * width)
    y = b.cba(x, 3, c, 3, "features/0", stride=2, act="silu")
    cin = c
    for stage, (e, k, s0, _, ch, n) in enumerate(EFFNET_B0, start=1):
        out = make_divisible(ch * width)
        for r in range(min(n, depth) if depth else n):
            stride = s0 if r == 0 else 1
            s = f"features/{stage}/{r}/block"
            h, j = y, 0
            exp = cin * e
            if exp != cin:
                h = b.cba(h, cin, exp, 1, f"{s}/{j}", act="silu", pads=[0] * 4)
                j += 1
            h = b.cba(h, exp, exp, k, f"{s}/{j}", stride=stride, groups=exp, act="silu")
            j += 1
            h = b.se(h, exp, max(1, cin // 4), f"{s}/{j}", act="silu", scale_act="sigmoid")
            j += 1
            h = b.cba(h, exp, out, 1, f"{s}/{j}", act=None, pads=[0] * 4, bn_gamma=(0.3, 0.6))
            if stride == 1 and cin == out:
                h = b.node("Add", [h, y], f"/features/{stage}/{r}/Add")
            y, cin = h, out
    y = b.cba(y, cin, last, 1, "features/8", act="silu", pads=[0] * 4)
    y = b.gap(y, "avgpool")
    y = b.node("Flatten", [y], "/Flatten", axis=1)
    return b.gemm(y, last, classes, "classifier/1", head=True)


KERAS_MOBILENET = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                   (1024, 2), (1024, 1)]  # pointwise channels, depthwise stride (shortened v1)


def keras_mobilenet(b, x, width=1.0, classes=1000):
    """tf2onnx layout: NHWC input, Transpose, convs in NCHW, Transpose back, ReduceMean."""
    y = b.node("Transpose", [x], "StatefulPartitionedCall/model/conv1/Conv2D__6", perm=[0, 3, 1, 2])
    c = int(32 * width)
    # 'same' padding with stride 2 on an even size: TF pads bottom/right only.
    y = b.cba(y, 3, c, 3, "conv1", stride=2, act="relu6", pads=[0, 0, 1, 1])
    cin = c
    for i, (ch, stride) in enumerate(KERAS_MOBILENET, start=1):
        out = int(ch * width)
        if stride == 2 and i % 4 == 0:  # blocks 4 and 8: auto_pad, blocks 2 and 6: pads
            h = b.cba(y, cin, cin, 3, f"conv_dw_{i}", stride=2, groups=cin, act="relu6",
                      auto_pad="SAME_UPPER")
        else:
            h = b.cba(y, cin, cin, 3, f"conv_dw_{i}", stride=stride, groups=cin, act="relu6",
                      pads=[0, 0, 1, 1] if stride == 2 else [1, 1, 1, 1])
        y = b.cba(h, cin, out, 1, f"conv_pw_{i}", act="relu6", pads=[0] * 4)
        cin = out
    y = b.node("Transpose", [y], "StatefulPartitionedCall/model/global_average_pooling2d/Mean__10",
               perm=[0, 2, 3, 1])
    y = b.reduce_mean(y, [1, 2], 0, "global_average_pooling2d")
    w = b.init("predictions/kernel", b.rng.standard_normal((cin, classes)) / math.sqrt(cin))
    bias = b.init("predictions/bias", np.zeros(classes))
    y = b.node("MatMul", [y, w], "StatefulPartitionedCall/model/predictions/MatMul")
    logits = b.node("Add", [y, bias], "StatefulPartitionedCall/model/predictions/BiasAdd")
    b.head = (w, bias, logits, "CK")
    return b.node("Softmax", [logits], "StatefulPartitionedCall/model/predictions/Softmax", axis=-1)


ARCH = {"resnet18": resnet18, "mobilenetv3-small": mobilenetv3_small, "mobilenetv2": mobilenetv2,
        "efficientnet-b0": efficientnet_b0, "keras-mobilenet": keras_mobilenet}

# name: (architecture, opset, input size, batch (None = dynamic), fold BN, kwargs, metadata)
FIXTURES = {
    "resnet18-tiny-op17": ("resnet18", 17, 64, None, True, dict(width=0.125), None),
    "resnet18-tiny-op11-bn-b1": ("resnet18", 11, 64, 1, False, dict(width=0.125), None),
    "mobilenetv3-small-tiny-op17": ("mobilenetv3-small", 17, 64, None, True,
                                    dict(width=0.35, hidden=128), None),
    "mobilenetv3-small-tiny-op13": ("mobilenetv3-small", 13, 64, None, True,
                                    dict(width=0.35, hidden=128), None),
    "mobilenetv2-tiny-op13": ("mobilenetv2", 13, 64, None, True,
                              dict(width=0.25, last=192, depth=2), None),
    "efficientnet-b0-tiny-op18": ("efficientnet-b0", 18, 64, None, True,
                                  dict(width=0.25, last=192, depth=1), None),
    "keras-mobilenet-nhwc-tiny-op13": ("keras-mobilenet", 13, 64, None, True,
                                       dict(width=0.125, classes=10), "classes"),
    "keras-mobilenet-nhwc-tiny-op18": ("keras-mobilenet", 18, 32, None, True,
                                       dict(width=0.125, classes=10), None),
}
FULL = {
    "resnet18": ("resnet18", 17, 224, None, True, {}, None),
    "mobilenetv3-small": ("mobilenetv3-small", 17, 224, None, True, {}, None),
    "mobilenetv2": ("mobilenetv2", 13, 224, None, True, {}, None),
    "efficientnet-b0": ("efficientnet-b0", 18, 224, None, True, {}, None),
    "keras-mobilenet-nhwc": ("keras-mobilenet", 13, 224, None, True, {}, None),
}
KERAS_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def images(rng, n, size):
    """Smooth synthetic colour images in [0, 1], shape (n, size, size, 3)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, size, size, 3))
    for i in range(n):
        for c in range(3):
            img = np.full((size, size), rng.uniform(0.3, 0.7))
            for _ in range(6):
                fx, fy = rng.uniform(-12, 12, 2)
                img += rng.uniform(0.05, 0.25) * np.sin(fx * xx + fy * yy + rng.uniform(0, 6.3))
            out[i, :, :, c] = img
    out += rng.standard_normal(out.shape) * 0.02
    return np.clip(out, 0, 1)


def preprocess(imgs, arch):
    if arch == "keras-mobilenet":
        return (imgs * 2 - 1).astype(np.float32)  # NHWC, [-1, 1]
    return ((imgs - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)


def build(name, spec, seed):
    arch, opset, size, batch, fold, kwargs, meta_key = spec
    nhwc = arch == "keras-mobilenet"
    b = Builder(opset, seed, fold_bn=fold)
    inp, out_name = ("input_1", "predictions") if nhwc else ("input", "output")
    dim = batch if batch else ("unk__0" if nhwc else "batch_size")
    in_shape = [dim, size, size, 3] if nhwc else [dim, 3, size, size]
    out = ARCH[arch](b, inp, **kwargs)
    classes = kwargs.get("classes", 1000)
    labels = KERAS_CLASSES if classes == 10 else [f"class_{i:04d}" for i in range(classes)]
    meta = {meta_key: json.dumps(labels)} if meta_key else None

    def make(extra_outputs=(), shape=in_shape):
        return b.model(name.replace("-", "_"), inp, shape, out, out_name, [shape[0], classes],
                       extra_outputs, meta)

    # Calibrated with a batch of 16 images: a fixed batch of 1 is declared only at the end.
    calib_shape = [None] + in_shape[1:]
    calib = preprocess(images(np.random.default_rng(seed + 1000), 16, size), arch)
    b.calibrate(lambda extra_outputs=(): make(extra_outputs, calib_shape), calib)
    b.fold()
    m = make()
    onnx.checker.check_model(m, full_check=True)
    return m, labels, nhwc, size, batch


def softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def check_outputs(name, probs):
    assert np.isfinite(probs).all(), f"{name}: non-finite outputs"
    assert probs.std(axis=-1).min() > 1e-6, f"{name}: flat probabilities"
    if len(probs) > 1:
        assert np.abs(probs[0] - probs[1]).max() > 1e-4, f"{name}: same output for two images"


def write_fixtures(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for seed, (name, spec) in enumerate(FIXTURES.items()):
        m, labels, nhwc, size, batch = build(name, spec, seed)
        path = os.path.join(out_dir, name + ".onnx")
        onnx.save(m, path)
        nbytes = os.path.getsize(path)
        assert nbytes < FIXTURE_LIMIT, f"{name}: {nbytes} bytes, over the fixture limit"
        n = batch or 2
        x = preprocess(images(np.random.default_rng(10_000 + seed), n, size), spec[0])
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        raw = s.run(None, {s.get_inputs()[0].name: x})[0]
        is_probs = m.graph.node[-1].op_type == "Softmax"
        probs = raw.astype(np.float64) if is_probs else softmax(raw)
        check_outputs(name, probs)
        np.save(os.path.join(out_dir, name + ".input.npy"), x)
        with open(os.path.join(out_dir, name + ".labels.txt"), "w") as f:
            f.write("\n".join(labels) + "\n")
        ref = {
            "model": name + ".onnx", "architecture": spec[0], "opset": spec[1],
            "input_name": s.get_inputs()[0].name, "input_shape": list(x.shape),
            "input_dims_declared": [d if isinstance(d, int) else str(d)
                                    for d in s.get_inputs()[0].shape],
            "layout": "NHWC" if nhwc else "NCHW",
            "preprocessing": ("[-1, 1] scaling (x/127.5 - 1), RGB, NHWC" if nhwc else
                              "[0, 1] then ImageNet mean/std, RGB, NCHW"),
            "output_name": s.get_outputs()[0].name, "output_shape": list(raw.shape),
            "output_is_probabilities": is_probs,
            "labels_in_metadata_key": spec[6],
            "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "output": [[float(v) for v in row] for row in raw],
            "probabilities": [[float(v) for v in row] for row in probs],
            "top1": [int(i) for i in probs.argmax(-1)],
            "top5": [[int(i) for i in np.argsort(-row)[:5]] for row in probs],
        }
        with open(os.path.join(out_dir, name + ".ref.json"), "w") as f:
            json.dump(ref, f, indent=1)
        print(f"{name}: {nbytes / 1e6:.2f} MB, {len(m.graph.node)} nodes, "
              f"ops {sorted({n.op_type for n in m.graph.node})}, top1 {ref['top1']}, "
              f"max p {probs.max(-1).round(3).tolist()}")
    write_bad(out_dir)


def write_bad(out_dir):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 3, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 3, 8, 8])
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["r"], name="/relu/Relu"),
                           helper.make_node("NoSuchOp", ["r"], ["output"], name="/mystery/NoSuchOp")],
                          "bad_unknown_op", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, os.path.join(out_dir, "bad-unknown-op.onnx"))

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 48])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 10])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 48)).astype(np.float32),
                                "fc.weight")
    g = helper.make_graph([helper.make_node("Gemm", ["input", "fc.weight"], ["output"],
                                            name="/fc/Gemm", transB=1)],
                          "bad_input_rank", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(out_dir, "bad-input-rank.onnx"))

    with open(os.path.join(out_dir, "resnet18-tiny-op17.onnx"), "rb") as f:
        blob = f.read()
    with open(os.path.join(out_dir, "bad-truncated.onnx"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    print("bad-unknown-op.onnx, bad-input-rank.onnx, bad-truncated.onnx")


def write_full(out_dir, names):
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        seed = 100 + list(FULL).index(name)
        m, labels, nhwc, size, _ = build(name, FULL[name], seed)
        path = os.path.join(out_dir, name + ".onnx")
        onnx.save(m, path)
        with open(os.path.join(out_dir, name + ".labels.txt"), "w") as f:
            f.write("\n".join(labels) + "\n")
        x = preprocess(images(np.random.default_rng(20_000 + seed), 2, size), FULL[name][0])
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        raw = s.run(None, {s.get_inputs()[0].name: x})[0]
        probs = raw.astype(np.float64) if m.graph.node[-1].op_type == "Softmax" else softmax(raw)
        check_outputs(name, probs)
        print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB, {len(m.graph.node)} nodes, "
              f"ops {sorted({n.op_type for n in m.graph.node})}, top1 {probs.argmax(-1).tolist()}, "
              f"max p {probs.max(-1).round(3).tolist()}")


def main(argv):
    cmd = argv[1] if len(argv) > 1 else "fixtures"
    if cmd == "fixtures":
        write_fixtures(argv[2] if len(argv) > 2 else
                       os.path.join(ROOT, "inference", "tests", "fixtures", "onnx"))
    elif cmd == "full":
        out = argv[2] if len(argv) > 2 else os.path.join(ROOT, ".tools", "onnx-models")
        names = argv[3:] or ["resnet18", "mobilenetv3-small"]
        if names == ["all"]:
            names = list(FULL)
        unknown = [n for n in names if n not in FULL]
        if unknown:
            sys.exit(f"unknown model(s) {unknown}; known: {list(FULL)}")
        write_full(out, names)
    elif cmd == "list":
        for k, v in FIXTURES.items():
            print(f"fixtures: {k}: {v[0]} opset {v[1]}, {v[2]}x{v[2]}, batch {v[3] or 'dynamic'}")
        for k, v in FULL.items():
            print(f"full: {k}: {v[0]} opset {v[1]}, {v[2]}x{v[2]}, batch dynamic")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
