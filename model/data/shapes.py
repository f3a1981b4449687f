"""Synthetic "shapes" instance-segmentation dataset, written once as COCO JSON + PNG and cached.

Ten categories of textured shapes (sizes, rotations, occlusion, cluttered backgrounds). Every image
is drawn from its own seeded generator, so the same parameters always give byte-identical files.

Two appearance models (the `appearance` parameter):
- "category" (default): each category has its own interior appearance family -- a texture pattern
  and a hue band (`CATEGORY_APPEARANCE`) -- varied per instance (hue, saturation, brightness,
  period, angle), as well as its outline. As in real images, the evidence for the class lies inside
  the object, so the box classifier's class activation map (CAM) fires on the object's interior and
  the CAM pseudo-labels of box-only (novel) categories mean something.
- "free": colours and textures are drawn independently of the category, so a category is its outline
  only. The classifier's CAM then fires on edges (measured foreground/background AUC about 0.67 on the
  demo), which makes CAM-based methods look useless for reasons of data design.

Generated files are cached per split under a folder named by the parameters that split depends on, so
changing num_val never rewrites the training split another run reads.
"""
import colorsys
import hashlib
import json
import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = ["circle", "square", "triangle", "star", "cross",
              "ellipse", "hexagon", "ring", "heart", "crescent"]
# The built-in split (see splits.py): masks for the first five, boxes only for the last five.
BASE_CATEGORIES = CATEGORIES[:5]
NOVEL_CATEGORIES = CATEGORIES[5:]

DEFAULTS = {
    "image_size": 128,
    "num_train": 600,
    "num_val": 100,
    "min_objects": 2,
    "max_objects": 5,
    "min_scale": 0.18,   # object size as a fraction of the image side
    "max_scale": 0.45,
    "clutter": 12,       # distractor strokes and blobs per image (not annotated)
    "appearance": "category",  # "category": texture + hue family per category; "free": independent
    "seed": 0,
}
APPEARANCES = ("category", "free")
MIN_VISIBLE_FRACTION = 0.35  # an object occluded beyond this is dropped (its mask would be a sliver)
MIN_VISIBLE_PIXELS = 30


# ----------------------------------------------------------------------------- outlines
def _polygon(points, angle, center, radius):
    """Rotate unit-circle-sized points and place them; returns a flat [x0, y0, x1, y1, ...] list."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    xy = np.asarray(points, dtype=np.float64) @ rot.T * radius + center
    return [float(v) for v in xy.reshape(-1)]


def _regular(n, phase=0.0):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star():
    t = -np.pi / 2 + np.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _cross():
    a, b = 1.0, 0.33
    return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]


def _heart():
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 17.0


def _ellipse(aspect):
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    return np.stack([np.cos(t), aspect * np.sin(t)], 1)


def draw_shape_mask(category, size, center, radius, angle, rng):
    """Boolean (size, size) mask of one object; a few shapes are differences of two outlines."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    cx, cy = center
    if category == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    elif category == "square":
        draw.polygon(_polygon(_regular(4, np.pi / 4), angle, center, radius * 1.15), fill=1)
    elif category == "triangle":
        draw.polygon(_polygon(_regular(3, -np.pi / 2), angle, center, radius * 1.2), fill=1)
    elif category == "star":
        draw.polygon(_polygon(_star(), angle, center, radius * 1.2), fill=1)
    elif category == "cross":
        draw.polygon(_polygon(_cross(), angle, center, radius), fill=1)
    elif category == "ellipse":
        draw.polygon(_polygon(_ellipse(rng.uniform(0.45, 0.65)), angle, center, radius * 1.1), fill=1)
    elif category == "hexagon":
        draw.polygon(_polygon(_regular(6), angle, center, radius), fill=1)
    elif category == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        inner = radius * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif category == "heart":
        draw.polygon(_polygon(_heart(), angle, center, radius * 1.1), fill=1)
    elif category == "crescent":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        off = radius * 0.55
        dx, dy = off * np.cos(angle), off * np.sin(angle)
        r2 = radius * 0.85
        draw.ellipse([cx + dx - r2, cy + dy - r2, cx + dx + r2, cy + dy + r2], fill=0)
    else:
        raise ValueError(f"unknown shape category {category!r}")
    return np.asarray(img, dtype=bool)


# ----------------------------------------------------------------------------- textures
def _random_color(rng):
    return rng.uniform(0, 255, size=3)


# The interior family of each category: (pattern, period range in pixels, hue of the pattern's colours).
# Every pattern is a high-contrast two-shade texture, so "textured object on a smooth background" is a
# cue that base and novel categories share, as real objects share figure-ground cues. Base and novel
# hues interleave around the colour wheel: no colour range belongs to one side only (with base hues 0.0-0.4
# and novel 0.5-0.9 a mask head learns "base colours are objects" and transfers nothing to novel categories:
# model/results/ablation-shapes-category-v1.md).
CATEGORY_APPEARANCE = {
    "circle": ("stripes", (4, 7), 0.00),
    "square": ("checker", (3, 6), 0.20),
    "triangle": ("dots", (5, 8), 0.40),
    "star": ("waves", (6, 10), 0.60),
    "cross": ("rings", (4, 7), 0.80),
    "ellipse": ("grid", (5, 8), 0.10),
    "hexagon": ("hatch", (4, 7), 0.30),
    "ring": ("speckle", (2, 3), 0.50),
    "heart": ("zigzag", (6, 9), 0.70),
    "crescent": ("spots", (6, 9), 0.90),
}
GENERATOR_VERSION = 2  # part of every split's cache key: files of an older generator are never reused
HUE_JITTER = 0.035


def _pattern(kind, size, period, rng):
    """(size, size) float map in [0, 1] of one pattern at a random angle and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    u, v = u + rng.uniform(0, period), v + rng.uniform(0, period)
    w = 2 * np.pi / period
    if kind == "stripes":
        return (np.sin(u * w) > 0).astype(np.float64)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    if kind == "dots":
        return ((np.sin(u * w) * np.sin(v * w)) > 0.4).astype(np.float64)
    if kind == "waves":  # smooth sinusoid along a wavy line
        return 0.5 + 0.5 * np.sin(u * w + 2.0 * np.sin(v * w / 2))
    if kind == "rings":  # concentric rings around a random centre
        cx, cy = rng.uniform(0, size, 2)
        return (np.sin(np.hypot(xx - cx, yy - cy) * w) > 0).astype(np.float64)
    if kind == "grid":  # thin lines on a plain field
        return ((np.abs(np.sin(u * w / 2)) > 0.9) | (np.abs(np.sin(v * w / 2)) > 0.9)).astype(np.float64)
    if kind == "hatch":  # diagonal cross-hatching
        return ((np.sin((u + v) * w / 1.4) > 0.5) | (np.sin((u - v) * w / 1.4) > 0.5)).astype(np.float64)
    if kind == "speckle":  # fine random noise, blocky at the period
        cells = rng.random((size // int(period) + 2,) * 2)
        return np.kron(cells, np.ones((int(period), int(period))))[:size, :size]
    if kind == "zigzag":  # stripes bent into a triangle wave
        return (np.sin((u + period / 2 * np.abs(((v / period) % 2) - 1)) * w) > 0).astype(np.float64)
    if kind == "spots":  # random discs on a plain field
        t = np.zeros((size, size))
        for cx, cy in rng.uniform(0, size, size=(int(size * size / period ** 2 / 2), 2)):
            t[np.hypot(xx - cx, yy - cy) < period / 3] = 1.0
        return t
    raise ValueError(f"unknown pattern {kind!r}")


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def category_texture(category, size, rng):
    """(size, size, 3) texture of the category's family: its pattern in two shades of its hue, with
    per-instance jitter of hue, saturation, brightness and period."""
    kind, (p0, p1), hue = CATEGORY_APPEARANCE[category]
    hue = hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
    light = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.8, 1.0))
    dark = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.6, 1.0), rng.uniform(0.25, 0.5))
    t = _pattern(kind, size, rng.uniform(p0, p1), rng)
    return dark * (1 - t[..., None]) + light * t[..., None]


def texture(size, rng):
    """A (size, size, 3) float texture of the "free" appearance: stripes, checker, dots or a gradient."""
    c0, c1 = _random_color(rng), _random_color(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    kind = rng.integers(4)
    if kind == 0:  # stripes at a random angle
        a, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        t = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0).astype(np.float64)
    elif kind == 1:  # checker
        period = rng.integers(3, 8)
        t = (((xx // period) + (yy // period)) % 2).astype(np.float64)
    elif kind == 2:  # dots
        period = rng.uniform(5, 9)
        t = ((np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)) > 0.4).astype(np.float64)
    else:  # gradient
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def background(size, clutter, rng):
    """Smooth coloured noise plus unannotated strokes and blobs (clutter)."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
    img = img * 0.6 + rng.normal(0, 8, size=img.shape)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(clutter):
        color = tuple(int(v) for v in _random_color(rng))
        x0, y0 = rng.uniform(0, size, 2)
        if rng.random() < 0.6:
            x1, y1 = x0 + rng.uniform(-size / 3, size / 3), y0 + rng.uniform(-size / 3, size / 3)
            draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, size / 40 + 2)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
    return np.asarray(canvas, dtype=np.float64)


# ----------------------------------------------------------------------------- one image
def render_image(params, rng):
    """Returns (uint8 image (S, S, 3), list of (category index, visible bool mask))."""
    size = params["image_size"]
    img = background(size, params["clutter"], rng)
    objects = []  # (category index, full mask, visible mask)
    for _ in range(int(rng.integers(params["min_objects"], params["max_objects"] + 1))):
        cat = int(rng.integers(len(CATEGORIES)))
        radius = size * rng.uniform(params["min_scale"], params["max_scale"]) / 2
        center = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
        mask = draw_shape_mask(CATEGORIES[cat], size, center, radius, rng.uniform(0, 2 * np.pi), rng)
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        if params["appearance"] == "category":
            img[mask] = category_texture(CATEGORIES[cat], size, rng)[mask]
        else:
            img[mask] = texture(size, rng)[mask]
        for other in objects:  # later objects occlude earlier ones
            other[2][mask] = False
        objects.append([cat, mask, mask.copy()])
    kept = [(cat, vis) for cat, full, vis in objects
            if vis.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full.sum())]
    return np.clip(img, 0, 255).astype(np.uint8), kept


def _annotation(ann_id, image_id, cat, visible):
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": cat + 1, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0}


def generate_split(root, split, params):
    """Writes split_dir/images/*.png and split_dir/annotations.json (the JSON last, atomically)."""
    num = params["num_" + split]
    split_id = {"train": 0, "val": 1}[split]
    os.makedirs(image_dir(root, split, params), exist_ok=True)
    images, annotations = [], []
    for index in range(num):
        rng = np.random.default_rng([params["seed"], split_id, index])
        img, objects = render_image(params, rng)
        file_name = f"{index:06d}.png"
        Image.fromarray(img).save(os.path.join(image_dir(root, split, params), file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        for cat, visible in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, cat, visible))
    coco = {
        "info": {"description": "contrastmask-ops synthetic shapes", "generator": split_params(split, params)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
    }
    path = annotation_path(root, split, params)
    with open(path + ".tmp", "w") as f:
        json.dump(coco, f, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def resolve_params(overrides=None):
    """DEFAULTS with the given generator parameters; unknown names and appearances are errors."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown shapes parameters: {sorted(unknown)}")
    params = dict(DEFAULTS, **overrides)
    if params["appearance"] not in APPEARANCES:
        raise ValueError(f"shapes appearance must be one of {APPEARANCES}, got {params['appearance']!r}")
    return params


def split_params(split, params):
    """The parameters one split's files depend on (not the other split's image count)."""
    other = {"train": "num_val", "val": "num_train"}[split]
    return dict({k: v for k, v in params.items() if k != other}, generator_version=GENERATOR_VERSION)


def split_dir(root, split, params=None):
    """root/<split>-<hash of the split's parameters>: one folder per distinct split."""
    key = json.dumps(split_params(split, resolve_params(params)), sort_keys=True)
    return os.path.join(root, f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


def annotation_path(root, split, params=None):
    return os.path.join(split_dir(root, split, params), "annotations.json")


def image_dir(root, split, params=None):
    return os.path.join(split_dir(root, split, params), "images")


def _cached_params(path):
    try:
        with open(path) as f:
            return json.load(f)["info"]["generator"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_shapes_dataset(root, **overrides):
    """Generates each split under root unless its files (same parameters) are already there."""
    params = resolve_params(overrides)
    for split in ("train", "val"):
        if _cached_params(annotation_path(root, split, params)) != split_params(split, params):
            generate_split(root, split, params)
    return params


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Generate the synthetic shapes dataset (COCO JSON + PNG).")
    parser.add_argument("--root", default=".cache/shapes")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value,
                            **({"choices": APPEARANCES} if key == "appearance" else {}))
    args = vars(parser.parse_args())
    root = args.pop("root")
    ensure_shapes_dataset(root, **args)
    print(f"shapes dataset ready under {root}")


if __name__ == "__main__":
    main()
