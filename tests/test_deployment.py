"""Deployment wrappers: bundle-based scoring, the MONAI Label task and the MONAI Deploy application.

The MONAI Label and MONAI Deploy tests need those optional packages (``pip install monailabel``,
``pip install monai-deploy-app-sdk highdicom``) and skip with the reason where they are missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from scripts.ct_inputs import index_inputs
from scripts.ct_io import write_dicom_slice
from scripts.score import SliceScorer


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DICOM study folder: a three-slice CT series written out of order, pydicom's CT_small, an MR."""
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(3)
    for z in (3.0, 1.0, 2.0):
        write_dicom_slice(root / f"ct_{int(z)}.dcm", rng.normal(40, 200, (48, 48)), "1.2.3.4", z)
    write_dicom_slice(root / "mr.dcm", rng.normal(500, 50, (48, 48)), "1.2.3.5", 0.0, modality="MR")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), root / "CT_small.dcm")
    return root


@pytest.fixture(scope="module")
def expected_scores(tiny_checkpoint: Path, study: Path) -> dict[str, float]:
    """Each CT file's score from the checkpoint alone (what ``python -m scripts score`` computes)."""
    items, _ = index_inputs([study])
    results = SliceScorer.from_checkpoint(tiny_checkpoint, num_workers=0)(items)
    return {Path(item["image"]).name: score for item, (score, _, _) in zip(items, results, strict=True)}


def test_scorer_from_bundle_config_matches_the_checkpoint(
    tiny_bundle: Path, study: Path, expected_scores: dict[str, float]
) -> None:
    items, errors = index_inputs([study])
    assert [Path(error["path"]).name for error in errors] == ["mr.dcm"]
    results = SliceScorer.from_bundle(tiny_bundle, "cpu", num_workers=0)(items)
    scores = {Path(item["image"]).name: score for item, (score, _, _) in zip(items, results, strict=True)}
    assert scores.keys() == expected_scores.keys()
    assert np.allclose([scores[name] for name in scores], [expected_scores[name] for name in scores], atol=1e-5)
    assert len(set(np.round(list(scores.values()), 5))) > 1


def test_monailabel_task_returns_the_score(tiny_bundle: Path, study: Path, expected_scores: dict[str, float]) -> None:
    pytest.importorskip("monailabel", reason="monailabel is not installed (optional: pip install monailabel)")
    from scripts.monailabel_task import CTQualityTask

    task = CTQualityTask(tiny_bundle, device="cpu")
    assert task.is_valid() and task.info()["output"] == "score" and task.info()["dimension"] == 2
    label, result = task({"image": str(study / "CT_small.dcm")})
    assert label is None and result["n_slices"] == 1 and result["errors"] == []
    assert result["score"] == pytest.approx(expected_scores["CT_small.dcm"], abs=1e-5)
    _, result = task({"image": str(study)})  # MONAI Label passes a DICOM series as its folder
    assert result["n_slices"] == 4 and [Path(error["path"]).name for error in result["errors"]] == ["mr.dcm"]
    assert result["score"] == pytest.approx(np.mean(list(expected_scores.values())), abs=1e-5)
    _, result = task({"image": str(study / "mr.dcm")})
    assert result["score"] is None and result["errors"][0]["reason"] == "modality MR is not CT; only CT is scored"
    assert not CTQualityTask(study).is_valid()


def test_monai_deploy_app_scores_the_ct_series(
    tiny_bundle: Path, study: Path, expected_scores: dict[str, float], tmp_path: Path
) -> None:
    reason = "MONAI Deploy is not installed (optional: pip install monai-deploy-app-sdk highdicom)"
    pytest.importorskip("monai.deploy.core", reason=reason)
    from scripts.deploy import REPORT_NAME, CTQualityApp

    CTQualityApp(study, tmp_path, tiny_bundle).run()
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    series = report["series"]
    assert sorted(entry["n_slices"] for entry in series.values()) == [1, 3]  # the MR series is not selected
    ct_series = series["1.2.3.4"]
    assert sorted(Path(worst["source"]).name for worst in ct_series["worst"]) == ["ct_1.dcm", "ct_2.dcm", "ct_3.dcm"]
    expected_mean = np.mean([expected_scores[f"ct_{z}.dcm"] for z in (1, 2, 3)])
    assert ct_series["mean"] == pytest.approx(expected_mean, abs=1e-5)
    assert report["errors"] == []


def test_monai_deploy_reads_the_torchscript_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    reason = "MONAI Deploy is not installed (optional: pip install monai-deploy-app-sdk highdicom)"
    pytest.importorskip("monai.deploy.core", reason=reason)
    from monai.deploy.operators.monai_bundle_inference_operator import get_bundle_config

    from scripts.export import export_torchscript

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    assert export_torchscript(bundle, bundle / "models" / "model.pt") <= 1e-4
    # what the SDK's own bundle inference operator reads from a TorchScript bundle
    parser = get_bundle_config(str(bundle / "models" / "model.ts"), ["inference"])
    assert parser.get("window") == [-1000.0, 400.0]
    assert parser.get("_meta_")["network_data_format"]["inputs"]["image"]["num_channels"] == 1
