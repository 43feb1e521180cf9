"""``torchrun --nproc_per_node N -m scripts score``: the series shared out, one report by rank 0, the same as one
process writes (two gloo processes on the CPU)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
from scripts.clinical.score import share_series
from scripts.ct_io import write_dicom_slice

from tests.conftest import REPO_ROOT


def _study(root: Path) -> list[str]:
    """Three DICOM series of 5, 3 and 2 slices, a NIfTI volume of 4 and an unreadable file."""
    rng = np.random.default_rng(0)
    for number, count in enumerate((5, 3, 2)):
        for k in range(count):
            hu = rng.normal(40.0, 30.0 * (number + 1), (64, 64))
            write_dicom_slice(root / f"series{number}" / f"{k}.dcm", hu, f"1.2.3.{number}", position=float(k))
    volume = rng.normal(0.0, 50.0, (64, 64, 4)).astype(np.float32)
    volume[:, :8] = -1000.0  # air in front of the body: CT in HU
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), root / "volume.nii.gz")
    (root / "broken.dcm").write_bytes(b"DICM" * 100)
    return [str(root)]


def _score(command: list[str], inputs: list[str], output: Path, checkpoint: Path) -> dict:
    arguments = [*inputs, "--output_dir", str(output), "--ckpt", str(checkpoint), "--device", "cpu"]
    arguments += ["--num_workers", "0"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "summary.json").read_text())


def _rows(output: Path) -> list[dict[str, str]]:
    with open(output / "scores.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_two_processes_write_the_report_one_process_writes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    inputs = _study(tmp_path / "study")
    alone = _score([sys.executable, "-m", "scripts", "score"], inputs, tmp_path / "one", tiny_checkpoint)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    shared = _score([*torchrun, "-m", "scripts", "score"], inputs, tmp_path / "two", tiny_checkpoint)
    assert (alone["processes"], alone["slices_per_process"]) == (1, [14])
    assert shared["processes"] == 2 and sorted(shared["slices_per_process"]) == [7, 7]  # 5+2 | 3+4 by series
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [(r["source"], r["slice_index"]) for r in one] == [(r["source"], r["slice_index"]) for r in two]
    assert all(abs(float(a["score"]) - float(b["score"])) <= 1e-3 for a, b in zip(one, two, strict=True))
    assert alone["errors"] == shared["errors"] and len(alone["errors"]) == 1
    assert alone["series"].keys() == shared["series"].keys()
    for name, entry in alone["series"].items():
        other = shared["series"][name]
        assert (entry["plot"], entry["n_slices"]) == (other["plot"], other["n_slices"])
        assert abs(entry["mean"] - other["mean"]) <= 1e-3
    plots = sorted(path.name for path in (tmp_path / "two" / "series").iterdir())
    assert plots == sorted(path.name for path in (tmp_path / "one" / "series").iterdir()) and len(plots) == 4


def test_series_are_shared_whole_largest_first_and_slice_images_one_by_one() -> None:
    counts = (("a", 5), ("b", 3), ("c", 2), ("d", 4))
    items = [{"series": name, "image": f"{name}{k}.dcm"} for name, count in counts for k in range(count)]
    shares = share_series(items, 2)
    assert [len(share) for share in shares] == [7, 7]
    assert all(len({items[index]["series"] for index in share}) == 2 for share in shares)
    assert share_series(items, 1) == [list(range(14))]
    assert [len(share) for share in share_series(items, 5)] == [5, 4, 3, 2, 0]
    images = [{"series": "/data/ldctiqa/image", "image": f"/data/ldctiqa/image/{k:04d}.tif"} for k in range(9)]
    assert [len(share) for share in share_series(images, 2)] == [5, 4]  # a folder of independent slices, shared out
    assert [len(share) for share in share_series(items + images, 2)] == [12, 11]


def test_an_unusable_output_folder_stops_every_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Rank 0 finds the output folder unusable before scoring; the other rank stops with it instead of waiting."""
    (tmp_path / "taken").write_text("a file, not a folder")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "scripts", "score", str(tmp_path), "--output_dir", str(tmp_path / "taken")]
    result = subprocess.run(
        [*command, "--ckpt", str(tiny_checkpoint), "--device", "cpu", "--num_workers", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.count("taken") >= 2  # both ranks print the one-line reason
