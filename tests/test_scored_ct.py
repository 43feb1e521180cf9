"""Your own reader study: the scored-CT layout (DICOM and NIfTI with a labels file), windowing as a config
transform (one window or one per channel), fine-tuning from a trained model, and per-patient evaluation."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.transforms import ScaleIntensityRange
from scipy import stats
from scripts.checkpoints import read_settings
from scripts.ct_inputs import LoadCTSliced
from scripts.data import DatasetError, scored_ct_items, training_datalists
from scripts.transforms import WindowHUd

from tests.conftest import (
    CONFIG_DIR,
    EVALUATE_CONFIGS,
    INFERENCE_CONFIG,
    NOT_DICOM,
    REPO_ROOT,
    TINY_OVERRIDES,
    TRAIN_CONFIG,
    decimal_comma,
    inference_workflow,
    make_workflow,
)

MULTI_WINDOW = str(CONFIG_DIR / "multi_window.json")
SCORED_CT = {"layout": "scored_ct", "dataset_dir": None, "f_checkpoint": None, "split": 0.25}


def _train(labels: Path, ckpt_dir: Path, configs: str | list[str] = TRAIN_CONFIG, **overrides: object) -> list[float]:
    """Train on the scored-CT set; the validation aggregate of each epoch."""
    settings = {**TINY_OVERRIDES, **SCORED_CT, "labels": str(labels), "max_epochs": 2, **overrides}
    workflow = make_workflow(configs, "train", **settings, ckpt_dir=str(ckpt_dir), output_dir=str(ckpt_dir / "out"))
    history: list[float] = []
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda engine: history.append(engine.state.metrics["aggregate"])
    )
    workflow.run()
    workflow.finalize()
    return history


def _bad_labels(folder: Path, rows: list[str]) -> Path:
    labels = folder / "bad.csv"
    labels.write_text("path,score,slice,patient,sd\n" + "\n".join(rows) + "\n")
    return labels


def test_csv_and_json_give_the_same_slices(scored_ct_labels: Path) -> None:
    from_csv = scored_ct_items(scored_ct_labels)
    from_json = scored_ct_items(scored_ct_labels.with_suffix(".json"))
    assert from_csv == from_json and len(from_csv) == 72
    first = from_csv[:6]  # a DICOM series folder: its files in position order, one slice each
    assert [Path(item["image"]).name for item in first] == [f"{k:03d}.dcm" for k in range(6)]
    assert {item["frame"] for item in first} == {0} and {item["patient"] for item in first} == {"p00"}
    assert [(Path(item["image"]).name, item["frame"]) for item in from_csv[6:12]] == [
        ("p01.nii.gz", k) for k in range(6)
    ]
    assert all(0.0 <= item["label"] <= 4.0 and item["sd"] > 0 for item in from_csv)


def test_a_labels_file_saved_by_excel_reads_as_the_original(scored_ct_labels: Path, tmp_path: Path) -> None:
    """Excel where the decimal mark is a comma: a byte-order mark, semicolons, "1,4", a capitalised header, CRLF,
    and the empty rows of cells once used."""
    rows = [line.split(",") for line in scored_ct_labels.read_text().splitlines()]
    header = ";".join(name.title() for name in rows[0])
    lines = [
        header,
        *(";".join([str(scored_ct_labels.parent / row[0]), *map(decimal_comma, row[1:])]) for row in rows[1:]),
    ]
    assert header.startswith("Path;Slice;Score") and re.search(r";\d,\d;", lines[1])
    excel = tmp_path / "labels.csv"
    excel.write_text("\ufeff" + "\r\n".join([*lines, ";;;;", ";;;;"]) + "\r\n", encoding="utf-8")
    assert scored_ct_items(excel) == scored_ct_items(scored_ct_labels)


def test_a_row_without_slice_scores_every_slice_and_a_uid_picks_one(scored_ct_labels: Path, tmp_path: Path) -> None:
    root = scored_ct_labels.parent
    uid = pydicom.dcmread(root / "p00" / "002.dcm", stop_before_pixels=True).SOPInstanceUID
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,score,slice\n{root / 'p01.nii.gz'},2.5,\n{root / 'p00'},1.5,{uid}\n")
    items = scored_ct_items(labels)
    assert [(Path(item["image"]).name, item["frame"], item["label"]) for item in items] == [
        *[("p01.nii.gz", k, 2.5) for k in range(6)],
        ("002.dcm", 0, 1.5),
    ]
    assert items[0]["patient"] == str(root / "p01.nii.gz")  # no patient column: the path is the patient


def test_every_bad_row_is_listed_with_its_reason(scored_ct_labels: Path, tmp_path: Path) -> None:
    root = scored_ct_labels.parent
    (tmp_path / "broken.dcm").write_bytes(b"not DICOM at all" * 40)
    exported = Path(shutil.copytree(root / "p00", tmp_path / "p00_exported"))  # with what tools leave beside slices
    for name in (".DS_Store", "._001.dcm", "Thumbs.db", "DICOMDIR"):
        (exported / name).write_bytes(b"\x00\x05\x16\x07" * 8)
    labels = _bad_labels(
        tmp_path,
        [
            f"{root / 'p00'},2,0,a,",  # good
            f"{root / 'p00'},3,0,a,",  # the same slice again
            f"{root / 'p01.nii.gz'},9,1,b,",
            f"{root / 'p01.nii.gz'},high,1,b,",
            f"{root / 'p01.nii.gz'},2,7,b,",
            f"{root / 'p00'},2,1.2.3.4.5,a,",
            f"{root / 'absent.nii.gz'},2,0,c,",
            f"{root / 'p00'},2,1,a,-1",
            "broken.dcm,2,0,d,",
            ",2,0,e,",
            f"{root / 'p01.nii.gz'},2,2.0,b,",  # good: a whole number as a spreadsheet writes it
            f"{root / 'p01.nii.gz'},2,-1,b,",
            f"{root / 'p01.nii.gz'},2,first,b,",
            f"{exported},2,3,f,",  # good: the files left beside the slices are passed over
        ],
    )
    with pytest.raises(DatasetError) as caught:
        scored_ct_items(labels)
    problems = dict(caught.value.problems)
    assert problems == {
        f"{labels} [line 3]": f"000.dcm slice 0 is also scored at {labels} [line 2]",
        f"{labels} [line 4]": "score 9.0 is outside [0, 4]",
        f"{labels} [line 5]": "score 'high' is not a number",
        f"{labels} [line 6]": "slice 7 is outside the 6 slices of " + str(root / "p01.nii.gz"),
        f"{labels} [line 7]": "no slice with SOPInstanceUID 1.2.3.4.5",
        f"{labels} [line 8]": f"{root / 'absent.nii.gz'} does not exist",
        f"{labels} [line 9]": "sd -1.0 is not a spread (a finite number >= 0)",
        f"{labels} [line 10]": f"{tmp_path / 'broken.dcm'}: {NOT_DICOM}",
        f"{labels} [line 11]": "no path",
        f"{labels} [line 13]": "slice -1 is not a slice index (0 for the first slice, 1, 2, ...)",
        f"{labels} [line 14]": "slice 'first' is not a slice index (0, 1, 2, ...): a volume's slices have no UIDs",
    }
    result = subprocess.run(
        [sys.executable, "-m", "scripts", "check_data", "--layout", "scored_ct", "--labels", str(labels)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "11 problem(s) in the dataset" in result.stderr
    assert "score 9.0 is outside [0, 4]" in result.stderr and "[line 11]: no path" in result.stderr
    assert "a labels file" in str(pytest.raises(DatasetError, training_datalists, layout="scored_ct").value)


def test_splits_keep_each_patient_on_one_side(scored_ct_labels: Path, tmp_path: Path) -> None:
    lists = training_datalists(layout="scored_ct", labels=scored_ct_labels, split=0.25, seed=3, output_dir=tmp_path)
    train, val = ({item["patient"] for item in lists[side]} for side in ("training", "validation"))
    assert len(val) == 3 and len(train) == 9 and not train & val
    recorded = json.loads((tmp_path / "datalist.json").read_text())
    assert recorded["dataset_dir"] == str(scored_ct_labels.parent.resolve())
    assert recorded["validation"][0]["image"].startswith(tuple(sorted(val)))  # relative to the labels' folder


def test_windowing_is_a_monai_transform_in_every_config(scored_ct_labels: Path, tmp_path: Path) -> None:
    """Training and evaluation window each slice as it is cached (``WindowHUd``); inference and ``score`` window the
    batch on the network's device (``BatchPreprocess`` in ``prepare_batch``): the same ``window`` id either way."""
    parser = ConfigParser()
    parser.read_config([TRAIN_CONFIG])
    steps = parser.get_parsed_content("deterministic_transforms")
    assert [type(step).__name__ for step in steps[:2]] == ["LoadCTSliced", "WindowHUd"]
    assert steps[1].windows == [tuple(parser.get("window"))] == [(-1000.0, 400.0)]
    parser = ConfigParser()
    parser.read_config([INFERENCE_CONFIG])
    workers = parser.get_parsed_content("preprocessing").transforms  # read and decode only
    assert type(workers[0]).__name__ == "LoadCTSliced" and not any(isinstance(step, WindowHUd) for step in workers)
    assert parser.get_parsed_content("prepare_batch").preprocess.windows == [(-1000.0, 400.0)]
    item = LoadCTSliced("image")({"image": scored_ct_labels.parent / "p01.nii.gz", "frame": 2})
    assert item["hu"] and float(item["image"].min()) < -900  # HU, not yet windowed
    expected = ScaleIntensityRange(a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True)(item["image"])
    windowed = WindowHUd("image", window=[-160, 240])(item)
    assert torch.equal(windowed["image"], expected) and not windowed["hu"]
    rendered = tmp_path / "rendered.tif"  # a slice windowed already passes through
    tifffile.imwrite(rendered, np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    loaded = LoadCTSliced("image")({"image": rendered})
    assert torch.equal(WindowHUd("image", window=[-160, 240])(loaded)["image"], loaded["image"])
    three = WindowHUd("image", window=[[-1000, 400], [-160, 240], [-1350, 150]], channels=3)(item)["image"]
    assert three.shape == (3, 64, 64) and not torch.equal(three[0], three[1])
    with pytest.raises(ValueError, match="3 windows give 3 channels, but in_channels is 1"):
        WindowHUd("image", window=[[-1000, 400], [-160, 240], [-1350, 150]], channels=1)


def test_three_windows_as_three_channels_end_to_end(scored_ct_labels: Path, tmp_path: Path) -> None:
    """The multi-window overlay trains, records 3 input channels, and scores a DICOM series with them."""
    _train(scored_ct_labels, tmp_path, [TRAIN_CONFIG, MULTI_WINDOW], max_epochs=1)
    assert read_settings(tmp_path / "model.pt")["in_channels"] == 3
    output = tmp_path / "scores"
    configs = [INFERENCE_CONFIG, MULTI_WINDOW]
    inference_workflow(tmp_path / "model.pt", scored_ct_labels.parent / "p00", output, configs).run()
    with open(output / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["file"] for row in rows] == [f"{k:03d}.dcm" for k in range(6)]
    assert json.loads((output / "errors.json").read_text()) == []


def test_fine_tuning_a_trained_model_raises_its_validation_aggregate(
    scored_ct_labels: Path, trained_bundle: Path, tmp_path: Path
) -> None:
    """From the LDCTIQA-trained tiny model to the DICOM/NIfTI reader study: the validation aggregate (3 held-out
    patients, 18 slices) rises over the epochs, and the weights move away from the starting model's."""
    history = _train(scored_ct_labels, tmp_path, init_checkpoint=str(trained_bundle / "model.pt"), max_epochs=6)
    assert len(history) == 6 and max(history[2:]) > history[0] + 0.3, history
    tuned = torch.load(tmp_path / "model.pt", weights_only=True)
    start = torch.load(trained_bundle / "model.pt", weights_only=True)
    assert tuned.keys() == start.keys() and not all(torch.equal(tuned[key], start[key]) for key in start)


def test_init_checkpoint_must_fit_the_network(scored_ct_labels: Path, trained_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="initialise_network") as caught:
        _train(scored_ct_labels, tmp_path, init_checkpoint=str(trained_bundle / "model.pt"), side=16)
    assert "was trained with side=32, but this config has side=16" in str(caught.value.__cause__)
    with pytest.raises(RuntimeError, match="initialise_network") as caught:
        _train(scored_ct_labels, tmp_path, init_checkpoint=str(tmp_path / "absent.pt"))
    assert "absent.pt' does not exist: give a model.pt written by training" in str(caught.value.__cause__)


def test_evaluation_reports_per_patient_means(scored_ct_labels: Path, trained_bundle: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(trained_bundle, tmp_path / "model"))
    workflow = make_workflow(
        EVALUATE_CONFIGS,
        "eval",
        **TINY_OVERRIDES,
        layout="scored_ct",
        labels=str(scored_ct_labels.with_suffix(".json")),
        ckpt_dir=str(folder),
        output_dir=str(tmp_path / "eval"),
    )
    workflow.run()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    with open(tmp_path / "eval" / "patients.csv", newline="") as stream:
        patients = list(csv.DictReader(stream))
    with open(tmp_path / "eval" / "predictions.csv", newline="") as stream:
        slices = list(csv.DictReader(stream))
    items = scored_ct_items(scored_ct_labels)
    patient_of = {(item["image"], item["frame"]): item["patient"] for item in items}
    predicted: dict[str, list[float]] = {}
    for row in slices:
        predicted.setdefault(patient_of[(row["file"], int(row["slice"]))], []).append(float(row["prediction"]))
    assert [row["patient"] for row in patients] == sorted(predicted) and len(patients) == 12
    means = np.array([np.mean(predicted[row["patient"]]) for row in patients])
    labels = np.round([np.mean([i["label"] for i in items if i["patient"] == row["patient"]]) for row in patients], 6)
    assert np.allclose(means, [float(row["prediction"]) for row in patients], atol=1e-6)
    per_patient = metrics["per_patient"]
    assert per_patient["n"] == 12
    assert per_patient["plcc"] == pytest.approx(abs(stats.pearsonr(means, labels)[0]), abs=1e-6)
    assert per_patient["srocc"] == pytest.approx(abs(stats.spearmanr(means, labels)[0]), abs=1e-6)
    assert per_patient["krocc"] == pytest.approx(abs(stats.kendalltau(means, labels)[0]), abs=1e-6)


def test_the_bundle_commands_train_evaluate_and_score_a_reader_study(scored_ct_labels: Path, tmp_path: Path) -> None:
    """The README's commands, from the repository root: training and evaluation on the labels file, then
    ``score`` on a DICOM series folder and a NIfTI volume of the study."""
    from tests.test_flags import TINY_CLI, run_cli

    study = ["--layout", "scored_ct", "--labels", str(scored_ct_labels), "--bundle_root", "bundle"]
    models, evaluation = tmp_path / "models", tmp_path / "eval"
    train = ["--config_file", TRAIN_CONFIG, *study, "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "out")]
    result = run_cli(
        "monai.bundle", "run", "training", *train, "--f_checkpoint", "None", "--pretrained", "false", *TINY_CLI
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluate = ["--config_file", json.dumps(EVALUATE_CONFIGS), *study, "--ckpt_dir", str(models)]
    result = run_cli("monai.bundle", "run", "evaluating", *evaluate, "--output_dir", str(evaluation), *TINY_CLI)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["n"] == 72 and metrics["per_patient"]["n"] == 12
    root = scored_ct_labels.parent
    targets = [str(root / "p00"), str(root / "p01.nii.gz")]
    result = run_cli(
        "scripts", "score", *targets, "--output_dir", str(tmp_path / "scores"), "--ckpt", str(models / "model.pt")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "scores" / "scores.csv", newline="") as stream:
        assert len(list(csv.DictReader(stream))) == 12  # 6 DICOM slices and 6 NIfTI slices
