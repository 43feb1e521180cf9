"""ONNX export of the scoring network: ``models/model.onnx`` of an exported bundle (``export --onnx true``).

The graph has one input, ``image`` (B, C, H, W) float32 in [0, 1] (the bundle's preprocessing:
CT windowed to [-1000, 400] HU and scaled), and one output, ``score`` (B, 1), the raw predicted
mean radiologist score (inference clips it to [0, 4]). The batch axis is dynamic.

- Whole-slice networks are traced at the checkpoint's ``image_size``: H = W = image_size; the
  caller resizes slices to that size first, as the bundle does.
- Networks that read native-resolution crops (``scripts.patches.PatchScorer``) are exported *with
  their tiling*, so H and W are dynamic too and the ONNX model scores a whole slice of any size
  exactly as the eager network does: ``patch_size`` tiles from the top-left corner, the bottom and
  right edges padded with air (0) to whole tiles, the tiles with at least half their first-channel
  pixels above 0.5 (or, when none has, the slice's tiles with the largest such fraction) scored
  and averaged. The inner network is traced at the tile size and the tiling is scripted, written
  with reshapes and a gather/scatter of the body tiles (the classic exporter cannot convert
  ``unfold`` on dynamic sizes, nor ``index_add``); all body tiles of a batch go through the
  network in one call.

The classic (TorchScript-based) exporter is used, ``torch.onnx.export(..., dynamo=False)``: it needs
only the ``onnx`` package, whereas the dynamo exporter needs ``onnxscript`` and cannot export the
data-dependent choice of body tiles. The written file is checked with ``onnx.checker`` and, when
``onnxruntime`` is installed, run against the eager network.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scripts.patches import PatchScorer, on_body
from scripts.tools.export import ExportError
from torch import nn

ONNX_OPSET = 17
ONNX_ATOL = 1e-4
INSTALL_HINT = "pip install onnx onnxruntime"


class OnnxExportError(ExportError):
    """The ONNX model cannot be written or does not match the eager network, with the reason in one line."""


def require_onnx() -> None:
    """``OnnxExportError`` with the install line when the ``onnx`` package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OnnxExportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None


class OnnxTiling(nn.Module):
    """``PatchScorer.forward`` in operations the ONNX exporter converts at any slice size (see the module docstring).

    ``network`` is the inner crop network, traced at the tile size; scripted, this module scores
    (B, C, H, W) slices as (B, 1) like the ``PatchScorer`` it is made from.
    """

    def __init__(self, network: nn.Module, patch_size: int, min_fraction: float, threshold: float) -> None:
        super().__init__()
        self.network = network
        self.patch_size = int(patch_size)
        self.min_fraction = float(min_fraction)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, [0, (p - x.shape[3] % p) % p, 0, (p - x.shape[2] % p) % p])
        batch, channels, rows, cols = x.shape[0], x.shape[1], x.shape[2] // p, x.shape[3] // p
        # the tiles in PatchScorer.tiles' order (row by row), one per row of a (B * n, C, p, p) batch
        tiles = x.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        tiles = tiles.reshape(batch * rows * cols, channels, p, p)
        fraction = (tiles[:, 0] > self.threshold).float().mean(dim=(-1, -2)).reshape(batch, rows * cols)
        keep = on_body(fraction, self.min_fraction)
        index = keep.reshape(-1).nonzero().reshape(-1)
        scores = self.network(tiles.index_select(0, index)).reshape(-1)
        every = torch.zeros(batch * rows * cols, dtype=scores.dtype, device=x.device).scatter(0, index, scores)
        total = every.reshape(batch, rows * cols).sum(dim=1)
        return (total / keep.sum(dim=1).to(total.dtype)).unsqueeze(1)


def _exportable(network: nn.Module) -> tuple[nn.Module, dict[int, str]]:
    """The module to hand to the exporter, and the input's dynamic axes."""
    if isinstance(network, PatchScorer):
        inner = network.__prepare_scriptable__().network  # traced at the tile size, like model.ts
        tiling = OnnxTiling(inner, network.patch_size, network.min_fraction, network.threshold).eval()
        return torch.jit.script(tiling), {0: "batch", 2: "height", 3: "width"}
    return network, {0: "batch"}


def _check_batches(network: nn.Module, image_size: int | None, in_channels: int) -> list[torch.Tensor]:
    """Random inputs to compare the ONNX model with the eager network on.

    Whole slices: a batch of 2 at ``image_size``. Crops: slices that are not whole numbers of tiles,
    part air (so the choice of body tiles and the padding are exercised), at two sizes.
    """
    generator = torch.Generator().manual_seed(0)
    if not isinstance(network, PatchScorer):
        assert image_size is not None  # export_onnx refuses a whole-slice network without it
        return [torch.rand(2, in_channels, image_size, image_size, generator=generator)]
    p = network.patch_size
    batches = []
    for count, height, width in ((2, 2 * p + p // 2, 3 * p - 3), (1, p + 5, 2 * p)):
        batch = torch.rand(count, in_channels, height, width, generator=generator)
        batch[-1, :, :, : width // 2] = 0.0  # the left half of the last slice is air
        batches.append(batch)
    return batches


def export_onnx(
    network: nn.Module, path: str | Path, image_size: int | None, in_channels: int = 1, opset: int = ONNX_OPSET
) -> float | None:
    """Write ``network`` (eval mode, as ``scripts.networks.load_network`` returns it) to ``path`` as ONNX.

    ``image_size`` is the whole-slice network's input size (H = W); it is unused for crop networks
    (``PatchScorer``), whose ONNX model takes any H and W. Returns the largest absolute difference
    from the eager network on random batches run with onnxruntime, or None when onnxruntime is not
    installed (the file is then only checked with ``onnx.checker``). ``OnnxExportError`` when the
    onnx package is missing, the export fails, or the difference exceeds ``ONNX_ATOL``.
    """
    require_onnx()
    import onnx

    if int(opset) < ONNX_OPSET:
        raise OnnxExportError(f"opset must be at least {ONNX_OPSET}, got {opset}")
    if not isinstance(network, PatchScorer) and not image_size:
        raise OnnxExportError("a whole-slice network needs its image_size to be exported to ONNX")
    network = network.eval()
    parameter = next(network.parameters())
    batches = _check_batches(network, image_size, int(in_channels))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices and the tracer's warnings
            exportable, axes = _exportable(network)
            torch.onnx.export(
                exportable,
                (batches[0].to(parameter.device, parameter.dtype),),
                str(path),
                dynamo=False,
                input_names=["image"],
                output_names=["score"],
                opset_version=int(opset),
                dynamic_axes={"image": axes, "score": {0: "batch"}},
            )
        onnx.checker.check_model(str(path))
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise OnnxExportError(f"ONNX export failed ({type(error).__name__}: {reason})") from error
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    difference = 0.0
    for batch in batches:
        with torch.inference_mode():
            expected = network(batch.to(parameter.device, parameter.dtype)).float().cpu()
        (output,) = session.run(["score"], {"image": batch.numpy()})
        difference = max(difference, float((torch.from_numpy(output) - expected).abs().max()))
    if difference > ONNX_ATOL:
        raise OnnxExportError(f"ONNX outputs differ from eager by {difference:.3g} (> {ONNX_ATOL})")
    return difference


def export_bundle_onnx(checkpoint: str | Path, path: str | Path, image_size: int | None) -> float | None:
    """``path`` (an exported bundle's ``models/model.onnx``) from ``checkpoint`` (``export --onnx true``); returns
    ``export_onnx``'s difference from the eager network."""
    from scripts.networks import load_network

    network = load_network(str(checkpoint), map_location="cpu")
    settings: dict[str, Any] = getattr(network, "settings", {})
    return export_onnx(network, path, image_size, int(settings.get("in_channels", 1)))
