#!/usr/bin/env python3
"""A folder of photo-sized JPEGs for end-to-end benchmarks of ONNX models on real photos
(`client-app classify DIR --model ONNX_DIR`): nothing downloaded, every file different.

    make-photo-folder.py DIR [COUNT] [SEED]     # default 1000 files, seed 1

Sizes cycle through the common camera and phone shapes from 1 to 12 megapixels
(1280x800, 2048x1536, 3000x2000, 4000x3000, and their portrait turns). Content: smooth
colour fields (low-frequency noise, upscaled) with fine grain on top, so that JPEG
quality 85 gives the file sizes of real photos (about 0.2-0.5 bytes per pixel) and the
decoder has real work to do. Files go in ten class folders (`class-0` ... `class-9`),
as the client expects a tree. Needs numpy and Pillow (the .tools/ort-venv venv has
numpy; `pip install pillow` into it).
"""
import os
import sys

import numpy as np
from PIL import Image

SIZES = [(1280, 800), (2048, 1536), (3000, 2000), (4000, 3000),
         (800, 1280), (1536, 2048), (2000, 3000), (3000, 4000)]


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    coarse = rng.uniform(0, 255, size=(h // 64 + 2, w // 64 + 2, 3)).astype(np.uint8)
    base = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    pixels = np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def main() -> None:
    out = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rng = np.random.default_rng(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    total = 0
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        folder = os.path.join(out, f"class-{i % 10}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"photo-{i:05}.jpg")
        photo(rng, w, h).save(path, quality=85)
        total += os.path.getsize(path)
    print(f"wrote {count} JPEGs ({total / 1e6:.0f} MB, {total / count / 1e6:.2f} MB each on average) to {out}")


if __name__ == "__main__":
    main()
