"""Score calibration: the least-squares line onto the labels, saved with the best checkpoint, run by the network."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from scipy import stats
from scripts.calibration import (
    SCALE_METRIC,
    SHIFT_METRIC,
    STEEP_LINE,
    calibration_metrics,
    fit_line,
    scoring_calibration,
)
from scripts.checkpoints import BestCheckpointSaver, read_checkpoint, save_checkpoint
from scripts.clinical.score import score_paths
from scripts.ct_io import write_dicom_slice
from scripts.metrics import correlations, pred_label_float64
from scripts.networks import build_network, load_network

from tests.conftest import (
    CALIBRATE_CONFIGS,
    EVALUATE_CONFIGS,
    TINY_NETWORKS,
    TINY_OVERRIDES,
    TRAIN_CONFIG,
    copy_checkpoint,
    make_workflow,
    scoring_tiny_network,
)


def _noisy_scores(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels on 0..4 and predictions pulled towards the mean, as an MSE-trained model gives them."""
    rng = np.random.default_rng(seed)
    labels = np.round(rng.uniform(0, 4, n) * 5) / 5
    return 0.6 * labels + 1.2 + rng.normal(0, 0.3, n), labels


def test_the_line_is_least_squares_onto_the_labels_and_the_identity_where_it_would_not_increase() -> None:
    predictions, labels = _noisy_scores()
    scale, shift = fit_line(predictions.tolist(), labels.tolist())
    assert (scale, shift) == pytest.approx(tuple(np.polyfit(predictions, labels, 1)), abs=1e-9)
    calibrated = scale * predictions + shift
    assert correlations(calibrated, labels) == pytest.approx(correlations(predictions, labels), abs=1e-12)
    assert np.abs(calibrated - labels).mean() < 0.8 * np.abs(predictions - labels).mean()
    r = stats.pearsonr(predictions, labels)[0]
    assert calibrated.std() == pytest.approx(r * labels.std(), rel=1e-9)  # never wider than the labels
    assert fit_line([1.0, 2.0], [0.0, 4.0]) == (1.0, 0.0)  # too few points
    assert fit_line([2.0, 2.0, 2.0], [0.0, 2.0, 4.0]) == (1.0, 0.0)  # constant predictions
    flipped = fit_line((-predictions).tolist(), labels.tolist())  # outputs that run against the labels
    assert flipped == pytest.approx((-scale, shift), abs=1e-9)  # are turned the right way round
    assert fit_line([1.0, 2.0, 3.0, 2.0], [1.0, 3.0, 1.0, -1.0]) == (1.0, 0.0)  # no correlation at all


def test_the_metric_over_batches_gives_the_line_of_all_values() -> None:
    predictions, labels = _noisy_scores(50, seed=1)
    batches = [(predictions[i : i + 8], labels[i : i + 8]) for i in range(0, 50, 8)]  # the last batch is short

    def step(engine: Engine, batch: tuple[np.ndarray, np.ndarray]) -> list[dict[str, torch.Tensor]]:
        return [{"pred": torch.tensor([p, 0.1]), "label": torch.tensor(y)} for p, y in zip(*batch, strict=True)]

    engine = Engine(step)
    for name, metric in calibration_metrics(pred_label_float64).items():
        metric.attach(engine, name)
    metrics = engine.run(batches).metrics
    expected = np.polyfit(predictions, labels, 1)
    assert (metrics[SCALE_METRIC], metrics[SHIFT_METRIC]) == pytest.approx(tuple(expected), abs=1e-9)


def test_a_checkpoint_saved_before_calibration_existed_loads_as_the_identity(tmp_path: Path) -> None:
    network = build_network(**TINY_NETWORKS).eval()
    path = save_checkpoint(tmp_path / "model.pt", network, image_size=64)
    old = {k: v for k, v in torch.load(path, weights_only=True).items() if "calibration" not in k}
    assert len(old) == len(network.state_dict()) - 4  # TFKT's line and F's unused one
    torch.save(old, path)
    loaded = load_network(str(path))
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(images), network(images))
    assert (float(loaded.calibration.scale), float(loaded.calibration.shift)) == (1.0, 0.0)


@pytest.mark.parametrize("patch_size", [None, 32])
def test_the_saved_line_follows_the_one_the_network_has_and_leaves_the_network_as_it_is(
    patch_size: int | None, tmp_path: Path
) -> None:
    network = build_network(**TINY_NETWORKS, patch_size=patch_size).eval()
    prefix, calibration = scoring_calibration(network)
    assert prefix == ("network." if patch_size else "") + "calibration."
    calibration.scale.fill_(2.0)  # a fine-tuned model that started calibrated
    calibration.shift.fill_(1.0)
    saver = BestCheckpointSaver(tmp_path, {"model": network})
    engine = Engine(lambda engine, batch: None)
    engine.state.key_metric_name = "aggregate"
    engine.state.metrics = {"aggregate": 1.0, SCALE_METRIC: 0.5, SHIFT_METRIC: 0.25}
    saver(engine)
    state, _ = read_checkpoint(tmp_path / "model.pt")
    assert (float(state[prefix + "scale"]), float(state[prefix + "shift"])) == (1.0, 0.75)  # 0.5 (2 x + 1) + 0.25
    assert (float(calibration.scale), float(calibration.shift)) == (2.0, 1.0)  # training goes on unchanged
    f_prefix = ("network." if patch_size else "") + "f.calibration."
    assert (float(state[f_prefix + "scale"]), float(state[f_prefix + "shift"])) == (1.0, 0.0)  # F's is not touched


def test_the_best_checkpoint_scores_its_validation_slices_on_the_labels_line(
    ldct_train_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trained with the bundle's config, the saved model refitted on the validation slices needs no further line,
    and its correlations are those of the best epoch."""
    workflow = make_workflow(
        TRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(ldct_train_dir), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"), f_checkpoint=None, max_epochs=2, split=0.3,
    )  # fmt: skip
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    best = evaluator.state.best_metric
    saved, _ = read_checkpoint(tmp_path / "models" / "model.pt")
    scale = float(saved["calibration.scale"])
    assert scale > 1.5  # the tiny model's outputs are far from the labels' scale
    assert scale < STEEP_LINE or f"its line stretches them {scale:.1f} times" in caplog.text
    model = workflow.parser.get_parsed_content("model")
    model.load_state_dict(saved)
    evaluator.run()
    metrics = evaluator.state.metrics
    assert (metrics[SCALE_METRIC], metrics[SHIFT_METRIC]) == pytest.approx((1.0, 0.0), abs=1e-4)
    assert metrics["aggregate"] == pytest.approx(best, abs=1e-5)
    workflow.finalize()


def test_score_gives_the_calibrated_scores_and_names_the_model_and_its_line(tmp_path: Path) -> None:
    network = scoring_tiny_network()
    raw = save_checkpoint(tmp_path / "raw" / "model.pt", network, image_size=64)
    network.calibration.scale.fill_(0.5)
    network.calibration.shift.fill_(1.0)
    calibrated = save_checkpoint(tmp_path / "calibrated" / "model.pt", network, image_size=64)
    for z in range(3):
        hu = np.random.default_rng(z).normal(0.0, 100.0 * (z + 1), (48, 48))
        write_dicom_slice(tmp_path / "ct" / f"{z}.dcm", hu, "1.2.3", float(z))

    def scores(checkpoint: Path) -> tuple[list[float], dict]:
        summary = score_paths([tmp_path / "ct"], tmp_path / checkpoint.parent.name / "out", checkpoint, device="cpu")
        worst = sorted(summary["series"]["1.2.3"]["worst"], key=lambda entry: entry["slice_index"])
        return [entry["score"] for entry in worst], summary["model"]

    raw_scores, raw_model = scores(raw)
    calibrated_scores, calibrated_model = scores(calibrated)
    assert 0 < min(raw_scores) and max(raw_scores) < 4  # inside the scale: nothing clipped
    assert calibrated_scores == pytest.approx([0.5 * score + 1.0 for score in raw_scores], abs=1e-5)
    assert raw_model == {"checkpoint": str(raw.resolve()), "calibration": {"scale": 1.0, "shift": 0.0}}
    assert calibrated_model["calibration"] == {"scale": 0.5, "shift": 1.0}


def test_a_trained_model_is_calibrated_on_a_labelled_set_of_ones_own(
    trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path
) -> None:
    """``calibrate.json``: the line onto a reader study's scores, fitted after the one the model has, into a new
    checkpoint that scores the study with the same correlations and a smaller error."""
    models, study = tmp_path / "models", tmp_path / "study"
    copy_checkpoint(trained_bundle / "model.pt", models / "model.pt")
    shutil.copytree(ldct_test_dir, study)
    ids = {**TINY_OVERRIDES, "dataset_dir": str(study), "ckpt_dir": str(models)}

    def evaluated(name: str) -> tuple[dict, dict[str, float]]:
        output = tmp_path / name
        make_workflow(EVALUATE_CONFIGS, "train", **ids, ckpt_name=name, output_dir=str(output)).run()
        with open(output / "predictions.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        scores = {row["file"]: float(row["prediction"]) for row in rows}
        return json.loads((output / "metrics.json").read_text()), scores

    # readers who rank the slices much as the model does, on a scale of their own
    _, outputs = evaluated("model.pt")
    names, raw = list(outputs), np.array(list(outputs.values()))
    z = (raw - raw.mean()) / raw.std() + np.random.default_rng(0).normal(0, 0.4, raw.size)
    labels = np.clip(np.round((2.0 + 0.8 * z) * 5) / 5, 0, 4)
    (study / "test.json").write_text(json.dumps({Path(n).name: float(y) for n, y in zip(names, labels, strict=True)}))

    make_workflow(CALIBRATE_CONFIGS, "train", **ids, output_dir=str(tmp_path / "calibrate")).run()
    assert read_checkpoint(models / "model_calibrated.pt")[1] == read_checkpoint(models / "model.pt")[1]  # model.json
    before, _ = evaluated("model.pt")
    after, calibrated = evaluated("model_calibrated.pt")
    assert json.loads((tmp_path / "calibrate" / "metrics.json").read_text()) == before  # the model as it was
    for name in ("plcc", "srocc", "krocc"):
        assert after[name] == pytest.approx(before[name], abs=1e-5)
    assert after["mae"] < 0.8 * before["mae"] and after["rmse"] < before["rmse"]
    scale, shift = fit_line(raw.tolist(), labels.tolist())
    assert scale != 1.0 and [calibrated[n] for n in names] == pytest.approx(scale * raw + shift, abs=1e-4)


def test_a_line_that_turns_the_outputs_round_is_said_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An epoch whose outputs rank the slices against their labels is saved with a negative line, and said."""
    network = build_network(**TINY_NETWORKS).eval()
    saver = BestCheckpointSaver(tmp_path, {"model": network})
    engine = Engine(lambda engine, batch: None)
    engine.state.key_metric_name = "aggregate"
    for aggregate, scale, said in ((1.0, 0.5, False), (2.0, -0.5, True)):  # each one better: each saved
        caplog.clear()
        engine.state.metrics = {"aggregate": aggregate, SCALE_METRIC: scale, SHIFT_METRIC: 2.0}
        with caplog.at_level(logging.WARNING, logger="scripts.calibration"):
            saver(engine)
        assert ("outputs run against the labels (line slope -0.5000)" in caplog.text) is said
    state, _ = read_checkpoint(tmp_path / "model.pt")
    assert float(state["calibration.scale"]) == -0.5
