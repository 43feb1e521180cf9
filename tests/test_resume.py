"""A killed training run resumes from its last state and ends as if it had never stopped; another run's model is
never replaced without being told."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events
from scripts.checkpoints import CheckpointError, last_state_path, read_checkpoint

from tests.conftest import TINY_OVERRIDES, TRAIN_CONFIG, make_workflow
from tests.test_flags import TINY_CLI, run_cli

EPOCHS = 3


class Killed(Exception):
    """What a kill in the middle of an epoch leaves: the epoch's work is lost, the files are as they were."""


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _train(dataset: Path, folder: Path, kill_at_iteration: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Train the tiny network for ``EPOCHS`` epochs into ``folder``: the last validation metrics and the weights."""
    workflow = make_workflow(
        TRAIN_CONFIG, "train", **TINY_OVERRIDES, dataset_dir=str(dataset), ckpt_dir=str(folder),
        output_dir=str(folder / "out"), f_checkpoint=None, max_epochs=EPOCHS, **overrides,
    )  # fmt: skip
    trainer = workflow.parser.get_parsed_content("train#trainer")
    if kill_at_iteration is not None:

        def kill(engine: Any) -> None:
            raise Killed

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=kill_at_iteration), kill)
    try:
        workflow.run()
    finally:
        workflow.finalize()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    return {
        "metrics": dict(evaluator.state.metrics),
        "best": (evaluator.state.best_metric, evaluator.state.best_metric_epoch),
        "weights": {k: v.clone() for k, v in workflow.parser.get_parsed_content("model").state_dict().items()},
        "epochs": trainer.state.epoch,
    }


def test_a_killed_run_resumes_to_the_same_metrics_and_weights(ldct_train_dir: Path, tmp_path: Path) -> None:
    whole = _train(ldct_train_dir, tmp_path / "whole")
    state = torch.load(last_state_path(tmp_path / "whole", "model.pt"), weights_only=True)
    per_epoch = state["trainer"]["epoch_length"]

    folder = tmp_path / "killed"
    with pytest.raises(RuntimeError) as caught:  # killed half-way through the last epoch
        _train(ldct_train_dir, folder, kill_at_iteration=(EPOCHS - 1) * per_epoch + per_epoch // 2)
    assert isinstance(_root_cause(caught.value), Killed)
    saved = torch.load(last_state_path(folder, "model.pt"), weights_only=True)
    assert saved["trainer"]["iteration"] == (EPOCHS - 1) * per_epoch  # the last completed epoch

    resumed = _train(ldct_train_dir, folder, resume="true")
    assert resumed["epochs"] == EPOCHS
    assert resumed["metrics"] == pytest.approx(whole["metrics"], abs=1e-6)
    assert resumed["best"] == pytest.approx(whole["best"], abs=1e-6)
    for name, tensor in whole["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, rtol=0, atol=1e-6, msg=name)
    best_whole, best_resumed = read_checkpoint(tmp_path / "whole" / "model.pt"), read_checkpoint(folder / "model.pt")
    for name, tensor in best_whole[0].items():
        torch.testing.assert_close(best_resumed[0][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_resume_without_a_last_state_says_so(ldct_train_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:  # the config parser wraps what a component raises
        _train(ldct_train_dir, tmp_path, resume=True)
    cause = _root_cause(caught.value)
    assert isinstance(cause, CheckpointError) and "model_last.pt does not exist: no earlier run" in str(cause)


def test_a_new_run_refuses_another_runs_model_unless_told(
    ldct_train_dir: Path, pretrained_bundle: Path, tmp_path: Path
) -> None:
    """From the command line: the second run stops before training with the other run's best metric and the way
    out; ``--overwrite true`` replaces the model, ``--resume true`` continues the run."""
    common = [
        "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG, "--dataset_dir", str(ldct_train_dir),
        "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
        "--f_checkpoint", str(pretrained_bundle / "pretrain.pt"), "--pretrained", "false", *TINY_CLI,
    ]  # fmt: skip
    first_run = run_cli(*common)
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    model = tmp_path / "model.pt"
    first = model.read_bytes()
    best = torch.load(last_state_path(tmp_path, "model.pt"), weights_only=True)["best_metric"]

    refused = run_cli(*common)
    assert refused.returncode != 0
    assert f"already holds the model of another run (best metric {best:.4f}, after epoch 1)" in refused.stderr
    assert "--overwrite true" in refused.stderr and "--resume true" in refused.stderr
    assert model.read_bytes() == first

    resumed = run_cli(*common[:-2], "--max_epochs", "2", "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(last_state_path(tmp_path, "model.pt"), weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]  # continued to epoch 2

    replaced = run_cli(*common, "--overwrite", "1")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    state = torch.load(last_state_path(tmp_path, "model.pt"), weights_only=True)
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"]  # a new run: one epoch
