"""``score`` without ``--ckpt``: the bundle's model, else the demo's (named), else one line saying how to get one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import scripts
from scripts.__main__ import score
from scripts.ct_io import write_dicom_slice


@pytest.fixture
def no_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A bundle folder and a demo output folder, both without a model."""
    bundle, demo = tmp_path / "bundle", tmp_path / "demo_outputs"
    monkeypatch.setattr(scripts, "bundle_root", lambda: bundle)
    monkeypatch.setattr(scripts, "demo_output", lambda: demo)
    return bundle, demo


def test_no_model_anywhere_is_one_line_saying_how_to_get_one(no_models, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        score(str(tmp_path), output_dir=str(tmp_path / "out"))
    assert stopped.value.code == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "no model found" in message and "python -m scripts demo" in message and "--ckpt" in message


def test_a_missing_ckpt_is_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        score(str(tmp_path), output_dir=str(tmp_path / "out"), ckpt=str(tmp_path / "nowhere.pt"))
    assert stopped.value.code == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_without_ckpt_the_demo_model_is_used_and_named(
    no_models, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    bundle, demo = no_models
    (demo / "models").mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, demo / "models" / "model.pt")
    write_dicom_slice(tmp_path / "in" / "a.dcm", np.full((64, 64), 40.0), "1.2.3")
    score(str(tmp_path / "in"), output_dir=str(tmp_path / "out"), num_workers=0)
    printed = capsys.readouterr().out
    assert f"using the demo's model (trained on synthetic CT by `python -m scripts demo`): {demo}" in printed
    assert (tmp_path / "out" / "scores.csv").is_file()
    # a model of the bundle's own comes first
    (bundle / "models").mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, bundle / "models" / "model.pt")
    score(str(tmp_path / "in"), output_dir=str(tmp_path / "out2"), num_workers=0)
    assert "using the bundle's model" in capsys.readouterr().out
