"""Small learnable datasets in the KADID-10k and LDCTIQA layouts, for tests and benchmarks.

The quality of every image is decided by how much noise and blur it carries, so a network can
learn it in a few epochs. These are stand-ins with the real layouts, not simulations of CT.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from scripts.data import write_json_atomic


def _phantom(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random 'body': a few overlapping ellipses in [0, 1]."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    image = np.zeros((size, size), dtype=np.float64)
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        ry, rx = rng.uniform(0.15, 0.7, 2)
        image += rng.uniform(0.2, 0.6) * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return np.clip(ndimage.gaussian_filter(image, 1.0), 0.0, 1.0)


def _rater_mean(rng: np.random.Generator, quality: float, raters: int = 5) -> float:
    """Mean of integer ratings 0..4 by ``raters`` noisy raters of a quality in [0, 4]."""
    ratings = np.clip(np.rint(quality + rng.normal(0.0, 0.5, raters)), 0, 4)
    return round(float(ratings.mean()), 1)


def write_ldct_dataset(
    output_dir: str | Path, n: int = 24, size: int = 64, seed: int = 0, layout: str = "train"
) -> Path:
    """LDCTIQA layout: ``image/NNNN.tif`` + ``train.json`` (or ``images/testNNN.tiff`` + ``test.json``)."""
    root = Path(output_dir)
    image_dir, label_name = ("image", "train.json") if layout == "train" else ("images", "test.json")
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for index in range(n):
        quality = rng.uniform(0.0, 4.0)
        noise = 0.02 + 0.12 * (4.0 - quality) / 4.0
        pixels = np.clip(_phantom(rng, size) + rng.normal(0.0, noise, (size, size)), 0.0, 1.0).astype(np.float32)
        name = f"{index:04d}.tif" if layout == "train" else f"test{index:03d}.tiff"
        tifffile.imwrite(root / image_dir / name, pixels)
        labels[name] = _rater_mean(rng, quality)
    write_json_atomic(root / label_name, labels)
    return root


def write_kadid_dataset(output_dir: str | Path, n_refs: int = 4, size: int = 64, seed: int = 0) -> Path:
    """KADID-10k layout with two distortion types (01 blur, 09 white noise) at five levels."""
    root = Path(output_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for ref in range(1, n_refs + 1):
        reference = np.stack([_phantom(rng, size) for _ in range(3)], axis=-1)
        ref_name = f"I{ref:02d}.png"
        Image.fromarray((reference * 255).astype(np.uint8)).save(root / "images" / ref_name)
        for kind in (1, 9):
            for level in range(1, 6):
                if kind == 1:
                    distorted = ndimage.gaussian_filter(reference, (0.6 * level, 0.6 * level, 0))
                else:
                    distorted = reference + rng.normal(0.0, 0.04 * level, reference.shape)
                name = f"I{ref:02d}_{kind:02d}_{level:02d}.png"
                Image.fromarray((np.clip(distorted, 0, 1) * 255).astype(np.uint8)).save(root / "images" / name)
                mos = float(np.clip(5.0 - 0.8 * level + rng.normal(0.0, 0.1), 1.0, 5.0))
                rows.append({"dist_img": name, "ref_img": ref_name, "dmos": f"{mos:.3f}", "var": "0.1"})
    with open(root / "dmos.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["dist_img", "ref_img", "dmos", "var"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def read_labels(root: str | Path) -> dict:
    """The LDCTIQA label map of a dataset written here (a convenience for tests)."""
    root = Path(root)
    label_file = root / "train.json" if (root / "train.json").exists() else root / "test.json"
    return json.loads(label_file.read_text())
