"""Which model `score` uses: the bundle's, else the demo's (named), else one line saying how to get one; an
unusable checkpoint (pickled code, a folder, not a checkpoint) is one line too; legacy-format files load."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import scripts
from scripts.__main__ import score
from scripts.ct_io import write_dicom_slice

from tests.conftest import copy_checkpoint


@pytest.fixture
def no_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A bundle folder and a demo output folder, both without a model. Only where ``default_checkpoint`` looks: the
    scoring module, which binds ``bundle_root`` (for the configs) when it is first imported, is imported first."""
    importlib.import_module("scripts.clinical.score")

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
    copy_checkpoint(tiny_checkpoint, demo / "models" / "model.pt")
    write_dicom_slice(tmp_path / "in" / "a.dcm", np.full((64, 64), 40.0), "1.2.3")
    score(str(tmp_path / "in"), output_dir=str(tmp_path / "out"), num_workers=0)
    printed = capsys.readouterr().out
    assert f"using the demo's model (trained on synthetic CT by `python -m scripts demo`): {demo}" in printed
    assert (tmp_path / "out" / "scores.csv").is_file()
    # a model of the bundle's own comes first
    copy_checkpoint(tiny_checkpoint, bundle / "models" / "model.pt")
    score(str(tmp_path / "in"), output_dir=str(tmp_path / "out2"), num_workers=0)
    assert "using the bundle's model" in capsys.readouterr().out


def test_a_config_without_its_model_names_the_demos(no_models, tiny_checkpoint: Path) -> None:
    """Evaluation and inference configs read ``models/model.pt``: where it is missing, the error says how to get one,
    and names the demo's model with the overlay to use once the demo has trained it."""
    import torch
    from scripts.checkpoints import load_trained_weights

    _, demo = no_models
    network = torch.nn.Linear(1, 1)
    with pytest.raises(FileNotFoundError, match="does not exist: give a model.pt written by training, or run"):
        load_trained_weights(network, demo.parent / "bundle" / "models" / "model.pt")
    copy_checkpoint(tiny_checkpoint, demo / "models" / "model.pt")
    with pytest.raises(FileNotFoundError) as missing:
        load_trained_weights(network, demo.parent / "bundle" / "models" / "model.pt")
    assert f"e.g. the demo's, {demo / 'models' / 'model.pt'}, with the overlay it was trained with" in str(
        missing.value
    )
    assert "add configs/demo.json to --config_file" in str(missing.value)
    with pytest.raises(FileNotFoundError, match="run `python -m scripts demo`"):  # fine-tuning starts elsewhere
        load_trained_weights(network, demo.parent / "absent.pt", role="init_checkpoint")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.fixture
def bad_checkpoints(tiny_checkpoint: Path, tmp_path: Path) -> dict[str, Path]:
    """A pickled-code file, a folder, a JSON file and a legacy-format copy of a good checkpoint."""
    import torch
    from scripts.checkpoints import read_checkpoint

    torch.save({"network": {}, "settings": {}, "payload": _RunsCode()}, tmp_path / "code.pt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "labels.json").write_text('{"0000.tif": 2.0}')
    state, settings = read_checkpoint(tiny_checkpoint)
    legacy = tmp_path / "legacy.pt"
    torch.save({"network": state, "settings": settings}, legacy, _use_new_zipfile_serialization=False)
    return {
        "code": tmp_path / "code.pt",
        "folder": tmp_path / "folder",
        "json": tmp_path / "labels.json",
        "legacy": legacy,
    }


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("code", "refused for safety: it holds pickled code"),
        ("folder", "is a folder, not a file: pass the model.pt inside it"),
        ("json", "not a readable PyTorch checkpoint (not a torch.save file)"),
    ],
)
def test_unusable_checkpoints_are_one_line(bad_checkpoints, tmp_path: Path, capsys, kind: str, message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        score(str(tmp_path), output_dir=str(tmp_path / "out"), ckpt=str(bad_checkpoints[kind]))
    assert stopped.value.code == 1
    captured = capsys.readouterr()
    assert "this ran while loading" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(bad_checkpoints[kind]) in lines[0]


def test_export_of_pickled_code_is_one_line(bad_checkpoints, tmp_path: Path, capsys) -> None:
    from scripts.__main__ import export

    with pytest.raises(SystemExit) as stopped:
        export(str(tmp_path / "dist"), ckpt=str(bad_checkpoints["code"]))
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refused for safety" in lines[0]


def test_legacy_format_checkpoints_load_and_score_the_same(bad_checkpoints, tiny_checkpoint: Path, tmp_path) -> None:
    """An earlier-form file (``{"network", "settings"}``, no model.json beside it) rebuilds its own network from
    the settings inside it, not the config's default one, and scores as the current form does."""
    from scripts.checkpoints import read_checkpoint
    from scripts.clinical.score import SliceScorer
    from scripts.ct_inputs import index_inputs

    assert read_checkpoint(bad_checkpoints["legacy"])[1] == read_checkpoint(tiny_checkpoint)[1]
    assert not bad_checkpoints["legacy"].with_suffix(".json").exists()
    rng = np.random.default_rng(3)
    for index in range(3):
        write_dicom_slice(tmp_path / "ct" / f"{index}.dcm", rng.normal(0, 300, (64, 64)), "1.2.3.9", position=index)
    items = index_inputs([tmp_path / "ct"])[0]
    current = SliceScorer.from_checkpoint(tiny_checkpoint, "cpu")(items)
    legacy = SliceScorer.from_checkpoint(bad_checkpoints["legacy"], "cpu")(items)
    assert [score for score, _, _ in legacy] == [score for score, _, _ in current]
    assert all(score is not None for score, _, _ in current) and len({score for score, _, _ in current}) == 3
