"""The bundle's four workflows, end to end through ``monai.bundle.ConfigWorkflow``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from PIL import Image
from scripts.checkpoints import config_overrides, read_checkpoint
from scripts.data import DatasetError
from scripts.metrics import correlations

from tests.conftest import (
    EVALUATE_CONFIGS,
    INFERENCE_CONFIG,
    PRETRAIN_CONFIG,
    TINY_OVERRIDES,
    TRAIN_CONFIG,
    inference_workflow,
    make_workflow,
)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_pretraining_writes_best_checkpoint_and_datalist(pretrained_bundle: Path) -> None:
    state, settings = read_checkpoint(pretrained_bundle / "pretrain.pt")
    assert settings["network"] == "f_only"
    assert settings["f_name"] == "test_efficientnet"
    assert settings["image_size"] == 64
    assert "head.weight" in state
    datalist = json.loads((pretrained_bundle / "out" / "datalist.json").read_text())
    train_refs = {Path(item["image"]).name[:3] for item in datalist["training"]}
    val_refs = {Path(item["image"]).name[:3] for item in datalist["validation"]}
    assert train_refs and val_refs and not train_refs & val_refs  # references never straddle the split


def test_training_workflow_has_bundle_properties(ldct_train_dir: Path, tmp_path: Path) -> None:
    workflow = make_workflow(
        TRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(ldct_train_dir), ckpt_dir=str(tmp_path)
    )
    assert not workflow.check_properties()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 100
    assert isinstance(workflow.parser.get_parsed_content("train#dataloader"), torch.utils.data.DataLoader)


def test_pretraining_and_inference_have_bundle_properties(
    kadid_dir: Path, ldct_test_dir: Path, trained_bundle: Path, tmp_path: Path
) -> None:
    pretraining = make_workflow(PRETRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(kadid_dir))
    assert not pretraining.check_properties()
    inference = make_workflow(
        INFERENCE_CONFIG,
        "inference",
        **config_overrides(trained_bundle / "model.pt"),
        dataset_dir=str(ldct_test_dir / "images"),
        output_dir=str(tmp_path),
        device=torch.device("cpu"),
    )
    assert not inference.check_properties()


def test_training_loss_falls(ldct_train_dir: Path, tmp_path: Path) -> None:
    workflow = make_workflow(
        TRAIN_CONFIG,
        "train",
        **{**TINY_OVERRIDES, "learning_rate": 1e-3},
        dataset_dir=str(ldct_train_dir),
        ckpt_dir=str(tmp_path),
        output_dir=str(tmp_path / "out"),
        f_checkpoint=None,
        max_epochs=6,
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses: dict[int, list[float]] = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine) -> None:
        losses.setdefault(engine.state.epoch, []).append(engine.state.output[0]["loss"])

    workflow.run()
    epoch_means = [float(np.mean(values)) for _, values in sorted(losses.items())]
    assert len(epoch_means) == 6
    assert min(epoch_means[-2:]) < 0.75 * epoch_means[0], epoch_means  # a broken update stays near mean(label**2)
    assert (tmp_path / "model.pt").is_file()


def test_phase1_handover_copies_f_exactly(ldct_train_dir: Path, pretrained_bundle: Path, tmp_path: Path) -> None:
    checkpoint = pretrained_bundle / "pretrain.pt"
    workflow = make_workflow(
        TRAIN_CONFIG,
        "train",
        **TINY_OVERRIDES,
        dataset_dir=str(ldct_train_dir),
        ckpt_dir=str(tmp_path),
        f_checkpoint=str(checkpoint),
    )
    model = workflow.parser.get_parsed_content("model")
    phase1, _ = read_checkpoint(checkpoint)
    f_state = model.f.state_dict()
    assert set(f_state) == set(phase1)
    for key, value in phase1.items():
        assert torch.equal(f_state[key], value), key


def test_training_records_network_settings(trained_bundle: Path) -> None:
    _, settings = read_checkpoint(trained_bundle / "model.pt")
    assert settings == {
        "network": "tfkt",
        "f_name": "test_efficientnet",
        "in_channels": 1,
        "f_kwargs": {},
        "s_name": "swinv2_tiny_window8_256",
        "side": 32,
        "s_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
        "image_size": 64,
        "window": [-1000.0, 400.0],
    }


def test_setting_a_split_is_written_next_to_outputs(ldct_train_dir: Path, tmp_path: Path) -> None:
    workflow = make_workflow(
        TRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(ldct_train_dir), output_dir=str(tmp_path), split="A"
    )
    lists = workflow.parser.get_parsed_content("datalists")
    assert (len(lists["training"]), len(lists["validation"])) == (26, 6)  # 80/20 of 32, rounded
    record = json.loads((tmp_path / "datalist.json").read_text())
    assert record["split"] == "A"
    assert [item["image"] for item in record["validation"]] == [
        str(Path(item["image"]).relative_to(ldct_train_dir)) for item in lists["validation"]
    ]


def test_evaluation_writes_metrics_predictions_and_scatter(
    trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path
) -> None:
    workflow = make_workflow(
        EVALUATE_CONFIGS,
        "train",  # evaluate.json overlays train.json, whose required properties it keeps
        **TINY_OVERRIDES,
        ckpt_dir=str(trained_bundle),
        dataset_dir=str(ldct_test_dir),
        output_dir=str(tmp_path),
        logistic_fit=True,
    )
    workflow.run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"plcc", "srocc", "krocc", "aggregate", "n", "mae", "rmse", "plcc_logistic"}
    rows = _read_csv(tmp_path / "predictions.csv")
    assert list(rows[0]) == ["file", "label", "prediction", "score_sd"]
    assert sorted(row["file"] for row in rows) == [f"images/test{i:03d}.tiff" for i in range(12)]
    expected = correlations([float(r["prediction"]) for r in rows], [float(r["label"]) for r in rows])
    for name in ("plcc", "srocc", "krocc", "aggregate"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), (name, metrics, expected)
    assert metrics["n"] == 12
    errors = np.array([float(r["prediction"]) - float(r["label"]) for r in rows])
    assert (metrics["mae"], metrics["rmse"]) == pytest.approx((np.abs(errors).mean(), np.sqrt((errors**2).mean())))
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_of_a_datalist(trained_bundle: Path, ldct_train_dir: Path, tmp_path: Path) -> None:
    """Setting A: evaluate the held-out list that training wrote beside its outputs."""
    workflow = make_workflow(
        EVALUATE_CONFIGS,
        "train",
        **TINY_OVERRIDES,
        ckpt_dir=str(trained_bundle),
        dataset_dir=str(ldct_train_dir),
        eval_datalist=str(trained_bundle / "out" / "datalist.json"),
        output_dir=str(tmp_path),
    )
    workflow.run()
    held_out = json.loads((trained_bundle / "out" / "datalist.json").read_text())["validation"]
    rows = _read_csv(tmp_path / "predictions.csv")
    assert sorted(row["file"] for row in rows) == sorted(item["image"] for item in held_out)


def test_inference_scores_every_readable_slice(trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path) -> None:
    slices = tmp_path / "slices"
    (slices / "nested").mkdir(parents=True)
    for index, source in enumerate(sorted((ldct_test_dir / "images").glob("*.tiff"))[:3]):
        (slices / f"slice{index}.tif").write_bytes(source.read_bytes())
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(slices / "nested" / "grey.png")
    (slices / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    output = tmp_path / "out"
    inference_workflow(trained_bundle / "model.pt", slices, output).run()
    rows = _read_csv(output / "predictions.csv")
    assert list(rows[0]) == ["file", "slice", "prediction", "score_sd"]
    assert sorted(row["file"] for row in rows) == ["nested/grey.png", "slice0.tif", "slice1.tif", "slice2.tif"]
    assert all(0.0 <= float(row["prediction"]) <= 4.0 for row in rows)
    errors = json.loads((output / "errors.json").read_text())
    assert [Path(error["path"]).name for error in errors] == ["broken.tif"]
    assert errors[0]["reason"]


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_inference_on_a_missing_or_empty_folder_lists_why_and_fails(
    tiny_checkpoint: Path, tmp_path: Path, folder: str
) -> None:
    """The workflow builds without the data (``monai.bundle.load`` builds it for ``network_def``); the run writes
    errors.json with the reason and fails with it, since nothing was scored."""
    if folder == "empty":
        (tmp_path / folder).mkdir()
    output = tmp_path / "out"
    workflow = inference_workflow(tiny_checkpoint, tmp_path / folder, output)
    reason = "folder does not exist" if folder == "missing" else "no scorable CT or slice files found"
    with pytest.raises(RuntimeError, match="evaluator") as caught:
        workflow.run()
    assert isinstance(caught.value.__cause__, DatasetError)
    assert f"{tmp_path / folder}: {reason}" in str(caught.value.__cause__)
    assert json.loads((output / "errors.json").read_text()) == [{"path": str(tmp_path / folder), "reason": reason}]


def test_inference_without_its_checkpoint_stops_before_scoring(ldct_test_dir: Path, tmp_path: Path) -> None:
    """The checkpoint loader is attached in ``initialize`` and reads the weights as the evaluator starts: a missing
    checkpoint stops the run there, with its path, before any slice is scored with untrained weights."""
    workflow = make_workflow(
        INFERENCE_CONFIG,
        "inference",
        **TINY_OVERRIDES,
        checkpoint=str(tmp_path / "absent.pt"),
        dataset_dir=str(ldct_test_dir / "images"),
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(RuntimeError, match="evaluator") as caught:
        workflow.run()
    assert "absent.pt" in str(caught.value.__cause__)
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_inference_refuses_a_model_of_other_ids_naming_them_and_reads_the_earlier_form(
    trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path
) -> None:
    """A model run with network ids other than its own stops as the evaluator starts, with the ids on both sides
    (not a state-dict error); a file of the earlier ``{network, settings}`` form scores as the current form."""
    images = ldct_test_dir / "images"
    workflow = inference_workflow(trained_bundle / "model.pt", images, tmp_path / "other", side=16)
    with pytest.raises(RuntimeError, match="evaluator") as caught:
        workflow.run()
    assert "was trained with side=32, but this config has side=16" in str(caught.value.__cause__)
    assert not (tmp_path / "other" / "predictions.csv").exists()

    state, settings = read_checkpoint(trained_bundle / "model.pt")
    legacy = tmp_path / "legacy" / "model.pt"
    legacy.parent.mkdir()
    torch.save({"network": state, "settings": settings}, legacy)
    current_out, legacy_out = tmp_path / "current", tmp_path / "legacy_out"
    inference_workflow(trained_bundle / "model.pt", images, current_out).run()
    inference_workflow(legacy, images, legacy_out, **settings).run()  # its ids, as for any model without model.json
    assert _read_csv(legacy_out / "predictions.csv") == _read_csv(current_out / "predictions.csv")


def test_bundle_root_is_the_bundle_folder(tmp_path: Path) -> None:
    """``"bundle_root": "."`` as in the Model Zoo: paths follow the folder given, none is written into a config."""
    for config in (TRAIN_CONFIG, INFERENCE_CONFIG):
        assert json.loads(Path(config).read_text())["bundle_root"] == "."
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser.update({"bundle_root": "bundle"})  # from the repository root: --bundle_root bundle
    assert parser.get_parsed_content("checkpoint") == "bundle/models/model.pt"
    parser = ConfigParser()
    parser.read_config(EVALUATE_CONFIGS)
    assert parser.get_parsed_content("checkpoint") == "./models/model.pt"  # inside a bundle folder


def test_training_stops_before_it_starts_on_bad_labels(ldct_train_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "image").mkdir(parents=True)
    for source in sorted((ldct_train_dir / "image").glob("*.tif"))[:4]:
        (broken / "image" / source.name).write_bytes(source.read_bytes())
    (broken / "train.json").write_text(json.dumps({"0000.tif": 2.0, "0001.tif": 9.0, "0002.tif": 1.0, "0003.tif": 3.0}))
    workflow = make_workflow(TRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(broken), ckpt_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="scripts.data.training_datalists") as caught:
        workflow.run()
    assert isinstance(caught.value.__cause__, DatasetError)
    assert "train.json [0001.tif]: label 9.0 is outside [0, 4]" in str(caught.value.__cause__)
    assert not (tmp_path / "model.pt").exists()
