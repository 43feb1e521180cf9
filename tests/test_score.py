"""Scoring real-world CT inputs: DICOM series and odd files, NIfTI volumes, rendered slices."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, RTStructureSetStorage, generate_uid

from scripts.checkpoints import save_checkpoint
from scripts.networks import build_network
from scripts.score import read_dicom, score_paths
from tests.conftest import REPO_ROOT, TINY_NETWORKS


def write_dicom(path: Path, modality: str, series: str, z: float, pixels: np.ndarray | None = None) -> Path:
    """A minimal DICOM file as a scanner would write it (uint16 with rescale to HU)."""
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage, "RTSTRUCT": RTStructureSetStorage}[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series, "1.2.3"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [0, 0, z]
        ds.PixelData = (pixels + 1024).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    network = build_network(**TINY_NETWORKS).eval()
    return save_checkpoint(tmp_path_factory.mktemp("score") / "model.pt", network, image_size=64)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, ldct_test_dir: Path) -> Path:
    """A CT series written out of order, an MR, an RTSTRUCT, a corrupt file, a NIfTI volume and a TIFF slice."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for z in (30.0, 10.0, 20.0):  # file names not in slice order
        write_dicom(root / f"ct_{int(z)}.dcm", "CT", "1.2.3.4", z, rng.normal(40, 20, (48, 48)))
    write_dicom(root / "mr.dcm", "MR", "1.2.3.5", 0.0, rng.normal(500, 50, (48, 48)))
    write_dicom(root / "rtstruct.dcm", "RTSTRUCT", "1.2.3.6", 0.0)
    (root / "corrupt.dcm").write_bytes(b"\x00" * 50 + b"garbage")
    nibabel.save(nibabel.Nifti1Image(rng.normal(0, 30, (40, 40, 5)).astype(np.float32), np.eye(4)), root / "vol.nii.gz")
    source = sorted((ldct_test_dir / "images").glob("*.tiff"))[0]
    tifffile.imwrite(root / "slice.tif", tifffile.imread(source))
    return root


def test_mixed_folder_scores_ct_and_reports_the_rest(checkpoint: Path, mixed_folder: Path, tmp_path: Path) -> None:
    summary = score_paths([mixed_folder], tmp_path, ckpt=checkpoint, device="cpu")
    assert {name: entry["n_slices"] for name, entry in summary["series"].items()} == {
        "1.2.3.4": 3,
        str(mixed_folder / "slice.tif"): 1,
        str(mixed_folder / "vol.nii.gz"): 5,
    }
    reasons = {Path(error["path"]).name: error["reason"] for error in summary["errors"]}
    assert set(reasons) == {"mr.dcm", "rtstruct.dcm", "corrupt.dcm"}
    assert reasons["mr.dcm"] == "modality MR is not CT; only CT is scored"
    assert reasons["rtstruct.dcm"].startswith("no pixel data")
    assert reasons["corrupt.dcm"].startswith("not a DICOM file") or "readable" in reasons["corrupt.dcm"]
    with open(tmp_path / "scores.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    ct_rows = [row for row in rows if row["series"] == "1.2.3.4"]
    assert [Path(row["source"]).name for row in ct_rows] == ["ct_10.dcm", "ct_20.dcm", "ct_30.dcm"]  # by position
    assert len(rows) == 9 and all(0.0 <= float(row["score"]) <= 4.0 for row in rows)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    series = summary["series"]["1.2.3.4"]
    assert series["min"] <= series["mean"] <= series["max"] and len(series["worst"]) == 3
    plots = [entry["plot"] for entry in summary["series"].values()]
    assert len(set(plots)) == 3 and all((tmp_path / plot).read_bytes()[:4] == b"\x89PNG" for plot in plots)


def test_dicom_goes_to_hu_then_through_the_window(checkpoint: Path, tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "flat.dcm", "CT", "9.9", 0.0, np.full((32, 32), 40.0))  # 40 HU everywhere
    uid, positions, slices = read_dicom(path, window=(-1000.0, 400.0))
    assert (uid, positions) == ("9.9", [0.0])
    assert np.allclose(slices[0], 1040.0 / 1400.0)
    assert np.allclose(read_dicom(path, window=(0.0, 80.0))[2][0], 0.5)
    with pytest.raises(ValueError, match="window must be two HU values"):
        score_paths([path], tmp_path, ckpt=checkpoint, window=(400, -1000))


def test_command_exits_non_zero_when_nothing_is_scored(checkpoint: Path, mixed_folder: Path, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "scripts",
        "score",
        str(mixed_folder / "mr.dcm"),
        str(mixed_folder / "corrupt.dcm"),
    ]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path), "--ckpt", str(checkpoint), "--device", "cpu"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "scored 0 slices in 0 series; 2 inputs not scored" in result.stdout
    assert len(json.loads((tmp_path / "summary.json").read_text())["errors"]) == 2


def test_real_and_enhanced_ct_from_pydicom(checkpoint: Path, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("CT_small.dcm", "eCT_Supplemental.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    summary = score_paths([folder], tmp_path / "out", ckpt=checkpoint, device="cpu")
    assert sorted(entry["n_slices"] for entry in summary["series"].values()) == [1, 2]  # the enhanced CT's two frames
    assert summary["errors"] == []


def test_dicom_without_preamble_or_file_meta(checkpoint: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "full.dcm", "CT", "7.7", 0.0, np.full((32, 32), 40.0)))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "raw.dcm", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw.dcm").read_bytes()[128:132] != b"DICM"
    uid, _, slices = read_dicom(tmp_path / "raw.dcm", window=(-1000.0, 400.0))
    assert uid == "7.7" and np.allclose(slices[0], 1040.0 / 1400.0)
