"""Native-resolution crops: random crops on the body for training, a fixed grid of body crops for scoring."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from scripts.checkpoints import read_checkpoint
from scripts.clinical.score import score_paths
from scripts.ct_io import write_dicom_slice
from scripts.networks import build_network, load_network
from scripts.patches import BODY_THRESHOLD, PatchScorer, RandBodyCropd, SpreadInferer

from tests.conftest import (
    EVALUATE_CONFIGS,
    TINY_NETWORKS,
    TINY_OVERRIDES,
    TRAIN_CONFIG,
    compiled_graphs,
    make_workflow,
)

PATCH = 32


def disc_slice(size: int = 256, radius: float = 70.0, value: float = 0.76) -> torch.Tensor:
    """A (1, size, size) slice: a disc of soft tissue in air, off centre."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (x - size * 0.6) ** 2 + (y - size * 0.45) ** 2 < radius**2
    return (inside.float() * value)[None]


@pytest.fixture
def two_discs() -> torch.Tensor:
    """Two noisy 128-px discs of different sizes: slices whose crops differ, so their spread is not zero."""
    return torch.cat([disc_slice(128)[None], disc_slice(128, radius=30)[None]]) + 0.02 * torch.rand(2, 1, 128, 128)


@pytest.fixture(scope="module")
def patch_network() -> PatchScorer:
    torch.manual_seed(0)
    network = build_network(**TINY_NETWORKS, patch_size=PATCH).eval()
    head = network.network.s.model.head.fc
    with torch.no_grad():  # spread the untrained head's outputs so that tiles differ
        head.weight.mul_(50.0)
    return network


def test_random_crops_lie_on_the_body() -> None:
    crop = RandBodyCropd("image", patch_size=PATCH, num_samples=200)
    crop.set_random_state(0)
    crops = crop({"image": disc_slice(), "label": torch.tensor([2.4])})
    assert len(crops) == 200
    corners = set()
    for item in crops:
        assert item["image"].shape == (1, PATCH, PATCH)
        assert (item["image"] > BODY_THRESHOLD).float().mean() >= 0.5
        assert float(item["label"]) == pytest.approx(2.4)
        corners.add(tuple(int(v) for v in (item["image"] > 0).nonzero()[0]))
    assert len(corners) > 20  # positions vary over the body


def test_a_tiny_body_or_a_small_slice_still_gives_crops() -> None:
    crop = RandBodyCropd("image", patch_size=PATCH, num_samples=5)
    crop.set_random_state(1)
    tiny = crop({"image": disc_slice(radius=8.0)})  # no window is half body: the best ones are used
    assert all((item["image"] > BODY_THRESHOLD).any() for item in tiny)
    small = crop({"image": torch.full((1, 20, 24), 0.7)})  # padded with air to the crop size
    assert all(item["image"].shape == (1, PATCH, PATCH) for item in small)


def test_whole_slice_profiles_pass_through() -> None:
    data = {"image": disc_slice()}
    assert RandBodyCropd("image", patch_size=None)(data)["image"] is data["image"]
    with pytest.raises(ValueError, match="patch_size"):
        RandBodyCropd("image", patch_size=4)


def test_slice_score_is_the_mean_over_its_body_tiles_and_sd_their_spread(patch_network: PatchScorer) -> None:
    image = disc_slice(size=200)[None] + 0.05 * torch.rand(1, 1, 200, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean, spread = patch_network.score_with_spread(image)[0].tolist()
        # by hand: the 7 x 7 grid of 32-px tiles from the top-left corner, padded with air to 224 px; those at
        # least half body
        padded = torch.nn.functional.pad(image, (0, 24, 0, 24))
        tiles = [padded[..., 32 * r : 32 * r + 32, 32 * c : 32 * c + 32] for r in range(7) for c in range(7)]
        body = [tile for tile in tiles if (tile > BODY_THRESHOLD).float().mean() >= 0.5]
        expected = patch_network.network(torch.cat(body)).flatten().numpy()
    assert 4 < len(body) < 49
    assert mean == pytest.approx(float(expected.mean()), abs=1e-5)
    assert spread == pytest.approx(float(expected.std()), abs=1e-5) and spread > 0
    assert patch_network(image).shape == (1, 1)


def test_scoring_is_deterministic_and_ignores_air(patch_network: PatchScorer) -> None:
    image = disc_slice()[None]
    changed = image.clone()
    changed[..., :40, :40] = torch.rand(1, 1, 40, 40) * 0.3  # noise in the air (below the body threshold)
    with torch.no_grad():
        first, again, in_air = (patch_network.score_with_spread(x) for x in (image, image, changed))
    assert torch.equal(first, again)
    assert torch.allclose(first, in_air)


def test_large_slices_are_scored_in_chunks_of_tiles(patch_network: PatchScorer) -> None:
    image = torch.full((1, 1, 320, 320), 0.76) + 0.05 * torch.rand(
        1, 1, 320, 320, generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        whole = patch_network.score_with_spread(image)
        patch_network.chunk = 7  # 100 body tiles in 15 calls
        try:
            chunked = patch_network.score_with_spread(image)
        finally:
            patch_network.chunk = 256
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_a_tile_sized_input_is_one_crop(patch_network: PatchScorer) -> None:
    crops = torch.rand(3, 1, PATCH, PATCH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(patch_network(crops), patch_network.network(crops))
        assert torch.all(patch_network.score_with_spread(crops)[:, 1] == 0)


def test_whole_slice_networks_get_a_zero_spread() -> None:
    network = build_network(**TINY_NETWORKS).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        predictions = SpreadInferer()(images, network)
        assert torch.allclose(predictions[:, :1], network(images)) and torch.all(predictions[:, 1] == 0)


def test_compiling_a_crop_scorer_compiles_its_network_of_one_crop(
    patch_network: PatchScorer, two_discs: torch.Tensor
) -> None:
    """Scoring calls ``score_with_spread``, which a compiled PatchScorer would run uncompiled: so
    ``compiled_for_inference`` compiles the crop network inside it; scores stay the uncompiled ones (within 1e-4)."""
    from scripts.engines import compiled_for_inference

    with torch.no_grad():
        expected = SpreadInferer(batch_size=4)(two_discs, patch_network)
        graphs_before = compiled_graphs()
        compiled = compiled_for_inference(patch_network)
        predictions = SpreadInferer(batch_size=4)(two_discs, compiled)
    assert compiled_graphs() > graphs_before
    assert predictions.shape == (2, 2) and torch.allclose(predictions, expected, atol=1e-4)
    assert compiled is not patch_network and not hasattr(patch_network.network, "_orig_mod")  # left as it was


def test_a_crop_scorer_compiled_whole_still_reports_its_spread(
    patch_network: PatchScorer, two_discs: torch.Tensor
) -> None:
    """The configs' ``compile: true`` has MONAI's engines compile the whole network: a PatchScorer inside
    ``torch.compile``'s module is still scored by ``score_with_spread`` (mean and spread over its crops)."""
    with torch.no_grad():
        expected = patch_network.score_with_spread(two_discs)
        predictions = SpreadInferer(batch_size=4)(two_discs, torch.compile(patch_network))
    assert torch.all(expected[:, 1] > 0) and torch.equal(predictions, expected)


@pytest.mark.parametrize("size", [256, 200])
def test_torchscript_scores_any_slice_size_like_eager(patch_network: PatchScorer, size: int) -> None:
    scripted = torch.jit.script(patch_network)
    images = torch.cat([disc_slice(size)[None], disc_slice(size, radius=40)[None]]) + 0.02 * torch.rand(
        2, 1, size, size
    )
    with torch.no_grad():
        assert torch.allclose(scripted(images), patch_network(images), atol=1e-5)


@pytest.fixture(scope="module")
def crop_bundle(ldct_train_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list]:
    """Phase 2 with 32-px crops of the 64-px slices (no resizing): the folder, the shapes the trainer saw and
    its losses."""
    root = tmp_path_factory.mktemp("crop_bundle")
    workflow = make_workflow(
        TRAIN_CONFIG,
        "train",
        **{**TINY_OVERRIDES, "image_size": None},
        patch_size=PATCH,
        patches_per_slice=3,
        dataset_dir=str(ldct_train_dir),
        ckpt_dir=str(root),
        output_dir=str(root / "out"),
        f_checkpoint=None,
        max_epochs=2,
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    shapes: list = []
    losses: list = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: shapes.append(engine.state.batch["image"].shape))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output[0]["loss"]))
    workflow.run()
    workflow.finalize()
    return root, shapes, losses


def test_crop_profile_trains_on_crops_and_records_the_patch_size(crop_bundle: tuple[Path, list, list]) -> None:
    root, shapes, losses = crop_bundle
    assert shapes and all(tuple(shape[-2:]) == (PATCH, PATCH) for shape in shapes)
    assert np.isfinite(losses).all()
    assert shapes[0][0] == TINY_OVERRIDES["batch_size"] * 3  # patches_per_slice crops of each slice
    settings = read_checkpoint(root / "model.pt")[1]
    assert settings["patch_size"] == PATCH and settings["image_size"] is None
    assert isinstance(load_network(str(root / "model.pt")), PatchScorer)


def test_evaluation_and_score_report_the_spread(
    crop_bundle: tuple[Path, list, list], ldct_test_dir: Path, tmp_path: Path
) -> None:
    root, _, _ = crop_bundle
    workflow = make_workflow(
        EVALUATE_CONFIGS,
        "train",
        **{**TINY_OVERRIDES, "image_size": None},
        patch_size=PATCH,  # the network ids the model was trained with, as for training
        ckpt_dir=str(root),
        dataset_dir=str(ldct_test_dir),
        output_dir=str(tmp_path / "eval"),
    )
    workflow.run()
    with open(tmp_path / "eval" / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 12 and all(float(row["score_sd"]) >= 0 for row in rows)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 12

    hu = np.full((96, 96), -1000.0)
    hu[16:80, 10:90] = 40.0 + np.random.default_rng(0).normal(0, 30, (64, 80))
    series = tmp_path / "series"
    for index in range(2):
        write_dicom_slice(series / f"{index}.dcm", hu, "1.2.3.4", position=float(index))
    summary = score_paths([series], tmp_path / "score", root / "model.pt", device="cpu", num_workers=0)
    with open(tmp_path / "score" / "scores.csv", newline="") as stream:
        scored = list(csv.DictReader(stream))
    assert list(scored[0]) == ["source", "series", "slice_index", "score", "score_sd", "warning"]
    assert all(float(row["score_sd"]) > 0 for row in scored)  # several body tiles, which differ
    assert summary["series"]["1.2.3.4"]["mean_score_sd"] > 0


def test_exported_torchscript_scores_crops_like_eager(crop_bundle: tuple[Path, list, list], tmp_path: Path) -> None:
    from scripts.tools.export import export_bundle

    root, _, _ = crop_bundle
    result = export_bundle(tmp_path / "dist", ckpt=root / "model.pt")
    assert result["torchscript_max_difference"] < 1e-4
    scripted = torch.jit.load(str(tmp_path / "dist" / "models" / "model.ts"))
    eager = load_network(str(root / "model.pt"))
    images = disc_slice(96)[None] + 0.05 * torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(scripted(images), eager(images), atol=1e-5)


@pytest.mark.parametrize("unset", [None, "None", "null", "NULL", ""])
def test_sizes_from_the_command_line_may_be_unset(unset) -> None:
    from scripts.networks import TFKT
    from scripts.options import optional_size
    from scripts.transforms import ResizeSliced

    assert optional_size(unset, "patch_size") is None and optional_size("64", "patch_size") == 64
    data = {"image": disc_slice(48)}
    assert RandBodyCropd("image", patch_size=unset)(data)["image"] is data["image"]
    assert ResizeSliced("image", [unset, unset])(data)["image"] is data["image"]
    assert isinstance(build_network(**TINY_NETWORKS, patch_size=unset), TFKT)
    assert optional_size(256.0, "image_size") == 256
    for bad in ("big", 2.5, "2.5", 0, -1, True):
        message = rf"patch_size must be a whole number of pixels \(at least 1\) or None, got {re.escape(repr(bad))}"
        with pytest.raises(ValueError, match=message):
            optional_size(bad, "patch_size")


def test_slices_of_any_size_score_the_same_alone_or_batched(
    crop_bundle: tuple[Path, list, list], tmp_path: Path
) -> None:
    """No resizing with crops: slices of different sizes (and placeholders of unreadable files) share batches,
    padded with air, which changes no score."""
    root, _, _ = crop_bundle
    rng = np.random.default_rng(1)
    for index, size in enumerate((96, 160, 72)):
        hu = np.full((size, size), -1000.0)
        hu[8:-8, 12:-12] = 40.0 + rng.normal(0, 20 * (index + 1), (size - 16, size - 24))
        write_dicom_slice(tmp_path / "in" / f"{size}.dcm", hu, f"1.2.{index}")
    (tmp_path / "in" / "broken.dcm").write_bytes(b"not a dicom file at all")
    scores = {}
    for batch_size, readers in ((1, 0), (4, 0), (4, 2)):  # 2 readers: parts of 2 slices, joined where sizes allow
        out = tmp_path / f"out{batch_size}_{readers}"
        summary = score_paths(
            [tmp_path / "in"], out, root / "model.pt", device="cpu", batch_size=batch_size, num_workers=readers
        )
        assert len(summary["errors"]) == 1
        with open(out / "scores.csv", newline="") as stream:
            scores[batch_size, readers] = {
                row["series"]: (float(row["score"]), float(row["score_sd"])) for row in csv.DictReader(stream)
            }
    assert len(scores[1, 0]) == 3
    for series, (score, spread) in scores[1, 0].items():
        assert scores[4, 0][series] == pytest.approx((score, spread), abs=1e-4)
        assert scores[4, 2][series] == pytest.approx((score, spread), abs=1e-4)
