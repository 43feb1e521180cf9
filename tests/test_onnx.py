"""ONNX export (``export --onnx true``): models/model.onnx scores like the eager network, with a dynamic batch
(whole slices) or dynamic batch and slice size (crop networks, which carry their tiling)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.checkpoints import save_checkpoint
from scripts.networks import build_network, load_network
from scripts.tools.export import ExportError, export_bundle
from scripts.tools.onnx_export import ONNX_ATOL, ONNX_OPSET, export_onnx

from tests.conftest import REPO_ROOT, TINY_NETWORKS

PATCH = 32
HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="onnx or onnxruntime cannot be imported (pip install onnx onnxruntime)"
)


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["score"], {"image": images.numpy()})
    return torch.from_numpy(scores)


def _eager(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return network(images)


def _slices(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(count, 1, height, width) slices: an off-centre body of soft tissue (0.76) with noise, in air (0)."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    generator = torch.Generator().manual_seed(seed)
    images = []
    for index in range(count):
        radius = min(height, width) * (0.45 - 0.1 * index)
        inside = ((x - width * 0.55) ** 2 + (y - height * 0.5) ** 2 < radius**2).float()
        images.append(inside * (0.76 + 0.05 * torch.randn(height, width, generator=generator)))
    return torch.stack(images)[:, None]


@pytest.fixture(scope="module")
def crop_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny crop-profile checkpoint (32-px crops, no image size), its head spread so that tiles score apart."""
    torch.manual_seed(0)
    network = build_network(**TINY_NETWORKS, patch_size=PATCH).eval()
    with torch.no_grad():
        network.network.s.model.head.fc.weight.mul_(50.0)
    return save_checkpoint(tmp_path_factory.mktemp("crop_checkpoint") / "model.pt", network, image_size=None)


@needs_onnx
def test_whole_slice_onnx_matches_eager_with_a_dynamic_batch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import onnxruntime

    network = load_network(str(tiny_checkpoint))
    path = tmp_path / "model.onnx"
    assert export_onnx(network, path, image_size=64, in_channels=1) <= ONNX_ATOL
    (image,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert image.name == "image" and image.shape[1:] == [1, 64, 64] and isinstance(image.shape[0], str)
    for count, seed in ((3, 1), (1, 2)):
        images = torch.rand(count, 1, 64, 64, generator=torch.Generator().manual_seed(seed))
        scores = _run_onnx(path, images)
        assert scores.shape == (count, 1)
        assert torch.allclose(scores, _eager(network, images), atol=ONNX_ATOL, rtol=0.0)


@needs_onnx
def test_crop_onnx_tiles_slices_of_any_size_like_eager(crop_checkpoint: Path, tmp_path: Path) -> None:
    network = load_network(str(crop_checkpoint))
    path = tmp_path / "model.onnx"
    assert export_onnx(network, path, image_size=None, in_channels=1) <= ONNX_ATOL
    # a batch of 3 and one of 1, at sizes that are not whole numbers of tiles, and a slice smaller than a tile
    for count, height, width in ((3, 96, 96), (1, 70, 130), (1, 20, 28)):
        images = _slices(count, height, width, seed=height)
        expected = _eager(network, images)
        assert len(expected.unique()) == count  # the slices score apart: the comparison means something
        assert torch.allclose(_run_onnx(path, images), expected, atol=ONNX_ATOL, rtol=0.0)
    # air around the slice changes no score, as in the eager network
    padded = torch.nn.functional.pad(_slices(1, 70, 130, seed=70), (0, 40, 0, 25))
    assert torch.allclose(_run_onnx(path, padded), _eager(network, padded[..., :70, :130]), atol=ONNX_ATOL)


@needs_onnx
def test_export_command_writes_model_onnx(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    dist = tmp_path / "dist"
    command = [sys.executable, "-m", "scripts", "export", "--output_dir", str(dist), "--ckpt", str(tiny_checkpoint)]
    result = subprocess.run(
        [*command, "--torchscript", "false", "--onnx", "true", "--weights_url", "https://example.org/w"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "models/model.onnx matches the eager network within" in result.stdout
    assert "not run" not in result.stdout  # it ran: no line may say otherwise
    model = onnx.load(str(dist / "models" / "model.onnx"))
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= ONNX_OPSET
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["score"]
    assert 'path: "models/model.onnx"' in (dist / "large_files.yml").read_text()
    assert not (dist / "models" / "model.ts").exists()


def test_a_missing_onnx_package_is_one_line_saying_what_to_install(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ExportError, match="pip install onnx onnxruntime") as error:
        export_bundle(tmp_path / "dist", tiny_checkpoint, onnx=True)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing was written
