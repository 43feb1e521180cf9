"""Preprocessing batched on the network's device (``BatchPreprocess`` in the inference config's ``prepare_batch``):
the numbers of the per-slice transforms within 1e-5, whatever the mix of sizes, HU and rendered slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.transforms import Compose, ScaleIntensity, ScaleIntensityd, ScaleIntensityRange
from scripts.ct_inputs import LoadCTSliced
from scripts.ct_io import write_dicom_slice
from scripts.engines import BatchFlipRotate, PlainTensorBatch
from scripts.patches import pad_collate
from scripts.transforms import BatchPreprocess, ResizeSliced, WindowHUd, window_channels

WINDOWS = {"one": [-1000.0, 400.0], "three": [[-1000.0, 400.0], [-160.0, 240.0], [-1350.0, 150.0]]}


def _inputs(root: Path) -> list[dict]:
    """DICOM slices of 96 and 80 px (HU), a rendered float TIFF of 64 px and a constant slice."""
    rng = np.random.default_rng(0)
    paths = [
        write_dicom_slice(root / "a.dcm", rng.normal(0.0, 300.0, (96, 96)), "1.2.3"),
        write_dicom_slice(root / "b.dcm", rng.normal(-200.0, 500.0, (80, 72)), "1.2.4"),
        write_dicom_slice(root / "flat.dcm", np.full((96, 96), 40.0), "1.2.5"),
    ]
    tifffile.imwrite(root / "rendered.tif", rng.random((64, 64), dtype=np.float32))
    return [{"image": str(path)} for path in [*paths, root / "rendered.tif"]]


@pytest.mark.parametrize("windows", sorted(WINDOWS))
@pytest.mark.parametrize("image_size", [48, None])
def test_batched_equals_per_slice(tmp_path: Path, windows: str, image_size: int | None) -> None:
    channels = 3 if windows == "three" else 1
    window = WINDOWS[windows]
    load = LoadCTSliced("image", channels=channels)
    items = [load(item) for item in _inputs(tmp_path)]
    per_slice = Compose(
        [
            WindowHUd("image", window=window, channels=channels),
            ResizeSliced("image", spatial_size=[image_size, image_size]),
            ScaleIntensityd("image", minv=0.0, maxv=1.0),
        ]
    )
    expected = pad_collate([per_slice(dict(item)) for item in items])["image"].as_tensor()
    prepare = PlainTensorBatch(preprocess=BatchPreprocess(window=window, channels=channels, image_size=image_size))
    batched, _ = prepare(pad_collate(items), torch.device("cpu"))
    assert batched.shape == expected.shape and batched.shape[1] == channels
    assert torch.allclose(batched, expected, atol=1e-5, rtol=0), float((batched - expected).abs().max())
    if channels == 1:  # a constant slice becomes zeros, as MONAI's rescale makes it (windows differ per channel)
        assert float(batched[2].abs().max()) == 0.0


def _dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and quarter turns of a square slice."""
    turns = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    return turns + [turn.flip(-1) for turn in turns]


def test_training_flips_and_turns_are_drawn_per_slice_on_the_batch() -> None:
    """Each slice comes out as one of its 8 flips/quarter turns, chosen independently per slice with the paper's
    probabilities (every flip and every turn 0.5), reproducibly from torch's seed; non-square slices turn 180 only."""
    images = torch.arange(256 * 16 * 16, dtype=torch.float32).reshape(256, 1, 16, 16)
    augment = BatchFlipRotate(prob=0.5, max_k=3)
    torch.manual_seed(0)
    out = augment(images)
    chosen = []
    for image, result in zip(images, out, strict=True):
        matches = [index for index, view in enumerate(_dihedral(image)) if torch.equal(view, result)]
        assert len(matches) == 1
        chosen.append(matches[0])
    unchanged = chosen.count(0) / len(chosen)
    assert len(set(chosen)) == 8 and 0.1 < unchanged < 0.25  # 1/8 (nothing) + 1/24 (both flips and a half turn)
    torch.manual_seed(0)
    assert torch.equal(augment(images), out)
    wide = torch.rand(64, 1, 8, 16)
    turned = BatchFlipRotate(prob=1.0)(wide)
    assert turned.shape == wide.shape and torch.equal(turned, wide)  # both flips and a half turn: the same slice


def test_a_batch_of_one_size_takes_the_short_path_with_the_same_numbers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = [write_dicom_slice(tmp_path / f"{k}.dcm", rng.normal(0.0, 300.0, (96, 96)), "1.2.3") for k in range(3)]
    items = [LoadCTSliced("image")({"image": str(path)}) for path in paths]
    per_slice = Compose([WindowHUd("image"), ResizeSliced("image", spatial_size=[64, 64]), ScaleIntensityd("image")])
    expected = torch.stack([per_slice(dict(item))["image"].as_tensor() for item in items])
    batched, _ = PlainTensorBatch(preprocess=BatchPreprocess(image_size=64))(pad_collate(items), torch.device("cpu"))
    assert torch.allclose(batched, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [[-1000.0, 400.0], [-160.0, 240.0], [-1350.0, 150.0], [0.5, 0.75]])
def test_windowing_and_normalising_are_monais_to_the_bit(window: list[float]) -> None:
    """The one-temporary windowing and min-max scaling give MONAI's ``ScaleIntensityRange`` (clipped to [0, 1]) and
    ``ScaleIntensity(minv=0, maxv=1)`` exactly, per slice and per channel, a constant slice included."""
    hu = torch.randn(4, 1, 33, 47, generator=torch.Generator().manual_seed(0)) * 700.0
    hu[3] = 40.0
    monai_window = ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)
    expected = torch.stack([torch.as_tensor(monai_window(slice_)) for slice_ in hu])
    assert torch.equal(window_channels(hu, [tuple(window)], 1, dim=1), expected)
    three = window_channels(hu, [tuple(window), (-160.0, 240.0), (-1350.0, 150.0)], 3, dim=1)
    assert torch.equal(three[:, :1], expected) and three.shape == (4, 3, 33, 47)
    scaled = BatchPreprocess.normalise(hu)
    monai_scale = ScaleIntensity(minv=0.0, maxv=1.0)
    assert torch.equal(scaled, torch.stack([torch.as_tensor(monai_scale(slice_)) for slice_ in hu]))
    assert float(scaled[3].abs().max()) == 0.0


def test_integer_hu_travel_as_int16_and_give_the_same_batch(tmp_path: Path) -> None:
    """The inference config reads integer DICOM HU as int16 (half the bytes between processes and to the GPU); a
    batch of them, or one mixing them with float32 slices and an unreadable file's placeholder, comes out of the
    batched preprocessing exactly as the float32 reading does."""
    items = _inputs(tmp_path)
    (tmp_path / "broken.dcm").write_bytes(b"not dicom")
    items.append({"image": str(tmp_path / "broken.dcm")})
    compact = [LoadCTSliced("image", compact_hu=True)(dict(item)) for item in items]
    wide = [LoadCTSliced("image")(dict(item)) for item in items]
    assert [item["image"].dtype for item in compact] == [torch.int16] * 3 + [torch.float32] * 2
    assert all(torch.equal(a["image"].float(), b["image"]) for a, b in zip(compact, wide, strict=True))
    prepare = PlainTensorBatch(preprocess=BatchPreprocess(image_size=48))
    for chosen in ([0, 1, 2], [0, 2], list(range(5))):  # sizes apart, one size, everything mixed
        batched, _ = prepare(pad_collate([compact[k] for k in chosen]), torch.device("cpu"))
        expected, _ = prepare(pad_collate([wide[k] for k in chosen]), torch.device("cpu"))
        assert batched.dtype == torch.float32 and torch.equal(batched, expected)
