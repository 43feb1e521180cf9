"""The embedded demo: the whole TFKT pipeline, offline, on a CPU, in minutes.

``python -m scripts demo`` makes (or reuses) a KADID-layout set of distorted photographs and an
LDCTIQA-layout set of simulated low-dose CT slices at 512 px (``scripts.synthetic.ct``), then runs the
bundle's own workflows with the ``demo.json`` overlay (small networks reading 64-px crops at the
slices' own pixel grid, few epochs, no pretrained weights): phase 1 -> phase 2 -> evaluation on
held-out synthetic CT -> scoring of a real CT slice from ``pydicom-data`` -> a no-learning noise
baseline -> the real-data check (``scripts.tools.realcheck``: real slices never used in training, dose
lowered in the projection domain). It ends by printing TFKT's metrics beside the baseline's, the
real-data check's lines, and the paths of everything it wrote (all under one output folder). Its
model is the one ``python -m scripts score`` uses when the bundle has none of its own."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.bundle import ConfigWorkflow
from scripts import bundle_root, demo_output
from scripts.checkpoints import config_overrides
from scripts.data import ldct_labelled_items
from scripts.handlers import training_curves_png
from scripts.metrics import correlations
from scripts.output_dir import write_bytes_atomic, write_json_atomic
from scripts.synthetic.ct import write_ct_dataset
from scripts.synthetic.natural import write_natural_dataset
from scripts.tools.baseline import baseline_scores
from scripts.tools.realcheck import realcheck_lines, run_realcheck

CONFIG_DIR = bundle_root() / "configs"
DEFAULT_OUTPUT = demo_output()
REAL_CT_SLICE = "693_UNCI.dcm"  # a 512 x 512 head CT slice shipped by pydicom-data
STAMP = "generator.json"


def ensure_dataset(folder: Path, generator: Callable[..., Path], **settings: Any) -> tuple[Path, bool]:
    """Run ``generator(folder, **settings)`` unless ``folder`` already holds its output for these settings.

    Returns the folder and whether it was reused.
    """
    stamp = {"generator": f"{generator.__module__}.{generator.__name__}", **settings}
    if (folder / STAMP).is_file() and json.loads((folder / STAMP).read_text()) == stamp:
        return folder, True
    if folder.exists():
        shutil.rmtree(folder)
    generator(folder, **settings)
    write_json_atomic(folder / STAMP, stamp)
    return folder, False


def real_ct_slice(output_dir: Path) -> Path:
    """A real CT slice from pydicom-data (a DICOM file in HU), copied to ``output_dir`` for the inference config."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file(REAL_CT_SLICE)
    if source is None:
        raise FileNotFoundError(f"{REAL_CT_SLICE} not found: install pydicom-data (pip install pydicom-data)")
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, output_dir / Path(source).name))


class History:
    """Per-epoch training loss and validation metrics of a trainer, for the curves."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._losses: list[float] = []

    def attach(self, trainer, evaluator) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self._losses.append(e.state.output[0]["loss"]))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed, evaluator)

    def _epoch_completed(self, trainer, evaluator) -> None:
        record = {"epoch": trainer.state.epoch, "loss": float(np.mean(self._losses))}
        record.update({k: float(v) for k, v in evaluator.state.metrics.items()})
        self.epochs.append(record)
        scores = "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "epoch")
        print(f"    epoch {record['epoch']}: {scores}", flush=True)
        self._losses = []


def run_phase(config_files: list[str], run_id: str, label: str, **overrides: Any) -> tuple[ConfigWorkflow, History]:
    """Run one of the bundle's workflows in process, with a progress bar and a history of its epochs."""
    workflow = ConfigWorkflow(
        config_files, meta_file=str(CONFIG_DIR / "metadata.json"), logging_file=False, run_id=run_id, **overrides
    )
    workflow.initialize()
    history = History()
    if run_id in ("pretraining", "training"):
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        ProgressBar(desc=label, persist=True).attach(trainer, output_transform=lambda out: {"loss": out[0]["loss"]})
        history.attach(trainer, evaluator)
    logging.disable(logging.INFO)  # the progress bars and the final summary say what matters
    try:
        workflow.run()
    finally:
        logging.disable(logging.NOTSET)
    workflow.finalize()
    return workflow, history


def run_demo(
    output_dir: str | Path = DEFAULT_OUTPUT,
    seed: int = 0,
    n_refs: int = 8,
    natural_size: int = 64,
    n_ct: int = 500,
    n_heldout: int = 150,
    ct_size: int = 512,
    pretrain_epochs: int = 2,
    train_epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    realcheck_size: int | None = None,
) -> dict[str, Any]:
    """Run the demo end to end; returns both metric sets and the output paths.

    ``train_epochs`` defaults to demo.json's ``max_epochs``; ``overrides`` go to every workflow
    (the tests use it for tiny networks); ``realcheck_size`` resamples the real-data check's slices
    (default: their own 512 px).
    """
    out = Path(output_dir).resolve()
    started = time.perf_counter()
    configs = {name: str(CONFIG_DIR / f"{name}.json") for name in ("pretrain", "train", "evaluate", "demo")}

    print("1/7 synthetic data", flush=True)
    natural, reused_natural = ensure_dataset(
        out / "data" / "natural", write_natural_dataset, n_refs=n_refs, size=natural_size, seed=seed
    )
    ct_train, reused_train = ensure_dataset(
        out / "data" / "ct_train", write_ct_dataset, n=n_ct, size=ct_size, seed=seed, layout="train"
    )
    ct_heldout, reused_heldout = ensure_dataset(
        out / "data" / "ct_heldout", write_ct_dataset, n=n_heldout, size=ct_size, seed=seed + 1, layout="test"
    )
    print(
        f"    natural {natural} ({'reused' if reused_natural else 'made'}), CT {ct_train} "
        f"({'reused' if reused_train else 'made'}), held-out CT {ct_heldout} "
        f"({'reused' if reused_heldout else 'made'})",
        flush=True,
    )
    models = out / "models"
    common = {"ckpt_dir": str(models), "seed": seed, "overwrite": True, **(overrides or {})}
    phase2_epochs = {} if train_epochs is None else {"max_epochs": train_epochs}

    print("2/7 phase 1: F learns the quality of distorted photographs", flush=True)
    run_phase(
        [configs["train"], configs["pretrain"], configs["demo"]],
        "pretraining",
        "phase 1",
        dataset_dir=str(natural),
        output_dir=str(out / "pretrain"),
        **common,
        max_epochs=pretrain_epochs,
    )
    print("3/7 phase 2: TFKT learns the simulated radiologists' scores", flush=True)
    _, history = run_phase(
        [configs["train"], configs["demo"]],
        "training",
        "phase 2",
        dataset_dir=str(ct_train),
        output_dir=str(out / "train"),
        f_checkpoint=str(models / "pretrain.pt"),
        **common,
        **phase2_epochs,
    )
    curves = out / "train" / "training_curves.png"
    write_bytes_atomic(curves, training_curves_png(history.epochs))

    print("4/7 evaluation on held-out synthetic CT", flush=True)
    run_phase(
        [configs["train"], configs["demo"], configs["evaluate"]],
        "evaluating",
        "evaluation",
        dataset_dir=str(ct_heldout),
        output_dir=str(out / "eval"),
        **common,
    )
    metrics = json.loads((out / "eval" / "metrics.json").read_text())

    print("5/7 scoring a real CT slice", flush=True)
    slice_dir = out / "real_ct"
    real_ct_slice(slice_dir)
    run_phase(
        [str(CONFIG_DIR / "inference.json")],
        "inference",
        "scoring",
        **config_overrides(models / "model.pt"),
        dataset_dir=str(slice_dir),
        output_dir=str(out / "inference"),
        num_workers=0,
    )

    print("6/7 no-learning baseline on the same held-out slices", flush=True)
    items = ldct_labelled_items(ct_heldout)
    baseline = correlations(baseline_scores(item["image"] for item in items), [item["label"] for item in items])
    write_json_atomic(out / "eval" / "baseline_metrics.json", baseline)

    print("7/7 real-data check: real CT slices never used in training, dose lowered in the projection domain")
    check = run_realcheck(models / "model.pt", out / "realcheck", size=realcheck_size, seed=seed)

    minutes = (time.perf_counter() - started) / 60
    result = {
        "tfkt": metrics,
        "baseline": baseline,
        "realcheck": check,
        "minutes": minutes,
        "outputs": {
            "metrics": str(out / "eval" / "metrics.json"),
            "predictions": str(out / "eval" / "predictions.csv"),
            "scatter": str(out / "eval" / "scatter.png"),
            "training_curves": str(curves),
            "real_ct_scores": str(out / "inference" / "predictions.csv"),
            "realcheck": str(out / "realcheck" / "realcheck.json"),
            "checkpoints": str(models),
        },
    }
    print(
        f"\nTFKT      PLCC {metrics['plcc']:.4f}  SROCC {metrics['srocc']:.4f}  KROCC {metrics['krocc']:.4f}  "
        f"aggregate {metrics['aggregate']:.4f}  MAE {metrics['mae']:.3f}  (n={metrics['n']})"
    )
    print(
        f"baseline  PLCC {baseline['plcc']:.4f}  SROCC {baseline['srocc']:.4f}  KROCC {baseline['krocc']:.4f}  "
        f"aggregate {baseline['aggregate']:.4f}  (noise level in flat regions, no learning)"
    )
    print("\n".join(realcheck_lines(check)))
    for name, path in result["outputs"].items():
        print(f"  {name:16s} {path}")
    print(f"done in {minutes:.1f} min", flush=True)
    return result
