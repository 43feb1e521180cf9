"""The synthetic KADID-10k from scikit-image's photographs: layout, names, MOS rule, determinism."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts.data import kadid_labelled_items
from scripts.synthetic.natural import (
    DISTORTIONS,
    LEVELS,
    distort,
    lab_to_rgb,
    objective_mos,
    rgb_to_lab,
    similarity,
    ssim,
    write_natural_dataset,
)
from skimage.color import rgb2lab
from skimage.metrics import structural_similarity

N_REFS, SIZE = 3, 48
NAME = re.compile(r"^I(\d\d)_(\d\d)_(\d\d)\.png$")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seed 0 written twice (one thread, then two) and seed 1 once."""
    return {
        key: write_natural_dataset(tmp_path_factory.mktemp(key), n_refs=N_REFS, size=SIZE, seed=seed, workers=workers)
        for key, seed, workers in (("a", 0, 1), ("b", 0, 2), ("c", 1, None))
    }


def _rows(root: Path) -> list[dict]:
    with open(root / "dmos.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def _mos_by_type_level(root: Path) -> dict[tuple[int, int], list[float]]:
    table = defaultdict(list)
    for row in _rows(root):
        _, kind, level = map(int, NAME.match(row["dist_img"]).groups())
        table[kind, level].append(float(row["dmos"]))
    return table


def test_layout_passes_the_kadid_checker(datasets: dict[str, Path]) -> None:
    root = datasets["a"]
    assert (root / "dmos.csv").read_text().splitlines()[0] == "dist_img,ref_img,dmos,var"
    items = kadid_labelled_items(root)
    assert len(items) == N_REFS * len(DISTORTIONS) * LEVELS
    refs = {Path(item["ref"]).name for item in items}
    assert refs == {f"I{index:02d}.png" for index in range(1, N_REFS + 1)}
    assert all((root / "images" / ref).is_file() for ref in refs)
    assert not any(row["dist_img"] in refs for row in _rows(root)), "references are not rated, as in KADID"
    assert not list(root.glob("*.tmp")), "dmos.csv is written through a temporary file that is renamed"


def test_names_follow_kadid_numbering(datasets: dict[str, Path]) -> None:
    rows = _rows(datasets["a"])
    parsed = [NAME.match(row["dist_img"]) for row in rows]
    assert all(parsed), "every distorted image is named Ixx_yy_zz.png"
    triples = [tuple(map(int, match.groups())) for match in parsed]
    kinds = {kind for _, kind, _ in triples}
    assert len(kinds) >= 15 and kinds == set(DISTORTIONS) and kinds <= set(range(1, 26))
    assert {level for _, _, level in triples} == set(range(1, 6))
    assert all(row["ref_img"] == f"I{ref:02d}.png" for row, (ref, _, _) in zip(rows, triples, strict=True))
    on_disk = {path.name for path in (datasets["a"] / "images").glob("I??_??_??.png")}
    assert on_disk == {row["dist_img"] for row in rows}


def test_images_are_rgb_uint8_of_the_requested_size(datasets: dict[str, Path]) -> None:
    for path in sorted((datasets["a"] / "images").glob("*.png")):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE), path.name
            assert np.asarray(image).dtype == np.uint8


def test_mos_and_variance_are_in_range(datasets: dict[str, Path]) -> None:
    mos = np.array([float(row["dmos"]) for row in _rows(datasets["a"])])
    variance = np.array([float(row["var"]) for row in _rows(datasets["a"])])
    assert mos.min() >= 1.0 and mos.max() <= 5.0
    assert (variance >= 0).all() and variance.max() > 0
    assert mos.max() - mos.min() > 2.5, "scores spread over most of 1..5"


def test_mos_falls_with_level(datasets: dict[str, Path]) -> None:
    table = _mos_by_type_level(datasets["a"])
    for kind in DISTORTIONS:
        means = [np.mean(table[kind, level]) for level in range(1, LEVELS + 1)]
        assert means[-1] < means[0], f"type {kind}: level 5 rated no worse than level 1 ({means})"
        # rater noise on three references allows small inversions between neighbouring levels
        assert (np.diff(means) <= 0.4).all(), f"type {kind}: {means}"
    overall = [np.mean([np.mean(table[kind, level]) for kind in DISTORTIONS]) for level in range(1, LEVELS + 1)]
    assert (np.diff(overall) < 0).all(), overall


def test_mos_depends_on_content(datasets: dict[str, Path]) -> None:
    table = _mos_by_type_level(datasets["a"])
    differing = sum(len(set(values)) > 1 for values in table.values())
    assert differing > 0.8 * len(table), "the same type and level gets different MOS on different references"


def test_the_rule_rates_blur_by_what_it_removes() -> None:
    """Noise-free MOS: blur hurts a fine texture more than a smooth gradient (content, not only level)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, SIZE)
    smooth = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((SIZE, SIZE), 120.0)), -1)
    texture = rng.integers(0, 256, (SIZE, SIZE, 3))
    scores = {}
    for name, image in (("smooth", smooth.astype(np.uint8)), ("texture", texture.astype(np.uint8))):
        blurred = distort(image, 1, 3, rng)
        scores[name] = objective_mos(*similarity(image, blurred))
    assert scores["smooth"] > scores["texture"] + 1.0, scores


def test_the_rule_is_five_for_an_undistorted_image_and_counts_colour() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    ssim, delta_e = similarity(image, image)
    assert ssim == pytest.approx(1.0) and delta_e == pytest.approx(0.0)
    assert objective_mos(ssim, delta_e) == pytest.approx(5.0)
    grey = distort(image, 7, 5, rng)  # saturation removed: luma barely moves, colour does
    assert objective_mos(*similarity(image, grey)) < 4.0
    assert objective_mos(0.2, 60.0) >= 1.0


def test_same_seed_same_files_other_seed_other_files(datasets: dict[str, Path]) -> None:
    def contents(root: Path) -> dict[str, bytes]:
        return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}

    first, again, other = (contents(datasets[key]) for key in ("a", "b", "c"))
    assert first == again
    assert first.keys() == other.keys()
    assert first["dmos.csv"] != other["dmos.csv"]
    assert first["images/I01.png"] != other["images/I01.png"]


def test_colour_conversions_and_ssim_match_scikit_image() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((16, 16, 3))
    np.testing.assert_allclose(rgb_to_lab(rgb), rgb2lab(rgb), atol=1e-6)
    np.testing.assert_allclose(lab_to_rgb(rgb2lab(rgb)), rgb, atol=1e-6)
    pixels = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    np.testing.assert_allclose(rgb_to_lab(pixels), rgb2lab(pixels), atol=1e-3)  # uint8: float32 look-up
    x = rng.random((40, 40))
    y = np.clip(x + rng.normal(0.0, 0.1, x.shape), 0.0, 1.0)
    assert ssim(x, y) == pytest.approx(structural_similarity(x, y, data_range=1.0), abs=1e-5)


def test_a_subset_of_types_and_bad_arguments(tmp_path: Path) -> None:
    root = write_natural_dataset(tmp_path / "subset", n_refs=1, size=32, seed=0, kinds=[10, 1])
    assert sorted(row["dist_img"] for row in _rows(root)) == [
        f"I01_{k:02d}_{lv:02d}.png" for k in (1, 10) for lv in range(1, 6)
    ]
    with pytest.raises(ValueError, match="unknown distortion"):
        write_natural_dataset(tmp_path / "bad", n_refs=1, size=32, kinds=[26])
    with pytest.raises(ValueError, match="n_refs"):
        write_natural_dataset(tmp_path / "bad", n_refs=0)
    with pytest.raises(ValueError, match="level"):
        distort(np.zeros((8, 8, 3), np.uint8), 1, 6, np.random.default_rng(0))
