"""The bundle as the Model Zoo checks it: metadata, network input/output, layout and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import verify_metadata, verify_net_in_out
from scripts.tools.bench import gpu_lines, run_benchmark
from scripts.tools.bench_pipeline import INPUT_KINDS, STAGES

from tests.conftest import CONFIG_DIR, METADATA, REPO_ROOT, TINY_NETWORKS, TRAIN_CONFIG

SCHEMA = str(REPO_ROOT / "bundle" / "docs" / "metadata_schema.json")


def test_metadata_passes_verify_metadata() -> None:
    verify_metadata(meta_file=METADATA, filepath=SCHEMA)  # raises on any violation
    metadata = json.loads(Path(METADATA).read_text())
    assert metadata["network_data_format"]["outputs"]["pred"]["value_range"] == [0, 4]
    assert metadata["version"] in metadata["changelog"]


def test_network_passes_verify_net_in_out() -> None:
    verify_net_in_out(
        net_id="network_def",
        meta_file=METADATA,
        config_file=TRAIN_CONFIG,
        device="cpu",
        **{**TINY_NETWORKS, "pretrained": False, "f_checkpoint": None},
    )


def test_command_line_verify_metadata() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", METADATA, "--filepath", SCHEMA],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_every_user_knob_is_a_top_level_id() -> None:
    knobs = {
        "dataset_dir",
        "output_dir",
        "device",
        "image_size",
        "batch_size",
        "max_epochs",
        "learning_rate",
        "val_interval",
        "pretrained",
        "network",
        "f_name",
        "amp",
        "split",
        "seed",
        "num_workers",
    }
    train = json.loads((CONFIG_DIR / "train.json").read_text())
    assert knobs | {"s_name", "freeze_f"} <= set(train)
    pretrain = json.loads((CONFIG_DIR / "pretrain.json").read_text())  # an overlay: train.json's ids and its own
    assert not any(isinstance(value, str) and "%bundle/" in value for value in pretrain.values())
    assert {"dataset_dir", "split", "max_epochs", "network", "ckpt_name", "pretraining"} <= set(pretrain)


def test_layout_and_ignored_weights() -> None:
    for path in [
        "bundle/configs/logging.conf",
        "bundle/docs/README.md",
        "bundle/docs/data_license.txt",
        "bundle/models/.gitkeep",
        "LICENSE",
        "README.md",
        ".ci/run",
    ]:
        assert (REPO_ROOT / path).is_file(), path
    ignored = subprocess.run(
        ["git", "check-ignore", "bundle/models/model.pt", "bundle/models/pretrain.pt"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == ["bundle/models/model.pt", "bundle/models/pretrain.pt"]


def test_benchmark_prints_the_stage_table_the_ratios_and_the_fixed_costs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts", "bench", "--profiles", "tiny", "--batches", "2", "--iterations", "2",
         "--rounds", "1", "--series_slices", "6", "--long_slices", "12", "--long_rounds", "1", "--pipeline_slices", "8",
         "--pipeline_workers", "0,2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    ratios = [line for line in lines if "ratio" in line and not line.startswith("[")]  # not the progress lines
    assert [line.split()[0] for line in ratios] == ["inference", "DICOM", "DICOM", "training"]
    assert "a 6-slice study" in ratios[1] and "a 12-slice series" in ratios[2]
    assert re.search(r"s beyond the network: indexing \d+\.\d\d s, first batch \d+\.\d\d s", ratios[2])
    assert re.search(r"; \d+\.\d\d s with a network that costs nothing", ratios[2])
    table = {line.split()[0]: line.split()[1:] for line in lines if line.strip().split(" ")[0] in INPUT_KINDS}
    assert sorted(table) == sorted(INPUT_KINDS)
    for values in table.values():  # the stages, then "slices/s (start s)" for auto, 0 and 2 reader processes
        rates = [float(value) for value in values[len(STAGES) :: 2]]
        starts = [float(value.strip("()s")) for value in values[len(STAGES) + 1 :: 2]]
        assert len(values) == len(STAGES) + 6 and min(rates) > 0 and min(starts) >= 0
    stripped = [line.strip() for line in lines]
    assert any(line.startswith("a 6-slice study, model loaded:") and "target <= 0.3 s" in line for line in stripped)
    assert any(line.startswith("a 6-slice score run:") and "loading the model" in line for line in stripped)
    free = [line for line in stripped if line.startswith("the same study with a network that costs nothing:")]
    assert len(free) == 1 and float(free[0].split(": ")[1].split(" s")[0]) > 0


def test_the_benchmark_runs_only_the_parts_it_is_asked_for(tmp_path: Path) -> None:
    """``--parts`` picks what a lent GPU's few minutes are spent on; the parts left out are null in the output."""
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts", "bench", "--profiles", "tiny", "--parts", "scoring,training",
         "--iterations", "2", "--rounds", "1", "--series_slices", "6", "--output", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    ratios = [line for line in lines if "ratio" in line and not line.startswith("[")]
    assert [line.split()[0] for line in ratios] == ["DICOM", "training"]
    assert not [line for line in lines if line.split(" ")[0] in INPUT_KINDS]  # no stage table
    assert any(line.startswith("a 6-slice study, model loaded:") for line in lines)
    tiny = json.loads(output.read_text())["tiny"]
    assert [part for part in ("pipeline", "inference", "scoring", "long_run", "training") if tiny[part]] == [
        "scoring",
        "training",
    ]
    assert tiny["parameters"] > 0 and tiny["scoring"]["ratio"] > 0 and tiny["training"]["ratio"] > 0
    with pytest.raises(ValueError, match=r"unknown parts \['warp'\]; choose from pipeline, inference"):
        run_benchmark("tiny", parts="scoring,warp")
    with pytest.raises(ValueError, match=r"pipeline_workers must be a number of reader processes or a list"):
        run_benchmark("tiny", pipeline_workers="2,auto")  # counts to compare, not the configs' "auto"


def test_the_benchmarks_device_figures_time_every_variant() -> None:
    """The GPU block's variants (precision, memory format, cuDNN autotuner, torch.compile) run here on the CPU, so
    that a lent GPU's few minutes are not lost to an error in them; peak memory and batch limits are GPU-only."""
    import torch
    from scripts.networks import build_network
    from scripts.tools.bench_pipeline import GPU_VARIANTS, gpu_figures

    network = build_network(**TINY_NETWORKS)
    figures = gpu_figures(network, torch.device("cpu"), image_size=64, batch_size=2, compile=True)
    names = [name for name, *_ in GPU_VARIANTS] + ["bf16_channels_last_compiled"]
    assert sorted(figures) == sorted(f"{name}_slices_per_s" for name in names)
    assert min(figures.values()) > 0 and not torch.backends.cudnn.benchmark  # the autotuner's setting is restored
    lines = gpu_lines(figures, batch_size=2)  # the report's block, as a GPU run prints it
    assert [line.split()[0] for line in lines[1:]] == names
