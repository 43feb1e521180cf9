"""The best checkpoint is written atomically, only for a real improvement, into a folder checked beforehand."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from scripts.checkpoints import BestCheckpointSaver, CheckpointError, SettingsRecord, read_checkpoint
from scripts.networks import build_network

from tests.conftest import TINY_NETWORKS, TINY_OVERRIDES, TRAIN_CONFIG, make_workflow


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return build_network(**TINY_NETWORKS)


def _saver(network: torch.nn.Module, folder: Path) -> BestCheckpointSaver:
    return BestCheckpointSaver(folder, {"model": network}, settings=SettingsRecord(network, 64))


def _epoch(saver: BestCheckpointSaver, value: float) -> None:
    engine = Engine(lambda engine, batch: None)
    engine.state.key_metric_name, engine.state.metrics = "aggregate", {"aggregate": value}
    saver(engine)


def test_only_real_improvements_are_saved(network: torch.nn.Module, tmp_path: Path) -> None:
    saver = _saver(network, tmp_path)
    _epoch(saver, math.nan)
    assert not (tmp_path / "model.pt").exists()  # NaN never selects a checkpoint
    _epoch(saver, 1.5)
    first = (tmp_path / "model.pt").stat().st_mtime_ns
    for value in (1.5, 1.2, math.nan, -math.inf):
        _epoch(saver, value)
    assert (tmp_path / "model.pt").stat().st_mtime_ns == first
    _epoch(saver, 2.0)
    assert saver.best == 2.0 and read_checkpoint(tmp_path / "model.pt")[1]["image_size"] == 64  # model.json
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == network.state_dict().keys()  # plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temporary files left


def test_a_crash_while_saving_keeps_the_previous_best(
    network: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saver = _saver(network, tmp_path)
    _epoch(saver, 1.0)
    before = (tmp_path / "model.pt").read_bytes()
    real_save = torch.save

    def dies_half_way(content, stream, *args, **kwargs):
        real_save(content, stream, *args, **kwargs)
        stream.truncate(1000)  # what a kill during the write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _epoch(saver, 2.0)
    monkeypatch.undo()
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]
    read_checkpoint(tmp_path / "model.pt")


def test_an_unusable_checkpoint_folder_stops_before_the_first_epoch(ldct_train_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    workflow = make_workflow(
        TRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(ldct_train_dir),
        ckpt_dir=str(tmp_path / "a_file" / "models"), output_dir=str(tmp_path / "out"), f_checkpoint=None,
    )  # fmt: skip
    with pytest.raises(RuntimeError) as caught:
        workflow.run()
    cause = caught.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, CheckpointError) and "is not writable" in str(cause)


def test_too_little_free_space_is_found_first(
    network: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match="MB free; a checkpoint needs about"):
        _saver(network, tmp_path)
