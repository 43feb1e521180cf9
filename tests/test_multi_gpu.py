"""The multi-GPU overlay, run as users run it (torchrun), with two CPU processes over gloo."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.calibration import fit_line
from scripts.checkpoints import read_checkpoint

from tests.conftest import CONFIG_DIR, EVALUATE_CONFIGS, REPO_ROOT, TINY_NETWORKS, TINY_OVERRIDES, make_workflow


def test_two_process_training_writes_one_plain_checkpoint(ldct_train_dir: Path, tmp_path: Path) -> None:
    configs = [str(CONFIG_DIR / "train.json"), str(CONFIG_DIR / "multi_gpu_train.json")]
    tiny = [
        f"--{key} {value!r}" if isinstance(value, dict) else f"--{key} {value}" for key, value in TINY_NETWORKS.items()
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own: a fixed one may still be held by an earlier run
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(configs),
        "--dataset_dir",
        str(ldct_train_dir),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_epochs",
        "2",
        "--split",
        "0.25",  # 8 validation slices, 4 on each process
        "--pretrained",
        "False",
        "--image_size",
        "64",
        "--num_workers",
        "0",
    ]
    for option in tiny:
        key, value = option.split(" ", 1)
        command += [key, value]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state, settings = read_checkpoint(tmp_path / "models" / "model.pt")
    assert not any(key.startswith("module.") for key in state)  # saved unwrapped from DistributedDataParallel
    assert settings["f_name"] == "test_efficientnet"
    written = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert written == ["model.json", "model.pt", "model_last.pt"]  # by rank 0 only
    last = torch.load(tmp_path / "models" / "model_last.pt", weights_only=True)
    assert last["network"].keys() == state.keys()
    assert last["trainer"]["iteration"] == 2 * last["trainer"]["epoch_length"]
    events = sorted((tmp_path / "out").glob("events.out.tfevents.*"))
    assert len(events) == 2  # rank 0's trainer and evaluator: no empty files from rank 1
    # the score calibration was fitted on both processes' validation slices: on all 8 it needs no further line
    evaluation = make_workflow(
        EVALUATE_CONFIGS, "train", **TINY_OVERRIDES, dataset_dir=str(ldct_train_dir), ckpt_dir=str(tmp_path / "models"),
        eval_datalist=str(tmp_path / "out" / "datalist.json"), output_dir=str(tmp_path / "eval"),
    )  # fmt: skip
    evaluation.run()
    with open(tmp_path / "eval" / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 8 and float(state["calibration.scale"]) != 1.0
    line = fit_line([float(row["prediction"]) for row in rows], [float(row["label"]) for row in rows])
    assert line == pytest.approx((1.0, 0.0), abs=0.02)  # float32 outputs that vary by 1e-3: not exact
