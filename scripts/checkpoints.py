"""Checkpoint files: a plain state dict, as every MONAI tool reads it, and the network's settings beside it.

``model.pt`` holds the network's ``state_dict`` and nothing else (MONAI's ``CheckpointLoader``,
``monai.bundle.load`` and ``ckpt_export`` read it as is). ``model.json`` beside it records the settings
that rebuild the network (kind, timm names, channels, side, extra timm arguments, crop size) and the
image size it was trained at, so ``score --ckpt`` and the tools need nothing but the two files; the
configs hold the same settings as ids. Files of the earlier ``{"network", "settings"}`` form still load.
Files load with ``weights_only=True`` and a ``map_location``, so GPU checkpoints open on CPU-only machines.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from scripts.calibration import calibrated_state
from scripts.options import optional_size
from scripts.output_dir import write_atomic, write_json_atomic
from torch import nn

logger = logging.getLogger(__name__)


NETWORK_SETTING_KEYS = ("network", "f_name", "s_name", "in_channels", "side", "f_kwargs", "s_kwargs", "patch_size")
CONFIG_SETTING_KEYS = (*NETWORK_SETTING_KEYS, "image_size", "window")  # recorded beside a checkpoint; config ids


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason in one line."""


class SettingsRecord:
    """The settings written beside a checkpoint (``model.json``): the network's own, the image size it reads and,
    when given, the HU window(s) its CT slices went through (``score`` and inference use them unless told otherwise).

    Given to ``BestCheckpointSaver`` as ``settings``; read at save time, so a DDP-wrapped network works too.
    """

    def __init__(self, network: nn.Module, image_size: int | None, window: Any = None) -> None:
        self.network = network
        self.image_size = optional_size(image_size, "image_size")  # None: the slice's own size (crops)
        self.window = None if window is None else json.loads(json.dumps(window))  # tuples as lists, as in the file

    def state_dict(self) -> dict[str, Any]:
        model: Any = getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel; ``settings``
        window = {} if self.window is None else {"window": self.window}
        return {**model.settings, "image_size": self.image_size, **window}


def settings_path(path: str | Path) -> Path:
    """The settings file beside a checkpoint: ``models/model.pt`` -> ``models/model.json``."""
    return Path(path).with_suffix(".json")


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings recorded beside a checkpoint, or ``{}`` when there is no settings file."""
    sidecar = settings_path(path)
    if not sidecar.is_file():
        return {}
    try:
        settings = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{sidecar}: not a readable settings file ({error})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{sidecar}: expected a JSON object of network settings")
    return settings


def config_ids(settings: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings that are config ids (``CONFIG_SETTING_KEYS``): what makes a bundle's ``network_def``
    and preprocessing fit the model they were recorded with."""
    return {key: settings[key] for key in CONFIG_SETTING_KEYS if key in settings}


def config_overrides(path: str | Path) -> dict[str, Any]:
    """The config ids that make a bundle's ``network_def`` and preprocessing fit a checkpoint: ``checkpoint`` and
    the settings recorded beside it (for ``ConfigWorkflow(..., **config_overrides(path))``)."""
    return {"checkpoint": str(path), **config_ids(read_settings(path))}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict[str, Any]]:
    """Return ``(state_dict, settings)`` of a checkpoint: a plain state dict and the settings file beside it
    (``{}`` without one), or the earlier ``{"network", "settings"}`` form."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file: pass the model.pt inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train first or pass its path.")
    content = _load_weights_only(path, map_location)
    if isinstance(content, dict) and "network" in content and "settings" in content:  # the earlier form
        return content["network"], dict(content["settings"])
    if not isinstance(content, dict) or not all(torch.is_tensor(value) for value in content.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; it was not written by this bundle.")
    return content, read_settings(path)


def _load_weights_only(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load`` with ``weights_only=True``: memory-mapped for today's zip format, read whole for the legacy
    one; a file that holds pickled code is refused (loading it could run that code)."""
    try:
        with open(path, "rb") as stream:
            zipped = stream.read(4) == b"PK\x03\x04"
        return torch.load(path, map_location=map_location, weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        found = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        if not found:  # not a pickle at all (a JSON or image file, say)
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (not a torch.save file)") from error
        raise CheckpointError(
            f"{path}: refused for safety: it holds pickled code, which loading could run ({found[0][:160]}); "
            "use a checkpoint written by this bundle (weights and settings only)"
        ) from error
    except Exception as error:  # torch raises several types for corrupt or foreign files
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {reason})"
        ) from error


def load_trained_weights(network: nn.Module, path: str | Path, role: str = "checkpoint") -> None:
    """Every weight of a trained model (a ``model.pt`` written by training, shipped in an export, or of the earlier
    form) into ``network``, whose settings (the config's network ids) must be those recorded with the model; a
    mismatch names the ids on both sides. ``role`` names the file in messages (``checkpoint``, ``init_checkpoint``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} {str(path)!r} does not exist: {_how_to_get_a_model(role)}")
    model = getattr(network, "module", network)  # DistributedDataParallel
    state, settings = read_checkpoint(path)
    own = json.loads(json.dumps(getattr(model, "settings", {})))  # tuples as lists, as in the settings file
    different = [key for key in NETWORK_SETTING_KEYS if key in settings and key in own and settings[key] != own[key]]
    if different:
        theirs = ", ".join(f"{key}={settings[key]!r}" for key in different)
        ours = ", ".join(f"{key}={own[key]!r}" for key in different)
        raise CheckpointError(
            f"{role} {path} was trained with {theirs}, but this config has {ours}: set these ids to the model's "
            "(as --id value on the command line, or merge the overlay it was trained with, e.g. configs/demo.json)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{role} {path} does not fit this network ({reason}): set the network ids (network, f_name, s_name, "
            "side, in_channels, patch_size) to those it was trained with, or put its model.json beside it"
        ) from None


def _how_to_get_a_model(role: str) -> str:
    """What to do when a config's model file is missing: where the demo's model is, when it has been trained."""
    from scripts import demo_output

    demo = demo_output() / "models" / "model.pt"
    if role == "checkpoint" and demo.is_file():
        return (
            f"give a model.pt written by training (--checkpoint FILE), e.g. the demo's, {demo}, with the overlay it "
            "was trained with (add configs/demo.json to --config_file)"
        )
    return "give a model.pt written by training, or run `python -m scripts demo` to train the embedded model"


class TrainedWeightsLoader:
    """The inference and evaluation configs' checkpoint loader: ``load_trained_weights`` when the engine starts.

    In place of MONAI's ``CheckpointLoader`` (same ``load_path``), so that a model trained with other network ids
    is refused with those ids named rather than a state-dict error, and files of the earlier form load too.
    """

    def __init__(self, load_path: str | Path, network: nn.Module) -> None:
        self.load_path = load_path
        self.network = network

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        load_trained_weights(self.network, self.load_path)
        logger.info("weights from %s", self.load_path)


NO_MODEL = (
    "no model found (neither {bundle} nor {demo}): run `python -m scripts demo` to train the embedded model "
    "(about 10 minutes on a CPU), train one on your data (see README), or pass --ckpt FILE"
)


def default_checkpoint() -> tuple[Path, str]:
    """The model to use when none is named, and what it is: the bundle's trained ``models/model.pt``, else the
    demo's. ``FileNotFoundError`` with one line saying how to get one when there is neither."""
    from scripts import bundle_root, demo_output

    bundle, demo = bundle_root() / "models" / "model.pt", demo_output() / "models" / "model.pt"
    if bundle.is_file():
        return bundle, "the bundle's model"
    if demo.is_file():
        return demo, "the demo's model (trained on synthetic CT by `python -m scripts demo`)"
    raise FileNotFoundError(NO_MODEL.format(bundle=bundle, demo=demo))


def save_checkpoint(path: str | Path, network: nn.Module, image_size: int | None, window: Any = None) -> Path:
    """Write ``network`` in the form the training workflows write (for tools, benchmarks and tests)."""
    write_json_atomic(settings_path(path), SettingsRecord(network, image_size, window).state_dict())
    return write_checkpoint_atomic(path, getattr(network, "module", network).state_dict())


def write_checkpoint_atomic(path: str | Path, content: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``: a
    reader or a crash sees the old file or the new one, never a missing or truncated one."""
    return write_atomic(path, lambda stream: torch.save(content, stream), durable=True)


def check_checkpoint_folder(folder: str | Path, needed_bytes: int) -> None:
    """``CheckpointError`` unless ``folder`` can be created, written and has room for a checkpoint of
    ``needed_bytes`` (twice: the temporary file beside the old one)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check."):
            pass
    except OSError as error:
        raise CheckpointError(
            f"checkpoint folder {folder} is not writable ({error.strerror or error}): set ckpt_dir"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < 2 * needed_bytes:
        raise CheckpointError(
            f"checkpoint folder {folder} has {free / 2**20:.0f} MB free; a checkpoint needs about "
            f"{2 * needed_bytes / 2**20:.0f} MB (written beside the previous one): free space or set ckpt_dir"
        )


def last_state_path(save_dir: str | Path, ckpt_name: str) -> Path:
    """Where a run that keeps its best model as ``ckpt_name`` keeps its last state (``model.pt``: ``model_last.pt``)."""
    name = Path(ckpt_name)
    return Path(save_dir) / f"{name.stem}_last{name.suffix or '.pt'}"


def _recorded_best(save_dir: str | Path, ckpt_name: str) -> str:
    """The best metric and its epoch from the run's last state, e.g. " (best metric 1.0400, after epoch 7)"; "" if
    there is none."""
    try:
        state = _load_weights_only(last_state_path(save_dir, ckpt_name), "cpu")
        epoch = int(state["trainer"]["iteration"]) // int(state["trainer"]["epoch_length"])
        return f" (best metric {float(state['best_metric']):.4f}, after epoch {epoch})"
    except Exception:  # no last state, or one this version cannot read: the path alone says enough
        return ""


class BestCheckpointSaver:
    """Keep the best checkpoint by the evaluator's key metric as ``save_dir/filename``, written atomically.

    Replaces MONAI's ``CheckpointSaver`` for the best model, which deletes the old file and then writes
    the new one in place (a kill in between loses both). The folder is checked (writable, room for
    two checkpoints) when the handler is built, before the first epoch. A NaN or infinite key metric
    never selects a checkpoint, and a tie keeps the earlier one. A checkpoint already at the path
    belongs to another run: it is replaced only with ``overwrite`` or continued with ``resume``. When the
    evaluator's metrics hold a calibration line (``scripts.calibration``), the saved network carries it.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: dict[str, Any],
        filename: str = "model.pt",
        overwrite: bool = False,
        resume: bool = False,
        settings: SettingsRecord | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.save_dict = {name: getattr(obj, "module", obj) for name, obj in save_dict.items()}  # unwrap DDP
        self.settings = settings
        self.best = -math.inf
        if self.path.exists() and not (overwrite or resume):
            raise CheckpointError(
                f"{self.path} already holds the model of another run{_recorded_best(save_dir, filename)}: pass "
                "--overwrite true to replace it, --resume true to continue that run, or set another --ckpt_dir"
            )
        size = sum(
            t.numel() * t.element_size()
            for obj in self.save_dict.values()
            for t in obj.state_dict().values()
            if torch.is_tensor(t)
        )
        check_checkpoint_folder(self.path.parent, size)

    def _content(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """One object's state dict (a plain ``model.pt``, as Ignite's ``Checkpoint`` writes one), or a dict of them
        by name; a network's with its score calibration refitted from the epoch's ``metrics`` when they hold one
        (``scripts.calibration``)."""
        states = {
            name: calibrated_state(obj, metrics) if isinstance(obj, nn.Module) else obj.state_dict()
            for name, obj in self.save_dict.items()
        }
        return next(iter(states.values())) if len(states) == 1 else states

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        name = getattr(engine.state, "key_metric_name", None)
        score = float(engine.state.metrics.get(name, math.nan)) if name else math.nan
        if not math.isfinite(score) or score <= self.best:
            return
        self.best = score
        if self.settings is not None:  # first, so that a checkpoint never lacks its settings
            write_json_atomic(settings_path(self.path), self.settings.state_dict())
        write_checkpoint_atomic(self.path, self._content(engine.state.metrics))
        logger.info("best %s %.4f: saved %s", name, score, self.path)
