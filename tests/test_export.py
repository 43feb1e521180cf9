"""The exported Model Zoo folder: self-contained, verified metadata, inference from inside it, TorchScript."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.data import load_net_with_metadata
from pydicom.data import get_testdata_file
from scripts.tools.export import TORCHSCRIPT_ATOL, ExportError, _image_classes, export_bundle

from tests.conftest import CONFIG_DIR, REPO_ROOT


def _run(command: list[str], cwd: Path, python_path: Path | None = None) -> subprocess.CompletedProcess:
    # the exported folder must work on its own: its own `scripts` package, found from the working directory
    # (or from ``python_path``, as where a bundle's folder is on the path), not the repository's
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if python_path is not None:
        environment["PYTHONPATH"] = str(python_path)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    metrics = tmp_path_factory.mktemp("metrics") / "metrics.json"
    metrics.write_text(json.dumps({"plcc": 0.9, "srocc": 0.8, "krocc": 0.7, "aggregate": 2.4, "n": 5}))
    dist = tmp_path_factory.mktemp("export") / "ct_iqa_tfkt"
    command = [sys.executable, "-m", "scripts", "export", "--output_dir", str(dist), "--ckpt", str(tiny_checkpoint)]
    result = _run([*command, "--metrics", str(metrics), "--weights_url", "https://example.org/w"], REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "models/model.ts matches the eager network" in result.stdout
    assert "not written" not in result.stdout and "left at 0.0" not in result.stdout  # nothing missing: no notes
    return dist


def test_export_is_a_self_contained_model_zoo_folder(exported: Path, tiny_checkpoint: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "LICENSE",
        "configs",
        "docs",
        "large_files.yml",
        "models",
        "scripts",
    ]
    assert (exported / "models" / "model.pt").read_bytes() == tiny_checkpoint.read_bytes()
    assert {p.name for p in (exported / "docs").iterdir()} >= {"README.md", "data_license.txt"}
    assert (exported / "scripts" / "ct_inputs.py").is_file() and not list(exported.rglob("__pycache__"))
    assert sorted(p.name for p in (exported / "configs").iterdir()) == sorted(p.name for p in CONFIG_DIR.iterdir())
    for config in (exported / "configs").glob("*.json"):
        assert "bundle/" not in config.read_text(), config.name  # no path into the repository is left
    large_files = (exported / "large_files.yml").read_text()
    assert 'path: "models/model.pt"' in large_files and 'url: "https://example.org/w/model.pt"' in large_files
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert (
        meta["image_classes"]
        == "one-channel CT slice, windowed to [-1000, 400] HU and scaled to [0, 1], resized to 64x64"
    )
    assert meta["eval_metrics"] == {"plcc": 0.9, "srocc": 0.8, "krocc": 0.7, "aggregate": 2.4}
    verify_metadata(
        meta_file=str(exported / "configs" / "metadata.json"),
        filepath=str(exported / "docs" / "metadata_schema.json"),
    )


@pytest.mark.parametrize(
    ("settings", "described"),
    [
        ({"in_channels": 1, "image_size": None, "patch_size": 64, "window": [-1000, 400]},
         "one-channel CT slice, windowed to [-1000, 400] HU and scaled to [0, 1], at its own size, scored as the mean "
         "over a grid of 64x64 crops on the body"),
        ({"in_channels": 3, "image_size": 512, "window": [[-1000, 400], [-160, 240], [-1400, 200]]},
         "3-channel CT slice, one channel per HU window ([-1000, 400], [-160, 240], [-1400, 200]), each scaled to "
         "[0, 1], resized to 512x512"),
        ({"in_channels": 3, "image_size": 256},  # no window recorded: the default one
         "3-channel CT slice, windowed to [-1000, 400] HU and scaled to [0, 1], the same in each channel, resized "
         "to 256x256"),
    ],
)  # fmt: skip
def test_the_metadata_describes_what_the_model_reads(settings: dict, described: str) -> None:
    """``image_classes`` follows the checkpoint: a crop model, a multi-window one, one with an RGB stem."""
    assert _image_classes(settings) == described


def test_inference_runs_from_inside_the_export(exported: Path, tmp_path: Path) -> None:
    slices = tmp_path / "slices"
    slices.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), slices / "CT_small.dcm")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    result = _run([*command, "--dataset_dir", str(slices), "--output_dir", str(tmp_path / "out")], exported)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["file"], row["slice"]) for row in rows] == [("CT_small.dcm", "0")]
    # pretraining is an overlay on train.json, merged the same way from inside the export
    parse = "from monai.bundle import ConfigParser; p = ConfigParser(); "
    parse += "p.read_config(['configs/train.json', 'configs/pretrain.json']); p.parse(); print(p.get('network'))"
    result = _run([sys.executable, "-c", parse], exported)
    assert result.returncode == 0 and result.stdout.strip() == "f_only", result.stderr[-3000:]


def test_torchscript_embeds_metadata_and_matches_eager(exported: Path) -> None:
    scripted, meta, extra = load_net_with_metadata(
        str(exported / "models" / "model.ts"), map_location="cpu", more_extra_files=("inference.json",)
    )
    assert meta["version"] == json.loads((exported / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "scripts.networks.build_network"
    parser = ConfigParser()  # the exported config's ids hold the trained network's settings
    parser.read_config(str(exported / "configs" / "inference.json"))
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(exported / "models" / "model.pt", weights_only=True))  # a plain state dict
    eager.eval()
    batch = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(scripted(batch), eager(batch), atol=TORCHSCRIPT_ATOL, rtol=0.0)


def test_export_refuses_to_overwrite_and_needs_a_checkpoint(
    exported: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="already exists: choose another --output_dir or pass --overwrite"):
        export_bundle(exported, exported / "models" / "model.pt")
    with pytest.raises(ExportError, match="missing.pt not found: train one first, or give --ckpt FILE"):
        export_bundle(tmp_path / "dist", tmp_path / "missing.pt")
    with pytest.raises(ExportError, match=r"--metrics \S+metrics.json not found: evaluation writes metrics.json"):
        export_bundle(tmp_path / "dist", tiny_checkpoint, tmp_path / "metrics.json")
    (tmp_path / "partial.json").write_text(json.dumps({"plcc": 0.9, "srocc": "n/a"}))
    with pytest.raises(ExportError, match="partial.json has no number for srocc, krocc, aggregate: give an evaluation"):
        export_bundle(tmp_path / "dist", tiny_checkpoint, tmp_path / "partial.json")
    assert not (tmp_path / "dist").exists() and [path.name for path in tmp_path.iterdir()] == ["partial.json"]


@pytest.mark.parametrize("workflow_type", ["train", "inference"])
def test_monai_bundle_load_returns_the_trained_weights(
    exported: Path, tiny_checkpoint: Path, tmp_path: Path, workflow_type: str
) -> None:
    """``monai.bundle.load`` with its default arguments and with ``workflow_type="inference"``, offline, from another
    working directory, with the export's own ``scripts``: every tensor of the network it returns equals the trained
    one (it read 0 of 175 when model.pt held {network, settings}; the inference workflow failed to build without its
    dataset folder)."""
    script = (
        "import sys, torch, monai.bundle\n"
        "net = monai.bundle.load(name=sys.argv[1], bundle_dir=sys.argv[2], source='github',\n"
        "                        workflow_type=sys.argv[4])\n"
        "torch.save(net.state_dict(), sys.argv[3])\n"
    )
    arguments = [exported.name, str(exported.parent), str(tmp_path / "loaded.pt"), workflow_type]
    result = _run([sys.executable, "-c", script, *arguments], tmp_path, python_path=exported)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    trained = torch.load(tiny_checkpoint, weights_only=True)
    assert loaded.keys() == trained.keys() and len(trained) > 100
    assert all(torch.equal(loaded[key], trained[key]) for key in trained)


def test_without_a_weights_url_no_large_files_yml_and_it_says_why(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An empty url would fail the Zoo's download step: without --weights_url the folder keeps its weights, has no
    large_files.yml, and the command says how to make the pull-request form."""
    command = [sys.executable, "-m", "scripts", "export", "--output_dir", str(tmp_path / "d"), "--ckpt"]
    result = _run([*command, str(tiny_checkpoint), "--torchscript", "false"], REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "large_files.yml not written: no --weights_url" in result.stdout and "--weights_url URL" in result.stdout
    assert "eval_metrics left at 0.0: no --metrics" in result.stdout
    assert not (tmp_path / "d" / "large_files.yml").exists() and (tmp_path / "d" / "models" / "model.pt").is_file()
