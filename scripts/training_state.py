"""The last state of a training run, saved each epoch, so that ``--resume true`` continues where it stopped.

``TrainingState`` is a trainer handler. At the end of every epoch (after validation and the best
checkpoint) it writes ``<ckpt_name stem>_last.pt`` atomically: network, optimizer, scheduler, the
trainer's epoch and iteration, the best key metric so far, and every random state the next epoch
draws from (torch, CUDA, numpy, Python, and each random transform's own generator). With
``resume`` it loads that file when the trainer starts, so the run ends with the same weights and
metrics as one that was never stopped (on a CPU, with the same seed and settings).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from scripts.checkpoints import (
    BestCheckpointSaver,
    CheckpointError,
    _load_weights_only,
    check_checkpoint_folder,
    last_state_path,
    write_checkpoint_atomic,
)

logger = logging.getLogger(__name__)


def _random_transforms(transform: Any) -> Iterator[Randomizable]:
    """Every transform with its own random generator, in order, looking inside (nested) ``Compose``."""
    if isinstance(transform, Randomizable):
        yield transform
    for inner in getattr(transform, "transforms", ()) if isinstance(transform, Compose) else ():
        yield from _random_transforms(inner)


def _numpy_state(generator: np.random.RandomState) -> dict[str, Any]:
    state = generator.get_state(legacy=False)  # the legacy tuple's fields, by name
    keys, position = torch.from_numpy(state["state"]["key"].astype(np.int64)), state["state"]["pos"]
    gauss = (state["has_gauss"], state["gauss"])
    return {"name": state["bit_generator"], "keys": keys, "pos": position, "gauss": gauss}


def _set_numpy_state(generator: np.random.RandomState, state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    generator.set_state((state["name"], keys, state["pos"], *state["gauss"]))


def random_states(transform: Any = None) -> dict[str, Any]:
    """Every generator the next epoch draws from, in a form ``torch.load(weights_only=True)`` reads back."""
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(np.random.mtrand._rand),
        "python": (python_version, list(python_state), python_gauss),
        "transforms": [_numpy_state(t.R) for t in _random_transforms(transform)],
    }


def set_random_states(states: dict[str, Any], transform: Any = None) -> None:
    """Put back what ``random_states`` recorded."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    _set_numpy_state(np.random.mtrand._rand, states["numpy"])
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    transforms = list(_random_transforms(transform))
    if len(transforms) != len(states["transforms"]):
        raise CheckpointError(
            f"the saved state has {len(states['transforms'])} random transforms, this config {len(transforms)}: "
            "resume with the configuration the run started with"
        )
    for inner, state in zip(transforms, states["transforms"], strict=True):
        _set_numpy_state(inner.R, state)


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class TrainingState:
    """Save the trainer's whole state each epoch (atomically, rank 0 only) and, with ``resume``, load it at start.

    ``save_dict`` holds the objects with ``state_dict``/``load_state_dict`` (network, optimizer,
    scheduler); ``best_checkpoint`` is the run's ``BestCheckpointSaver`` (its best metric is saved and
    restored), ``validator`` the evaluator (its best metric and epoch, for the logs) and ``transform``
    the training preprocessing (its random transforms' generators). Attach it after the validation
    handler so each epoch's file holds that epoch's best. ``interval``: save every that many epochs (0: never,
    for benchmarks).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: dict[str, Any],
        best_checkpoint: BestCheckpointSaver,
        validator: Any = None,
        transform: Any = None,
        resume: bool = False,
        ckpt_name: str = "model.pt",
        interval: int = 1,
    ) -> None:
        self.path = last_state_path(save_dir, ckpt_name)
        self.interval = int(interval)
        self.save_dict = {name: getattr(obj, "module", obj) for name, obj in save_dict.items()}  # unwrap DDP
        self.best_checkpoint = best_checkpoint
        self.validator = validator
        self.transform = transform
        self.resume = resume
        self.engine: Any = None
        if resume and not self.path.is_file():
            raise CheckpointError(
                f"--resume true, but {self.path} does not exist: no earlier run of this ckpt_dir and ckpt_name "
                "saved a last state; drop --resume to start a new run"
            )
        network = self.save_dict.get("network")
        size = sum(t.numel() * t.element_size() for t in network.state_dict().values()) if network else 0
        check_checkpoint_folder(self.path.parent, 3 * size)  # weights and Adam's two moments

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        self.engine = engine
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def content(self) -> dict[str, Any]:
        """What is written: every object's state, the trainer's progress, the best metric and the random states."""
        validator_state = getattr(self.validator, "state", None)
        return {
            **{name: obj.state_dict() for name, obj in self.save_dict.items()},
            "trainer": dict(self.engine.state_dict()),
            "scaler": self.engine.scaler.state_dict() if getattr(self.engine, "scaler", None) else None,
            "best_metric": self.best_checkpoint.best,
            "validator": {
                "best_metric": float(getattr(validator_state, "best_metric", -1.0)),
                "best_metric_epoch": int(getattr(validator_state, "best_metric_epoch", -1)),
            },
            "random": random_states(self.transform),
        }

    def save(self, engine: Any) -> None:
        if self.interval > 0 and engine.state.epoch % self.interval == 0 and _is_main_process():
            write_checkpoint_atomic(self.path, self.content())

    def load(self, engine: Any) -> None:
        """Put the saved state back into every object (only with ``resume``), then keep the configured epochs."""
        if not self.resume:
            return
        state = _load_weights_only(self.path, "cpu")
        try:
            for name, obj in self.save_dict.items():
                obj.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError) as error:
            reason = " ".join(str(error).split())[:300]
            raise CheckpointError(
                f"{self.path} does not fit this configuration ({type(error).__name__}: {reason}); resume with the "
                "settings the run started with"
            ) from None
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max_epochs
        if state["scaler"] is not None and getattr(engine, "scaler", None):
            engine.scaler.load_state_dict(state["scaler"])
        self.best_checkpoint.best = float(state["best_metric"])
        if self.validator is not None:
            self.validator.state.best_metric = state["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = state["validator"]["best_metric_epoch"]
        set_random_states(state["random"], self.transform)
        logger.info(
            "resumed %s after epoch %d of %d (best %s so far %.4f)",
            self.path,
            engine.state.epoch,
            max_epochs,
            getattr(self.validator.state, "key_metric_name", "metric") if self.validator else "metric",
            self.best_checkpoint.best,
        )
