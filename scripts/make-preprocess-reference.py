#!/usr/bin/env python3
"""Reference outputs of image preprocessing made the way PyTorch/torchvision users make them
(Pillow resize + crop, numpy normalisation), for the test of classifier-inference's ONNX
preprocessing (inference/tests/preprocess_reference.rs).

    scripts/make-preprocess-reference.py [DIR]   # default DIR: inference/tests/fixtures/preprocess

Needs Pillow and numpy (pip install pillow numpy). Writes:
  photo.png        a synthetic 160x107 RGB "photo" (smooth colour gradients, edges and fine
                   stripes, so resampling filters matter), lossless so both sides start
                   from the same pixels
  reference.json   per case: the recipe (model.toml's [preprocess] fields) and Pillow/numpy's
                   output values, flattened in the recipe's layout

Pillow and our SIMD resize (fast_image_resize) compute the same filters in different
fixed-point arithmetic, so the outputs are compared with a tolerance (a sample level or two),
not bit for bit.
"""
import json
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos3": Image.LANCZOS,
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def photo(w=160, h=107):
    """Deterministic test image: gradients, a diagonal edge, fine stripes and a disc."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * (x / (w - 1))
    g = 255 * (0.5 + 0.5 * np.sin(y / 7.0 + x / 13.0))
    b = np.where(x + 2 * y > w, 220.0, 35.0)
    stripes = (np.floor(x / 2) % 2) * 60.0
    disc = ((x - 0.7 * w) ** 2 + (y - 0.4 * h) ** 2 < (0.18 * h) ** 2) * 90.0
    img = np.stack([r, g + stripes * (y > h / 2), b - disc], axis=-1)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def shorter_side_size(w, h, shorter):
    """torchvision.transforms.Resize(shorter) on a PIL image of w x h."""
    if w <= h:
        return shorter, int(shorter * h / w)
    return int(shorter * w / h), shorter


def run(img, case):
    width, height = case["width"], case["height"]
    gray = case.get("channels", 3) == 1
    if gray:
        img = img.convert("L")
    flt = FILTERS[case["interpolation"]]
    if case["resize"] == "stretch":
        out = img.resize((width, height), flt)
    else:
        rw, rh = shorter_side_size(img.width, img.height, case["resize_shorter_to"])
        out = img.resize((rw, rh), flt)
        left = int(round((rw - width) / 2.0))
        top = int(round((rh - height) / 2.0))
        out = out.crop((left, top, left + width, top + height))
    a = np.asarray(out, dtype=np.float32)
    if gray:
        a = a[:, :, None]
    elif case["channel_order"] == "BGR":
        a = a[:, :, ::-1]
    a = a * np.float32(case["scale"])
    a = (a - np.array(case["mean"], np.float32)) / np.array(case["std"], np.float32)
    if case["layout"] == "NCHW":
        a = a.transpose(2, 0, 1)
    return a.astype(np.float32)


CASES = [
    # torchvision's ImageNet recipe, scaled down: shorter side to 40, centre crop 32.
    {"name": "torchvision-bilinear-crop", "width": 32, "height": 32,
     "resize": "shorter-side-then-center-crop", "resize_shorter_to": 40,
     "interpolation": "bilinear", "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
     "channel_order": "RGB", "layout": "NCHW"},
    # timm-style bicubic, a non-square crop.
    {"name": "bicubic-crop-nonsquare", "width": 40, "height": 28,
     "resize": "shorter-side-then-center-crop", "resize_shorter_to": 48,
     "interpolation": "bicubic", "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
     "channel_order": "RGB", "layout": "NCHW"},
    # Keras-style: stretched, [-1, 1], NHWC; BGR to check the channel order.
    {"name": "stretch-lanczos-bgr-nhwc", "width": 48, "height": 40, "resize": "stretch",
     "interpolation": "lanczos3", "scale": 2 / 255, "mean": [1.0, 1.0, 1.0],
     "std": [1.0, 1.0, 1.0], "channel_order": "BGR", "layout": "NHWC"},
    # Upscaling in width, shrinking in height.
    {"name": "upscale-bilinear", "width": 192, "height": 20, "resize": "stretch",
     "interpolation": "bilinear", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5],
     "std": [0.5, 0.5, 0.5], "channel_order": "RGB", "layout": "NCHW"},
    # Grayscale model: ITU-R 601-2 luma (Pillow's convert("L")).
    {"name": "gray-bilinear-crop", "width": 24, "height": 24, "channels": 1,
     "resize": "shorter-side-then-center-crop", "resize_shorter_to": 28,
     "interpolation": "bilinear", "scale": 1 / 255, "mean": [0.5], "std": [0.25],
     "channel_order": "RGB", "layout": "NCHW"},
    {"name": "nearest-stretch", "width": 37, "height": 23, "resize": "stretch",
     "interpolation": "nearest", "scale": 1 / 255, "mean": [0.0, 0.0, 0.0],
     "std": [1.0, 1.0, 1.0], "channel_order": "RGB", "layout": "NCHW"},
]


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        ROOT, "inference", "tests", "fixtures", "preprocess")
    os.makedirs(out_dir, exist_ok=True)
    img = photo()
    img.save(os.path.join(out_dir, "photo.png"), optimize=True)
    cases = []
    for case in CASES:
        values = run(img, case)
        cases.append({**case, "shape": list(values.shape),
                      "values": [round(float(v), 5) for v in values.ravel()]})
        print(f"{case['name']}: {list(values.shape)}")
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump({"image": "photo.png", "pillow": Image.__version__, "cases": cases}, f)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
