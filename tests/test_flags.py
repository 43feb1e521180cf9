"""Boolean options mean what they say, however they arrive: JSON, Python or the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydicom.data import get_testdata_file
from scripts.checkpoints import read_checkpoint
from scripts.clinical.compare import compare_paths
from scripts.engines import usable_device
from scripts.options import OptionError, as_bool
from scripts.tools.realcheck import run_realcheck

from tests.conftest import EVALUATE_CONFIGS, REPO_ROOT, TINY_OVERRIDES, TRAIN_CONFIG, make_workflow

TINY_CLI = [
    "--f_name", "test_efficientnet", "--s_name", "swinv2_tiny_window8_256", "--side", "32",
    "--s_kwargs", "{'embed_dim': 16, 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 1, 1]}",
    "--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--max_epochs", "1",
]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a download attempt fails at once
    command = [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("True", True), ("1", True),
     ("false", False), ("False", False), ("0", False), (" TRUE ", True)],
)  # fmt: skip
def test_every_accepted_spelling(value, expected: bool) -> None:
    assert as_bool(value, "amp") is expected


@pytest.mark.parametrize("value", ["yes", "no", "maybe", "", 2, -1, 0.5, None, [True]])
def test_anything_else_is_refused_with_the_option_named(value) -> None:
    with pytest.raises(ValueError, match="amp must be true or false"):
        as_bool(value, "amp")


@pytest.mark.parametrize(("spelling", "expected"), [("false", False), ("0", False), ("True", True), ("1", True)])
def test_workflows_receive_real_booleans(ldct_train_dir: Path, tmp_path: Path, spelling: str, expected: bool) -> None:
    workflow = make_workflow(
        TRAIN_CONFIG, "train", **{**TINY_OVERRIDES, "amp": spelling, "freeze_f": spelling, "calibrate": spelling},
        dataset_dir=str(ldct_train_dir), ckpt_dir=str(tmp_path), f_checkpoint=None,
    )  # fmt: skip
    assert workflow.parser.get_parsed_content("amp_dtype") is None  # amp true autocasts on CUDA; bf16 by name here
    assert workflow.parser.get_parsed_content("train#trainer").amp is False  # a gradient scaler: fp16 on CUDA only
    assert workflow.parser.get_parsed_content("model").freeze_f is expected
    assert ("calibration_scale" in workflow.parser.get_parsed_content("validate#metrics")) is expected


def _f_backbone(path: Path) -> dict[str, torch.Tensor]:
    state, settings = read_checkpoint(path)
    prefix = "f.backbone." if settings["network"] == "tfkt" else "backbone."
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


@pytest.mark.parametrize(("freeze", "other"), [("false", "False"), ("0", "0"), ("true", "1"), ("True", "true")])
def test_training_flags_from_the_command_line(
    ldct_train_dir: Path, pretrained_bundle: Path, tmp_path: Path, freeze: str, other: str
) -> None:
    """``--freeze_f``, ``--pretrained`` and ``--amp`` as a shell passes them: strings."""
    phase1 = pretrained_bundle / "pretrain.pt"
    result = run_cli(
        "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG, "--dataset_dir", str(ldct_train_dir),
        "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--f_checkpoint", str(phase1),
        "--freeze_f", freeze, "--pretrained", "false" if other in ("False", "0") else "0", "--amp", other, *TINY_CLI,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained, initial = _f_backbone(tmp_path / "model.pt"), _f_backbone(phase1)
    unchanged = all(torch.equal(trained[key], initial[key]) for key in initial)
    assert unchanged is as_bool(freeze, "freeze_f")


def test_a_misspelt_flag_stops_with_its_name(ldct_train_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG, "--dataset_dir", str(ldct_train_dir),
        "--ckpt_dir", str(tmp_path), "--freeze_f", "maybe", "--pretrained", "false", *TINY_CLI,
    )  # fmt: skip
    assert result.returncode != 0
    assert "freeze_f must be true or false (true/false/True/False/1/0), got 'maybe'" in result.stdout + result.stderr
    assert not (tmp_path / "model.pt").exists()


def test_a_failed_bundle_run_ends_with_its_reason(ldct_train_dir: Path, tmp_path: Path) -> None:
    """MONAI's wrapper ("Failed to instantiate component ...") is not the last word: the reason inside it is."""
    missing = tmp_path / "no_such_dataset"
    result = run_cli(
        "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG, "--dataset_dir", str(missing),
        "--ckpt_dir", str(tmp_path), "--pretrained", "false", *TINY_CLI,
    )  # fmt: skip
    assert result.returncode == 1 and "Failed to instantiate component" in result.stderr
    assert result.stderr.rstrip().splitlines()[-3:] == [
        "The reason:",
        "scripts.data.DatasetError: 1 problem(s) in the dataset:",
        f"  {missing}: dataset folder does not exist (set dataset_dir)",
    ]
    offline = run_cli(  # ImageNet weights wanted, none cached, no internet
        "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG, "--dataset_dir", str(ldct_train_dir),
        "--ckpt_dir", str(tmp_path), "--f_checkpoint", "$None", "--pretrained", "true", *TINY_CLI,
    )  # fmt: skip
    reason = offline.stderr[offline.stderr.rindex("The reason:") :]
    assert reason.startswith(
        "The reason:\nRuntimeError: Pretrained ImageNet weights for 'test_efficientnet' could not be"
    )
    assert "pass its local path (f_weights=/path/to/weights.safetensors)" in reason


NO_TORCH_NOR_MONAI = (  # the command line as ``python -m scripts``, in a process where importing either fails
    "import runpy, sys; sys.modules.update(torch=None, monai=None); sys.argv[0] = 'scripts'; "
    "runpy.run_module('scripts', run_name='__main__')"
)
SCORE = ["score", "in", "--output_dir", "out"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [(["--help"], None),
     (["score", "--help"], None),
     (["bench", "--help"], None),
     ([*SCORE, "--amp", "fp8"], "amp must be false, true, bf16 or fp16 (or 0/1), got 'fp8'"),
     ([*SCORE, "--num_workers", "two"], "num_workers must be a number of processes (0 or more) or 'auto', got 'two'"),
     ([*SCORE, "--num_workers", "-1"], "num_workers must be a number of processes (0 or more) or 'auto', got -1"),
     ([*SCORE, "--compile", "fastest"],
      "compile must be true, false or a torch.compile mode (default, reduce-overhead, max-autotune, "
      "max-autotune-no-cudagraphs), got 'fastest'"),
     ([*SCORE, "--channels_last", "sometimes"], "channels_last must be true, false or auto, got 'sometimes'"),
     ([*SCORE, "--batch_size", "0"], "batch_size must be a whole number of at least 1, got 0"),
     ([*SCORE, "--plots", "maybe"], "plots must be true or false (true/false/True/False/1/0), got 'maybe'"),
     ([*SCORE, "--slice_intercept", "HU"],
      "slice_intercept must be a number (HU = stored value + it) or none, got 'HU'"),
     (["compare", "a", "b", "out", "--slice_intercept", "inf"],
      "slice_intercept must be a number (HU = stored value + it) or none, got 'inf'"),
     (["compare", "a", "b", "out", "--max_slice_mb", "lots"], "max_slice_mb must be a number above 0, got 'lots'"),
     (["compare", "a", "b", "out", "--window", "400,-1000"],
      "window must be two HU values low, high with low < high, both finite, got (400.0, -1000.0)"),
     (["compare", "a", "b", "out", "--window", "abc,400"], "window must be two HU values low, high, got ['abc', 400]"),
     (["realcheck", "--per_series", "x"], "per_series must be a whole number of at least 1, got 'x'"),
     (["export", "out", "--onnx", "maybe"], "onnx must be true or false (true/false/True/False/1/0), got 'maybe'"),
     (["bench", "--amp", "fp8"], "amp must be false, true, bf16 or fp16 (or 0/1), got 'fp8'"),
     (["bench", "--parts", "scoring,warp"],
      "unknown parts ['warp']; choose from pipeline, inference, scoring, long, training, gpu")],
)  # fmt: skip
def test_help_and_a_bad_option_need_neither_torch_nor_monai(
    tmp_path: Path, args: list[str], reason: str | None
) -> None:
    """Importing them takes seconds (7 s on a 2-core host): ``--help``, and a value an option cannot take (its reason
    alone, exit status 2, as argparse exits for a bad flag), come without that wait and before anything is written."""
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_NOR_MONAI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    if reason is None:
        assert result.returncode == 0 and "NAME" in result.stdout + result.stderr, result.stderr[-2000:]  # fire's help
    else:
        assert result.returncode == 2 and result.stderr.strip() == reason, result.stderr[-2000:]
    assert not list(tmp_path.iterdir())


NO_GPU = "no CUDA GPU is usable here; leave device unset or use cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_device_this_machine_lacks_is_refused_in_one_line_before_any_output(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """torch would fail only at the first tensor sent there, in words about the checkpoint not fitting the network."""
    assert usable_device(None) == usable_device("") == torch.device("cpu") == usable_device("cpu")
    for device, reason in [("cuda", f"device 'cuda': {NO_GPU}"), ("cuda:1", f"device 'cuda:1': {NO_GPU}"),
                           ("gpu", "device must be cpu, cuda or cuda:N, got 'gpu'")]:  # fmt: skip
        with pytest.raises(OptionError) as refused:
            usable_device(device)
        assert str(refused.value) == reason
    output = tmp_path / "out"
    with pytest.raises(OptionError, match=f"device 'cuda': {NO_GPU}"):
        compare_paths(str(tmp_path), str(tmp_path), output, tiny_checkpoint, device="cuda")
    with pytest.raises(OptionError, match=f"device 'cuda': {NO_GPU}"):
        run_realcheck(tiny_checkpoint, output, device="cuda")
    slices = tmp_path / "slices"
    slices.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), slices / "CT_small.dcm")
    result = run_cli("scripts", "score", str(slices), "--output_dir", str(output), "--ckpt", str(tiny_checkpoint),
                     "--device", "cuda")  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip() == f"device 'cuda': {NO_GPU}", result.stderr[-2000:]
    assert not output.exists()


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [("--layout", "nifti", "layout must be one of ldct, kadid, scored_ct, got 'nifti'"),
     ("--split", "half", "split must be 'A' or a validation fraction in (0, 1), got 'half'")],
)  # fmt: skip
def test_check_data_refuses_a_bad_option_in_one_line(
    ldct_train_dir: Path, option: str, value: str, reason: str
) -> None:
    result = run_cli("scripts", "check_data", str(ldct_train_dir), option, value)
    assert result.returncode == 2 and result.stderr.strip() == reason, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("window", "reason"),
    [("400,-1000", "with low < high, both finite, got (400.0, -1000.0)"),
     ("0,0", "with low < high, both finite, got (0.0, 0.0)"),
     ("nan,400", "with low < high, both finite, got (nan, 400.0)"),
     ("-1000,400,100", "got (-1000.0, 400.0, 100.0)"),
     ("-1000", "window must be two HU values low,high (e.g. -1000,400) or one pair per channel, got -1000")],
)  # fmt: skip
def test_a_bad_window_is_refused_in_one_line(tiny_checkpoint: Path, tmp_path: Path, window: str, reason: str) -> None:
    for command in (["score", str(tmp_path)], ["compare", str(tmp_path), str(tmp_path)]):
        output = tmp_path / "out"
        result = run_cli(
            "scripts", *command, "--output_dir", str(output), "--ckpt", str(tiny_checkpoint), f"--window={window}"
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert result.stderr.strip().endswith(reason) and not output.exists()


def test_a_window_other_than_the_models_is_scored_with_a_warning(tiny_checkpoint: Path, tmp_path: Path) -> None:
    slices = tmp_path / "slices"
    slices.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), slices / "CT_small.dcm")
    scored = {}
    for window in ("-1000,400", "-160,240"):
        output = tmp_path / window
        result = run_cli(
            "scripts",
            "score",
            str(slices),
            "--output_dir",
            str(output),
            "--ckpt",
            str(tiny_checkpoint),
            f"--window={window}",
            "--plots",
            "false",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        scored[window] = (
            "warning: --window" in result.stderr,
            json.loads((output / "summary.json").read_text())["window"],
        )
    assert scored == {
        "-1000,400": (False, [[-1000.0, 400.0]]),  # the model's own (none recorded: the default)
        "-160,240": (True, [[-160.0, 240.0]]),
    }


@pytest.mark.parametrize(("spelling", "expected"), [("false", False), ("True", True)])
def test_logistic_fit_from_the_command_line(
    trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path, spelling: str, expected: bool
) -> None:
    result = run_cli(
        "monai.bundle", "run", "evaluating", "--config_file", json.dumps(EVALUATE_CONFIGS),
        "--ckpt_dir", str(trained_bundle), "--dataset_dir", str(ldct_test_dir), "--output_dir", str(tmp_path),
        "--logistic_fit", spelling, *TINY_CLI,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("plcc_logistic" in json.loads((tmp_path / "metrics.json").read_text())) is expected


def test_export_flags_from_the_command_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    first = run_cli(
        "scripts", "export", "--output_dir", str(dist), "--ckpt", str(tiny_checkpoint), "--torchscript", "false"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (dist / "models" / "model.pt").is_file() and not (dist / "models" / "model.ts").exists()
    refused = run_cli(
        "scripts", "export", "--output_dir", str(dist), "--ckpt", str(tiny_checkpoint), "--overwrite", "0"
    )
    assert refused.returncode == 1 and "already exists" in refused.stderr
    again = run_cli(
        "scripts", "export", "--output_dir", str(dist), "--ckpt", str(tiny_checkpoint),
        "--overwrite", "True", "--torchscript", "0",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
