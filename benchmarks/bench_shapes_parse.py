"""How honest the shapes-world parser is: the dataset's own renders against their captions.

For each image size, N scenes are drawn with the generator's own functions, rendered, read
back by `vlp.data.shapes_parse.parse_scene` and scored against their captions in every
caption style (`vlp.metrics.generation.scene_scores`); then again with each image scored
against the next scene's captions (a floor), and under perturbations a generator's output may
show (Gaussian pixel noise, Gaussian blur, JPEG). Prints one JSON object.

Run: .venv/bin/python benchmarks/bench_shapes_parse.py [--scenes 1000] [--sizes 32 48 64 96]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time

import numpy as np
from PIL import Image, ImageFilter

from vlp.data import shapes
from vlp.data.shapes_parse import parse_scene
from vlp.metrics.generation import scene_scores

STYLES = {
    "canonical": lambda scene, rng: shapes.canonical_caption(scene),
    **{f.__name__.strip("_"): f for f in shapes._VARIANT_TEMPLATES},
}
PERTURBATIONS = {  # name -> (noise sigma in 0-255 levels, blur sigma in pixels, JPEG quality)
    "noise 8": (8.0, 0.0, None),
    "noise 16": (16.0, 0.0, None),
    "noise 25": (25.0, 0.0, None),
    "blur 0.5": (0.0, 0.5, None),
    "blur 1.0": (0.0, 1.0, None),
    "blur 1.5": (0.0, 1.5, None),
    "noise 8 + blur 0.5": (8.0, 0.5, None),
    "jpeg 75": (0.0, 0.0, 75),
}


def perturb(
    img: Image.Image, noise: float, blur: float, jpeg: int | None, rng: np.random.Generator
) -> Image.Image:
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (*img.size[::-1], 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def _per_style(scenes: list, objects: list, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {
        style: round(scene_scores([f(s, rng) for s in scenes], objects)[0]["exact_match"], 2)
        for style, f in STYLES.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=1000)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 96])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    scenes = [shapes.sample_scene(rng) for _ in range(args.scenes)]
    shifted = [*scenes[1:], scenes[0]]
    out: dict = {"scenes": args.scenes, "sizes": {}, "perturbed_48": {}}
    for size in args.sizes:
        start = time.perf_counter()
        objects = [parse_scene(shapes.render_scene(s, size)) for s in scenes]
        ms = 1000 * (time.perf_counter() - start) / len(scenes)
        out["sizes"][size] = {
            "scenes_read_exactly": round(
                100
                * float(np.mean([o == s.objects for o, s in zip(objects, scenes, strict=True)])),
                2,
            ),
            "exact_match_per_style": _per_style(scenes, objects, 1),
            "other_scenes_captions": _per_style(shifted, objects, 2),
            "ms_per_image": round(ms, 1),
        }
    noise_rng = np.random.default_rng(args.seed)
    for name, (noise, blur, jpeg) in PERTURBATIONS.items():
        objects = [
            parse_scene(perturb(shapes.render_scene(s, 48), noise, blur, jpeg, noise_rng))
            for s in scenes
        ]
        out["perturbed_48"][name] = _per_style(scenes, objects, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
