"""Deployment wrappers: bundle-based scoring, the MONAI Label task and app (a served one, over HTTP), and the
MONAI Deploy application.

The MONAI Label and MONAI Deploy tests need those optional packages (``pip install monailabel``,
``pip install monai-deploy-app-sdk highdicom``) and skip with the reason where they are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from scripts.clinical.score import SliceScorer, score_paths
from scripts.ct_inputs import index_inputs
from scripts.ct_io import write_dicom_slice

MONAILABEL_MISSING = "monailabel is not installed (optional: pip install monailabel)"
MONAILABEL_APP = Path(__file__).resolve().parent.parent / "monailabel_app"
SERVER_START_TIMEOUT = 180.0  # seconds: importing torch and MONAI and building the network, on a busy CI machine


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
    from scripts.integrations.monailabel_task import CTQualityTask

    task = CTQualityTask(tiny_bundle, device="cpu")
    assert task.is_valid() and task.info()["output"] == "score" and task.info()["dimension"] == 2
    label, result = task({"image": str(study / "CT_small.dcm")})
    assert label is None and result["n_slices"] == 1 and result["errors"] == []
    # alone here, in a batch of 4 in expected_scores: the tiny head's 50-fold weights magnify the batch's rounding
    # (1.4e-5 in one CI run); scores.csv keeps 4 decimals
    assert result["score"] == pytest.approx(expected_scores["CT_small.dcm"], abs=1e-4)
    _, result = task({"image": str(study)})  # MONAI Label passes a DICOM series as its folder
    assert result["n_slices"] == 4 and [Path(error["path"]).name for error in result["errors"]] == ["mr.dcm"]
    assert result["score"] == pytest.approx(np.mean(list(expected_scores.values())), abs=1e-5)
    _, result = task({"image": str(study / "mr.dcm")})
    assert result["score"] is None and result["errors"][0]["reason"] == "modality MR is not CT; only CT is scored"
    assert not CTQualityTask(study).is_valid()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MONAI Label studies folder: a NIfTI and a NRRD CT volume, and a three-slice CT DICOM series in a sub-folder."""
    root = tmp_path_factory.mktemp("studies")
    rng = np.random.default_rng(7)
    volume = rng.normal(40, 200, (40, 40, 4)).astype(np.float32)
    volume[:, :5] = -1000.0  # air in front of the body: CT in HU
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), root / "chest.nii.gz")
    lps = {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.7, 3.0])}  # as 3D Slicer saves
    abdomen = rng.normal(40, 200, (40, 40, 5)).round().astype(np.int16)
    abdomen[:, :5] = -1000  # air in front of the body
    nrrd.write(str(root / "abdomen.nrrd"), abdomen, lps)
    for z in (2.0, 3.0, 1.0):
        write_dicom_slice(root / "series_a" / f"im{int(z)}.dcm", rng.normal(40, 150, (40, 40)), "1.2.3.9", z)
    return root


def monailabel_app_class() -> type:
    """The app class of ``monailabel_app/main.py``, loaded the way MONAI Label's server loads it."""
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    app_class = get_class_of_subclass_from_file("main", str(MONAILABEL_APP / "main.py"), "MONAILabelApp")
    assert app_class is not None and app_class.__name__ == "CTQualityApp"
    return app_class


def test_monailabel_app_finds_images_series_folders_and_the_bundle(
    tiny_bundle: Path, studies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("monailabel", reason=MONAILABEL_MISSING)
    from fastapi import HTTPException
    from monailabel.config import settings
    from monailabel.interfaces.exception import MONAILabelException

    monkeypatch.setattr(settings, "MONAI_LABEL_SESSIONS", False)
    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    app_class = monailabel_app_class()
    folder = shutil.copytree(studies, tmp_path / "studies")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    conf = {"bundle_dir": str(tiny_bundle), "device": "cpu", "preload": "false"}
    app = app_class(app_dir=str(tmp_path / "app"), studies=str(folder), conf=conf)
    store = app.datastore()
    assert sorted(store.list_images()) == ["CT_small", "abdomen", "chest", "series_a"]  # not labels/ (MONAI Label's)
    assert store.get_image_uri("series_a") == os.path.realpath(folder / "series_a")
    assert store.get_image_uri("chest") == os.path.realpath(folder / "chest.nii.gz")
    assert app.info()["models"]["ct_iqa"]["output"] == "score"
    report = score_paths([folder / "abdomen.nrrd"], tmp_path / "abdomen", app.checkpoint, device="cpu")
    (abdomen,) = report["series"].values()  # a NRRD volume, as 3D Slicer users keep them, scored like `score` does
    answer = app.infer({"model": "ct_iqa", "image": "abdomen"})["params"]
    assert answer["n_slices"] == abdomen["n_slices"] == 5
    assert answer["score"] == pytest.approx(abdomen["mean"], abs=1e-4)
    assert app.checkpoint == tiny_bundle / "models" / "model.pt"
    with pytest.raises(HTTPException) as missing:
        app.infer({"model": "ct_iqa", "image": "no_such_image"})
    assert missing.value.status_code == 404
    write_dicom_slice(folder / "series_b" / "im1.dcm", np.zeros((40, 40)), "1.2.3.10")  # added while serving
    assert app.datastore().get_image_uri("series_b") == ""
    assert app.infer({"model": "ct_iqa", "image": "series_b"})["params"]["n_slices"] == 1  # found after a refresh

    files_only = app_class(app_dir=str(tmp_path / "app"), studies=str(folder), conf={**conf, "series_folders": "no"})
    assert sorted(files_only.datastore().list_images()) == ["CT_small", "abdomen", "chest"]
    with pytest.raises(MONAILabelException, match="no checkpoint at"):
        app_class(app_dir=str(tmp_path / "app"), studies=str(folder), conf={**conf, "checkpoint": str(tmp_path)})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_monailabel_server_scores_over_http(tiny_bundle: Path, studies: Path, tmp_path: Path) -> None:
    """MONAI Label's server (``start_server --app monailabel_app``, in a process of its own) serves ``ct_iqa``: the
    score of a NIfTI volume and of a DICOM series folder, as ``python -m scripts score`` computes them."""
    pytest.importorskip("monailabel", reason=MONAILABEL_MISSING)
    import requests  # a dependency of monailabel

    folder = Path(os.path.realpath(shutil.copytree(studies, tmp_path / "studies")))  # the datastore writes there too
    checkpoint = tiny_bundle / "models" / "model.pt"
    expected = {  # image id: the report's series, as `python -m scripts score FILE --ckpt CHECKPOINT` writes them
        image_id: score_paths([folder / name], tmp_path / image_id, checkpoint, device="cpu", num_workers=0)["series"]
        for image_id, name in (("chest", "chest.nii.gz"), ("series_a", "series_a"))
    }
    port = free_port()
    command = [
        sys.executable, str(MONAILABEL_APP / "main.py"), "start_server",  # `monailabel start_server`, under pydicom 3
        "--app", str(MONAILABEL_APP), "--studies", str(folder), "--host", "127.0.0.1", "--port", str(port),
        "--conf", "bundle_dir", str(tiny_bundle), "--conf", "device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        start = time.monotonic()
        while True:
            try:
                info = requests.get(f"{base}/info/", timeout=5).json()
                break
            except requests.ConnectionError:
                tail = log.read_text(errors="replace")[-4000:]
                assert server.poll() is None, f"the server exited ({server.returncode}):\n{tail}"
                assert time.monotonic() - start < SERVER_START_TIMEOUT, f"no answer in time:\n{tail}"
                time.sleep(0.5)
        print(f"server answered after {time.monotonic() - start:.1f} s")
        assert info["models"]["ct_iqa"]["output"] == "score"

        for image_id, series in expected.items():
            answer = requests.post(f"{base}/infer/ct_iqa", params={"image": image_id}, timeout=300)
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert result["errors"] == [] and list(result["series"]) == list(series)
            ((name, summary),) = series.items()
            assert result["n_slices"] == summary["n_slices"] == {"chest": 4, "series_a": 3}[image_id]
            assert result["score"] == pytest.approx(summary["mean"], abs=1e-4)
            assert result["series"][name]["min"] == pytest.approx(summary["min"], abs=1e-4)
        # a client without the server's files uploads the image instead
        upload = {"file": ("chest.nii.gz", (folder / "chest.nii.gz").read_bytes())}
        answer = requests.post(f"{base}/infer/ct_iqa", files=upload, timeout=300)
        assert answer.status_code == 200, answer.text
        (chest,) = expected["chest"].values()
        assert answer.json()["score"] == pytest.approx(chest["mean"], abs=1e-4)
        answer = requests.post(f"{base}/infer/ct_iqa", params={"image": "no_such_image"}, timeout=60)
        assert answer.status_code == 404 and "no_such_image" in answer.json()["detail"]
    finally:  # the server and anything it started: its own process group
        for stop, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(server.pid, stop)
                server.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def test_monai_deploy_app_scores_the_ct_series(
    tiny_bundle: Path, study: Path, expected_scores: dict[str, float], tmp_path: Path
) -> None:
    reason = "MONAI Deploy is not installed (optional: pip install monai-deploy-app-sdk highdicom)"
    pytest.importorskip("monai.deploy.core", reason=reason)
    from scripts.integrations.deploy import REPORT_NAME, CTQualityApp

    CTQualityApp(study, tmp_path, tiny_bundle).run()
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    series = report["series"]
    assert sorted(entry["n_slices"] for entry in series.values()) == [1, 3]  # the MR series is not selected
    ct_series = series["1.2.3.4"]
    assert sorted(Path(worst["source"]).name for worst in ct_series["worst"]) == ["ct_1.dcm", "ct_2.dcm", "ct_3.dcm"]
    expected_mean = np.mean([expected_scores[f"ct_{z}.dcm"] for z in (1, 2, 3)])
    assert ct_series["mean"] == pytest.approx(expected_mean, abs=1e-4)  # 3 slices a batch here, 4 in expected_scores
    assert report["errors"] == []


def test_monai_deploy_reads_the_torchscript_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    reason = "MONAI Deploy is not installed (optional: pip install monai-deploy-app-sdk highdicom)"
    pytest.importorskip("monai.deploy.core", reason=reason)
    from monai.deploy.operators.monai_bundle_inference_operator import get_bundle_config
    from scripts.checkpoints import read_settings
    from scripts.tools.export import export_torchscript

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    checkpoint = bundle / "models" / "model.pt"
    assert export_torchscript(bundle, checkpoint, read_settings(checkpoint)) <= 1e-4
    # what the SDK's own bundle inference operator reads from a TorchScript bundle
    parser = get_bundle_config(str(bundle / "models" / "model.ts"), ["inference"])
    assert parser.get("window") == [-1000.0, 400.0]
    assert parser.get("_meta_")["network_data_format"]["inputs"]["image"]["num_channels"] == 1
