"""Assemble a self-contained MONAI Model Zoo bundle folder from this repository and a trained checkpoint.

``python -m scripts export --output_dir DIST [--ckpt bundle/models/model.pt]``
``[--metrics bundle/outputs/eval/metrics.json]``

DIST holds what the Model Zoo expects::

    configs/   the bundle's configs, with paths made relative to DIST (run from inside it)
    models/    model.pt (the checkpoint) and model.ts (TorchScript with metadata and inference config);
               with ``--onnx true`` also model.onnx (``scripts.tools.onnx_export``)
    docs/      the model card, data licence and metadata schema
    scripts/   this package, which the configs import
    LICENSE
    large_files.yml   where to fetch models/* with their sha256 (the weights are not committed); written only
                      with ``--weights_url`` (an empty url fails the Zoo's download step)

The metadata records the checkpoint's input size and channels, and, with ``--metrics``, its
evaluation figures. The folder is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from scripts import bundle_root
from scripts.checkpoints import CONFIG_SETTING_KEYS, config_ids, read_checkpoint, write_checkpoint_atomic
from scripts.networks import NETWORK_SETTING_KEYS, build_network
from scripts.options import windows_text
from scripts.transforms import recorded_windows

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # scripts/: its flat modules are the runtime the configs import
TORCHSCRIPT_ATOL = 1e-4
TRAINED_NETWORK_CONFIGS = ("train.json", "inference.json")  # their network ids describe models/model.pt


class ExportError(RuntimeError):
    """The bundle cannot be exported, with the reason."""


def _with_settings(text: str, settings: dict[str, Any]) -> str:
    """A config's text with its network ids (``network``, ``f_name``, ..., ``image_size``) and ``window`` set to
    the trained model's, so ``network_def`` builds the network ``models/model.pt`` holds and slices are windowed as
    it was trained."""
    config = json.loads(text)
    keys = [key for key in CONFIG_SETTING_KEYS if key in config and key in settings]
    if not keys:
        return text
    config.update({key: settings[key] for key in keys})
    return json.dumps(config, indent=4) + "\n"


def _copy_runtime(target: Path) -> None:
    """The bundle's runtime: the flat modules of ``scripts/`` (what the configs import). The subpackages (tools,
    synthetic data, clinical scoring, integrations) and the command line stay in the repository."""
    target.mkdir()
    for module in sorted(PACKAGE_DIR.glob("*.py")):
        if module.name != "__main__.py":
            shutil.copyfile(module, target / module.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_classes(settings: dict[str, Any]) -> str:
    """What the exported model reads, in the metadata's words: its window(s), channels and input size."""
    windows = recorded_windows(settings)
    channels = int(settings.get("in_channels", 1))
    shown = windows_text(windows)
    slice_kind = f"{'one' if channels == 1 else channels}-channel CT slice"
    if len(windows) > 1:
        through = f"{slice_kind}, one channel per HU window ({shown}), each scaled to [0, 1]"
    else:
        repeated = ", the same in each channel" if channels > 1 else ""
        through = f"{slice_kind}, windowed to {shown} HU and scaled to [0, 1]{repeated}"
    size, crop = settings.get("image_size"), settings.get("patch_size")
    if size:
        return f"{through}, resized to {size}x{size}"
    crops = f", scored as the mean over a grid of {crop}x{crop} crops on the body" if crop else ""
    return f"{through}, at its own size{crops}"


def _metadata(source: Path, settings: dict[str, Any], metrics: dict[str, float] | None) -> dict[str, Any]:
    """metadata.json with the checkpoint's input (size, channels, window) and, when given, its evaluation metrics."""
    meta: dict[str, Any] = json.loads(source.read_text())
    meta["image_classes"] = _image_classes(settings)
    image = meta["network_data_format"]["inputs"]["image"]
    size = int(settings.get("image_size") or image["spatial_shape"][0])  # None: crops of any slice size
    image["spatial_shape"] = [size, size]
    image["num_channels"] = int(settings.get("in_channels", 1))
    image["channel_def"] = {str(c): "image" for c in range(image["num_channels"])}
    if metrics:
        meta["eval_metrics"] = dict(metrics)
    return meta


def export_torchscript(dist: Path, checkpoint: Path, settings: dict[str, Any]) -> float:
    """``models/model.ts`` through ``monai.bundle ckpt_export``, with the metadata and inference config embedded;
    returns the largest difference from the eager network on a random batch.

    Whole-slice networks are traced at their input size. Networks that score crops
    (``scripts.patches.PatchScorer``) are scripted, with the inner network traced at the crop size,
    so the TorchScript model scores slices of any size the way the eager one does.
    """
    from monai.bundle import ckpt_export

    size, channels = int(settings.get("image_size") or 512), int(settings.get("in_channels", 1))
    ckpt_export(
        net_id="network_def",
        filepath=str(dist / "models" / "model.ts"),
        ckpt_file=str(checkpoint),
        meta_file=str(dist / "configs" / "metadata.json"),
        config_file=str(dist / "configs" / "inference.json"),
        use_trace=not settings.get("patch_size"),
        input_shape=[1, channels, size, size],
        bundle_root=str(dist),
        **config_ids(settings),  # as written into the configs
    )
    eager = build_network(**{k: v for k, v in settings.items() if k in NETWORK_SETTING_KEYS})
    eager.load_state_dict(read_checkpoint(checkpoint)[0])
    eager.eval()
    scripted = torch.jit.load(str(dist / "models" / "model.ts"), map_location="cpu").eval()
    batch = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = float((scripted(batch) - eager(batch)).abs().max())
    if difference > TORCHSCRIPT_ATOL:
        raise ExportError(f"TorchScript outputs differ from eager by {difference:.3g} (> {TORCHSCRIPT_ATOL})")
    return difference


NO_WEIGHTS_URL = (
    "large_files.yml not written: no --weights_url. This folder holds its weights and works as it is; for a Model "
    "Zoo pull request (which keeps weights out of git), host models/* and export again with --weights_url URL"
)
NO_METRICS = (
    "metadata eval_metrics left at 0.0: no --metrics. For the Model Zoo, evaluate the model and export again with "
    "--metrics bundle/outputs/eval/metrics.json"
)


def _large_files(dist: Path, weights_url: str) -> str:
    """Where the Model Zoo fetches ``models/*`` (``weights_url``/<name>) and their sha256."""
    lines = ["# where to fetch the weights (not kept in git), with their sha256", "large_files:"]
    for name in ("model.pt", "model.ts", "model.onnx"):
        path = dist / "models" / name
        if path.is_file():
            url = f"{weights_url.rstrip('/')}/{name}"
            lines += [
                f'  - path: "models/{name}"',
                f'    url: "{url}"',
                f'    hash_val: "{_sha256(path)}"',
                '    hash_type: "sha256"',
            ]
    return "\n".join(lines) + "\n"


def read_metrics(path: str | Path) -> dict[str, float]:
    """The four figures of an evaluation's ``metrics.json``, for the metadata; ``ExportError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(
            f"--metrics {path} not found: evaluation writes metrics.json into its output_dir "
            "(bundle/outputs/eval/metrics.json by default)"
        )
    try:
        figures = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"--metrics {path} cannot be read as JSON ({error})") from None
    names = ("plcc", "srocc", "krocc", "aggregate")
    missing = [
        name for name in names if not isinstance(figures, dict) or not isinstance(figures.get(name), int | float)
    ]
    if missing:
        raise ExportError(f"--metrics {path} has no number for {', '.join(missing)}: give an evaluation's metrics.json")
    return {name: float(figures[name]) for name in names}


def export_bundle(
    output_dir: str | Path,
    ckpt: str | Path | None = None,
    metrics: str | Path | None = None,
    weights_url: str = "",
    torchscript: bool = True,
    overwrite: bool = False,
    onnx: bool = False,
) -> dict[str, Any]:
    """Write the Model Zoo folder; returns what was written (paths, TorchScript and ONNX differences)."""
    source = bundle_root()
    checkpoint = Path(ckpt) if ckpt else source / "models" / "model.pt"
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint {checkpoint} not found: train one first, or give --ckpt FILE")
    dist = Path(output_dir)
    if dist.exists() and not overwrite:
        raise ExportError(f"{dist} already exists: choose another --output_dir or pass --overwrite")
    state, settings = read_checkpoint(checkpoint)
    if not settings:
        raise ExportError(f"{checkpoint}: no network settings beside it (model.json, written by training)")
    figures = read_metrics(metrics) if metrics else None
    if onnx:
        from scripts.tools.onnx_export import export_bundle_onnx, require_onnx

        require_onnx()  # before any work: one line saying what to install
    dist.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dist.name}.", dir=dist.parent))
    try:
        (staging / "configs").mkdir()
        for config in sorted(p for p in (source / "configs").iterdir() if p.is_file()):
            text = config.read_text()
            if config.name == "metadata.json":
                text = json.dumps(_metadata(config, settings, figures), indent=4) + "\n"
            elif config.name in TRAINED_NETWORK_CONFIGS:
                text = _with_settings(text, settings)
            (staging / "configs" / config.name).write_text(text)  # bundle_root is "." in the repository too
        shutil.copytree(source / "docs", staging / "docs")
        _copy_runtime(staging / "scripts")
        licence = source / "LICENSE" if (source / "LICENSE").is_file() else source.parent / "LICENSE"
        shutil.copyfile(licence, staging / "LICENSE")
        (staging / "models").mkdir()
        write_checkpoint_atomic(staging / "models" / "model.pt", state)  # a plain state dict, as MONAI's tools read
        difference = export_torchscript(staging, staging / "models" / "model.pt", settings) if torchscript else None
        model_onnx = staging / "models" / "model.onnx"
        onnx_difference = export_bundle_onnx(checkpoint, model_onnx, settings.get("image_size")) if onnx else None
        if weights_url:  # an empty url would fail the Zoo's download step: no file, and the note says why
            (staging / "large_files.yml").write_text(_large_files(staging, weights_url))
        if dist.exists():
            shutil.rmtree(dist)
        os.replace(staging, dist)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "output_dir": str(dist),
        "torchscript_max_difference": difference,
        "onnx_max_difference": onnx_difference,
        "image_size": settings.get("image_size"),
        "notes": [note for note, missing in ((NO_WEIGHTS_URL, not weights_url), (NO_METRICS, not figures)) if missing],
    }
