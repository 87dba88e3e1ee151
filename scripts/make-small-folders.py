#!/usr/bin/env python3
"""Writes two small image-folder datasets that are not Fashion-MNIST, for checking that
`trainer train --image-folder` with its defaults suits any folder of class folders:

  glyphs/  10 letters (including the mirror pairs b/d and p/q) drawn in the DejaVu fonts
           at random sizes, offsets and small rotations;
  shapes/  10 outline and filled shapes (including left/right arrows, mirror images of
           each other) at random sizes, positions, stroke widths, with pixel noise.

Each is 28x28 grayscale, PER_CLASS images per class, seeded (the same files every run).
Usage: make-small-folders.py OUT_DIR [PER_CLASS]   (needs Pillow)
"""
import glob
import math
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont

SIZE = 28
LETTERS = ["b", "d", "p", "q", "F", "J", "L", "N", "R", "Z"]
SHAPES = ["circle", "disc", "square", "triangle", "plus", "cross", "hbar", "vbar",
          "arrow-left", "arrow-right"]


def fonts():
    found = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
    if not found:
        sys.exit("no DejaVu fonts in /usr/share/fonts/truetype/dejavu (apt-get install fonts-dejavu-core)")
    return found


def glyph(rng, letter, faces):
    big = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    draw = ImageDraw.Draw(big)
    font = ImageFont.truetype(rng.choice(faces), rng.randint(28, 44))
    draw.text((SIZE + rng.randint(-5, 5), SIZE + rng.randint(-5, 5)), letter,
              fill=rng.randint(180, 255), font=font, anchor="mm")
    big = big.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    return big.resize((SIZE, SIZE), Image.BILINEAR)


def shape(rng, kind):
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    r = rng.randint(6, 11)
    cx, cy = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
    width = rng.randint(1, 3)
    ink = rng.randint(160, 255)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        d.ellipse(box, outline=ink, width=width)
    elif kind == "disc":
        d.ellipse(box, fill=ink)
    elif kind == "square":
        d.rectangle(box, outline=ink, width=width)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], outline=ink, width=width)
    elif kind == "plus":
        d.line([cx - r, cy, cx + r, cy], fill=ink, width=width + 1)
        d.line([cx, cy - r, cx, cy + r], fill=ink, width=width + 1)
    elif kind == "cross":
        d.line([cx - r, cy - r, cx + r, cy + r], fill=ink, width=width + 1)
        d.line([cx - r, cy + r, cx + r, cy - r], fill=ink, width=width + 1)
    elif kind == "hbar":
        d.rectangle([cx - r, cy - width, cx + r, cy + width], fill=ink)
    elif kind == "vbar":
        d.rectangle([cx - width, cy - r, cx + width, cy + r], fill=ink)
    else:  # arrows: a shaft and a head at one end
        sign = -1 if kind == "arrow-left" else 1
        tip = cx + sign * r
        d.line([cx - sign * r, cy, tip, cy], fill=ink, width=width + 1)
        head = max(3, r // 2)
        d.polygon([(tip, cy), (tip - sign * head, cy - head), (tip - sign * head, cy + head)], fill=ink)
    px = img.load()
    for y in range(SIZE):
        for x in range(SIZE):
            px[x, y] = max(0, min(255, px[x, y] + int(rng.gauss(0, 12))))
    return img


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    per_class = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    faces = fonts()
    for name, classes, draw in [("glyphs", LETTERS, lambda rng, c: glyph(rng, c, faces)),
                                ("shapes", SHAPES, shape)]:
        rng = random.Random(name)
        for c in classes:
            # Letters that differ only in case would clash on case-insensitive disks.
            folder = os.path.join(out, name, c if c.islower() else c + "-upper")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                draw(rng, c).save(os.path.join(folder, f"{i:04d}.png"))
        print(f"wrote {len(classes) * per_class} images to {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
