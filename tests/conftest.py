"""Shared fixtures: tiny datasets in both layouts, tiny networks, and trained checkpoints.

The datasets come from the demo's own generators (``scripts.synthetic.natural``, ``scripts.synthetic.ct``)
at tiny sizes, made once per test session in a temporary folder; no test downloads anything.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigWorkflow
from scripts.checkpoints import config_overrides, save_checkpoint, settings_path
from scripts.networks import build_network
from scripts.synthetic.ct import write_ct_dataset, write_scored_ct_dataset
from scripts.synthetic.natural import write_natural_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
# what score and the inference config say of a file that is not DICOM, a volume or a slice image
NOT_DICOM = (
    "not a DICOM file (no DICOM elements found); the inputs scored are DICOM, NIfTI (.nii, .nii.gz), NRRD (.nrrd), "
    "MetaImage (.mha, .mhd) and slices (.tif, .tiff, .png, .jpg, .jpeg, .bmp)"
)
CONFIG_DIR = REPO_ROOT / "bundle" / "configs"
TRAIN_CONFIG = str(CONFIG_DIR / "train.json")
PRETRAIN_CONFIG = [TRAIN_CONFIG, str(CONFIG_DIR / "pretrain.json")]  # an overlay on train.json
EVALUATE_CONFIGS = [TRAIN_CONFIG, str(CONFIG_DIR / "evaluate.json")]
CALIBRATE_CONFIGS = [*EVALUATE_CONFIGS, str(CONFIG_DIR / "calibrate.json")]  # an overlay on evaluation
INFERENCE_CONFIG = str(CONFIG_DIR / "inference.json")
METADATA = str(CONFIG_DIR / "metadata.json")

# timm networks small enough to train in seconds on a CPU: a test EfficientNet and a one-block SwinV2
TINY_NETWORKS: dict[str, Any] = {
    "f_name": "test_efficientnet",
    "s_name": "swinv2_tiny_window8_256",
    "s_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "side": 32,
}
# the same, as workflow overrides: small images, no downloads, CPU, no worker processes
TINY_OVERRIDES: dict[str, Any] = {
    **TINY_NETWORKS,
    "pretrained": False,
    "image_size": 64,
    "batch_size": 4,
    "num_workers": 0,
    "device": torch.device("cpu"),
}


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle's commands run from the repository root; so do the tests."""
    monkeypatch.chdir(REPO_ROOT)


@pytest.fixture(scope="session")
def ldct_train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LDCTIQA training layout: image/NNNN.tif + train.json, 32 simulated low-dose slices of 64 px."""
    return write_ct_dataset(tmp_path_factory.mktemp("ldct_train"), n=32, size=64, seed=0)


@pytest.fixture(scope="session")
def ldct_test_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LDCTIQA test layout: images/testNNN.tiff + test.json, 12 simulated low-dose slices of 64 px."""
    return write_ct_dataset(tmp_path_factory.mktemp("ldct_test"), n=12, size=64, seed=1, layout="test")


@pytest.fixture(scope="session")
def kadid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KADID-10k layout: 4 references x 2 distortion types (01 blur, 11 white noise) x 5 levels."""
    return write_natural_dataset(tmp_path_factory.mktemp("kadid"), n_refs=4, size=64, seed=0, kinds=(1, 11))


@pytest.fixture(scope="session")
def scored_ct_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reader study in the scored-CT layout: 12 patients x 6 slices of 64 px, DICOM series folders (even patients)
    and NIfTI volumes (odd), scored per slice; returns labels.csv (labels.json beside it holds the same rows)."""
    return write_scored_ct_dataset(tmp_path_factory.mktemp("scored_ct"), patients=12, slices=6, size=64, seed=0)


def decimal_comma(cell: str) -> str:
    """A CSV cell as a spreadsheet writes it where the decimal mark is a comma: "4,57" for 4.57."""
    return cell.replace(".", ",") if re.fullmatch(r"\d+\.\d+", cell) else cell


def make_workflow(config_file: str | list[str], workflow_type: str, **overrides: Any) -> ConfigWorkflow:
    """A bundle workflow as ``monai.bundle run`` builds it, with the tiny settings unless overridden."""
    workflow = ConfigWorkflow(
        config_file, meta_file=METADATA, logging_file=False, workflow_type=workflow_type, **overrides
    )
    workflow.initialize()
    return workflow


def inference_workflow(
    checkpoint: Path, dataset_dir: Path, output_dir: Path, config: str | list[str] = INFERENCE_CONFIG, **overrides: Any
) -> ConfigWorkflow:
    """The inference workflow on the CPU, reading in this process, with ``checkpoint`` and the network settings
    recorded beside it (``overrides`` come after them)."""
    ids = {"dataset_dir": str(dataset_dir), "output_dir": str(output_dir), "device": torch.device("cpu")}
    return make_workflow(config, "inference", **{**config_overrides(checkpoint), **ids, "num_workers": 0, **overrides})


@pytest.fixture(scope="session")
def pretrained_bundle(tmp_path_factory: pytest.TempPathFactory, kadid_dir: Path) -> Path:
    """Phase 1 on the tiny KADID layout: the folder holding ``pretrain.pt`` (grey input)."""
    root = tmp_path_factory.mktemp("phase1")
    workflow = make_workflow(
        PRETRAIN_CONFIG,
        "train",
        **{**TINY_OVERRIDES, "dataset_dir": str(kadid_dir), "ckpt_dir": str(root), "output_dir": str(root / "out")},
        max_epochs=2,
    )
    workflow.run()
    workflow.finalize()
    assert (root / "pretrain.pt").is_file()
    return root


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory, ldct_train_dir: Path, pretrained_bundle: Path) -> Path:
    """Phase 2 from the phase-1 checkpoint on the tiny LDCTIQA layout: the folder holding ``model.pt``."""
    root = tmp_path_factory.mktemp("phase2")
    workflow = make_workflow(
        TRAIN_CONFIG,
        "train",
        **TINY_OVERRIDES,
        dataset_dir=str(ldct_train_dir),
        ckpt_dir=str(root),
        output_dir=str(root / "out"),
        f_checkpoint=str(pretrained_bundle / "pretrain.pt"),
        max_epochs=3,
        # raw outputs: this tiny model's vary by about 1e-3, and the line that stretches them onto the scores
        # (x 100 and more) would stretch bf16's rounding with them (tests/test_calibration.py trains calibrated ones)
        calibrate=False,
    )
    workflow.run()
    workflow.finalize()
    assert (root / "model.pt").is_file()
    return root


def scoring_tiny_network(in_channels: int = 1) -> torch.nn.Module:
    """An untrained tiny TFKT (64 px) whose head is rescaled so that scores land around 2 and differ between slices
    (an untrained head gives values just below 0 for every slice, clipped to 0)."""
    network = build_network(**TINY_NETWORKS, in_channels=in_channels).eval()
    head = network.s.model.head.fc
    images = torch.rand(4, in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.weight.mul_(50.0)
        head.bias.sub_(network(images).mean() - 2.0)
    return network


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny TFKT checkpoint at 64 px (``scoring_tiny_network``): enough to run scoring, export and
    deployment code."""
    network = scoring_tiny_network()
    return save_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint") / "model.pt", network, image_size=64)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder as deployment code sees one: the repository's configs and the tiny checkpoint as model.pt."""
    root = tmp_path_factory.mktemp("tiny_bundle")
    shutil.copytree(CONFIG_DIR, root / "configs")
    copy_checkpoint(tiny_checkpoint, root / "models" / "model.pt")
    return root


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has compiled in this process so far (a test takes the difference)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A checkpoint and the settings file beside it (``model.json``), copied to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    shutil.copyfile(settings_path(source), settings_path(target))
    return target
