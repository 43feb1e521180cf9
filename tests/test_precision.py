"""Mixed precision (``amp``: false/true/bf16/fp16), ``channels_last`` and ``compile``: top-level ids of the train,
evaluate and inference configs and options of ``score``, giving the same scores as float32 on a CPU.

Tolerances: channels_last 1e-5 (the same arithmetic in another memory order), compile 1e-4 (fused kernels),
bf16 0.05 on the 0..4 scale (8 bits of mantissa through both networks)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from scripts.engines import AMP_NAMES, amp_dtype, needs_grad_scaler, place_network, wants_channels_last
from scripts.options import AMP_WORDS

from tests.conftest import (
    TINY_NETWORKS,
    TINY_OVERRIDES,
    TRAIN_CONFIG,
    compiled_graphs,
    inference_workflow,
    make_workflow,
)

TOLERANCES = {"channels_last": 1e-5, "compile": 1e-4, "amp": 0.05}
OPTIONS = {"channels_last": {"channels_last": "true"}, "compile": {"compile": True}, "amp": {"amp": "bf16"}}


@pytest.mark.parametrize(
    ("amp", "expected"),
    [(False, None), ("0", None), ("false", None), ("bf16", torch.bfloat16), ("fp16", torch.float16),
     (True, None), ("true", None), ("1", None)],
)  # fmt: skip
def test_amp_values(amp: object, expected: torch.dtype | None) -> None:
    assert sorted(AMP_NAMES) == sorted(AMP_WORDS)  # each name the option check takes has its dtype
    assert amp_dtype(amp, "cpu") is expected  # true: nothing on a CPU, where bf16 must be asked for by name
    assert not needs_grad_scaler(amp, "cpu")  # a gradient scaler is for fp16 on CUDA only


def test_channels_last_auto_is_for_cuda_gpus_only() -> None:
    """``channels_last: auto`` (the inference config's and score's default): the channels-last format on a CUDA GPU,
    where it runs faster, and the usual one on a CPU; true and false as given; other values are refused."""
    from scripts.networks import build_network

    assert wants_channels_last("auto", "cuda:0") and wants_channels_last(" AUTO ", torch.device("cuda"))
    assert not wants_channels_last("auto", "cpu") and wants_channels_last("true", "cpu")
    assert not wants_channels_last(False, "cuda")
    with pytest.raises(ValueError, match="channels_last must be true, false or auto"):
        wants_channels_last("sometimes", "cuda")
    network = place_network(build_network(**TINY_NETWORKS), "cpu", "auto")
    convolution = next(module for module in network.modules() if isinstance(module, torch.nn.Conv2d))
    assert convolution.weight.is_contiguous() and convolution.weight.shape[-1] > 1


def test_compile_values_and_the_configs_compile_arguments() -> None:
    """``compile``: false, true or a torch.compile mode by name, as inductor's options; frozen weights for the
    inference config only (training's weights change between calls); other values refused by name."""
    from monai.bundle import ConfigParser
    from scripts.engines import compile_kwargs, compile_mode
    from torch._inductor import list_mode_options

    assert compile_mode(False) is None and compile_mode("0") is None and compile_mode(True) == "default"
    assert compile_mode(" Max-Autotune ") == "max-autotune" and compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be true, false or a torch.compile mode .*'fastest'"):
        compile_mode("fastest")
    assert compile_kwargs(True) == {"options": {}}
    assert compile_kwargs(True, frozen=True) == {"options": {"freezing": True}}
    tuned = {**list_mode_options("max-autotune"), "freezing": True}
    assert compile_kwargs("max-autotune", frozen=True) == {"options": tuned} and tuned["max_autotune"]
    for config, frozen in ((TRAIN_CONFIG, False), (str(Path(TRAIN_CONFIG).with_name("inference.json")), True)):
        parser = ConfigParser()
        parser.read_config(config)
        parser.update({"compile": "max-autotune"})
        assert parser.get_parsed_content("use_compile") is True
        assert parser.get_parsed_content("compile_kwargs") == compile_kwargs("max-autotune", frozen), config


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_true_on_cuda_prefers_bf16(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)  # no GPU here
    assert amp_dtype(True, "cuda:0") is expected
    assert needs_grad_scaler(True, "cuda:0") is (expected is torch.float16)
    assert amp_dtype("fp16", "cuda:0") is torch.float16 and needs_grad_scaler("fp16", "cuda")


def test_an_unknown_amp_value_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"amp must be false, true, bf16 or fp16 \(or 0/1\), got 'fp8'"):
        amp_dtype("fp8")


def _predictions(trained_bundle: Path, slices: Path, output: Path, **options: object) -> dict[str, float]:
    inference_workflow(trained_bundle / "model.pt", slices, output, **options).run()
    with open(output / "predictions.csv", newline="") as stream:
        return {row["file"]: float(row["prediction"]) for row in csv.DictReader(stream)}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_inference_options_give_the_same_scores(
    trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path, option: str
) -> None:
    """Twelve slices in batches of eight: compiled, the last batch is padded, so the network is compiled once."""
    slices = ldct_test_dir / "images"
    reference = _predictions(trained_bundle, slices, tmp_path / "float32")
    graphs_before = compiled_graphs()
    changed = _predictions(trained_bundle, slices, tmp_path / option, **OPTIONS[option])
    assert compiled_graphs() - graphs_before == (1 if option == "compile" else 0)
    assert changed.keys() == reference.keys() and len(reference) == 12
    worst = max(abs(changed[name] - reference[name]) for name in reference)
    assert worst <= TOLERANCES[option], worst
    assert len(set(reference.values())) > 1  # scores that differ between slices: a real comparison


def test_training_runs_under_bf16_with_channels_last(
    ldct_train_dir: Path, trained_bundle: Path, tmp_path: Path
) -> None:
    """From a trained model (whose scores differ between slices even in bf16's 8-bit mantissa), two epochs under
    bf16 autocast with channels-last tensors: finite losses and a best checkpoint."""
    settings = {**TINY_OVERRIDES, "amp": "bf16", "channels_last": True, "max_epochs": 2}
    settings["init_checkpoint"] = str(trained_bundle / "model.pt")
    workflow = make_workflow(
        TRAIN_CONFIG,
        "train",
        **settings,
        dataset_dir=str(ldct_train_dir),
        ckpt_dir=str(tmp_path),
        output_dir=str(tmp_path),
    )
    losses: list[float] = []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output[0]["loss"]))
    workflow.run()
    assert (tmp_path / "model.pt").is_file() and all(torch.isfinite(torch.as_tensor(losses)))
    assert json.loads((tmp_path / "model.json").read_text())["in_channels"] == 1


def test_score_takes_the_same_options(trained_bundle: Path, ldct_test_dir: Path, tmp_path: Path) -> None:
    from tests.test_flags import run_cli

    images = [str(path) for path in sorted((ldct_test_dir / "images").glob("*.tiff"))[:4]]
    scores = {}
    for name, options in (("float32", []), ("bf16", ["--amp", "bf16", "--channels_last", "true"])):
        command = ["scripts", "score", *images, "--output_dir", str(tmp_path / name), "--num_workers", "0"]
        result = run_cli(*command, "--ckpt", str(trained_bundle / "model.pt"), *options)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / name / "scores.csv", newline="") as stream:
            scores[name] = [float(row["score"]) for row in csv.DictReader(stream)]
    differences = [abs(a - b) for a, b in zip(scores["float32"], scores["bf16"], strict=True)]
    assert len(differences) == 4 and max(differences) <= TOLERANCES["amp"]


def test_scoring_compiled_with_frozen_weights_gives_the_same_scores(tiny_checkpoint: Path, ldct_test_dir: Path) -> None:
    """``score --compile true`` compiles with inductor's freezing (weights as constants, norms folded): the scores of
    the uncompiled network within the compile tolerance. Six slices in batches of four: the last batch is padded to
    four, so the network is compiled once, not again for a batch of two."""
    from scripts.clinical.score import SliceScorer
    from scripts.ct_inputs import index_inputs

    items, _ = index_inputs(sorted((ldct_test_dir / "images").glob("*.tiff"))[:6])
    graphs_before = compiled_graphs()
    scores = {}
    for compiled in (0, 1):
        scorer = SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", batch_size=4, compile=compiled)
        scores[compiled] = [score for score, _, _ in scorer(items)]
    assert compiled_graphs() - graphs_before == 1
    assert len(scores[1]) == 6 and None not in scores[1]
    assert max(abs(a - b) for a, b in zip(scores[0], scores[1], strict=True)) <= TOLERANCES["compile"]


def test_padded_batch_keeps_the_images_and_their_memory_format() -> None:
    from scripts.patches import padded_batch

    images = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    padded = padded_batch(images, 5)
    assert padded.shape == (5, 3, 8, 8) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:2], images) and not padded[2:].any()
    assert padded_batch(images, 2) is images
