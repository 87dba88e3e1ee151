#!/usr/bin/env python3
"""Writes N distinct 28x28 grayscale PNGs (Fashion-MNIST train then test images) into
class folders, the input of `client-app classify` speed runs (issue "Portable speed").

    scripts/make-bench-folder.py OUT [N=20000] [FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist]

Standard library only (gzip, zlib, struct): no Pillow needed.
"""
import gzip
import os
import struct
import sys
import zlib

CLASSES = ["t-shirt-top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    dims = (magic & 0xFF)
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return shape, data[4 + 4 * dims:]


def png(width, height, pixels):
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


def find(directory, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    sys.exit(f"make-bench-folder: no {stem}(.gz) in {directory}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    data_dir = sys.argv[3] if len(sys.argv) > 3 else "/usr/share/datasets/fashion-mnist"
    written = 0
    for split in ("train", "t10k"):
        (n, h, w), images = read_idx(find(data_dir, f"{split}-images-idx3-ubyte"))
        (_,), labels = read_idx(find(data_dir, f"{split}-labels-idx1-ubyte"))
        for i in range(n):
            if written >= wanted:
                break
            folder = os.path.join(out, CLASSES[labels[i]])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{split}-{i:05}.png"), "wb") as f:
                f.write(png(w, h, images[i * h * w:(i + 1) * h * w]))
            written += 1
    print(f"make-bench-folder: {written} distinct PNGs in {out}")


if __name__ == "__main__":
    main()
