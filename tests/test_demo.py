"""The embedded demo, end to end at tiny sizes, and its reuse of already-made datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scripts.synthetic.ct import write_ct_dataset
from scripts.tools.demo import ensure_dataset, run_demo

from tests.conftest import TINY_NETWORKS


def test_demo_runs_every_step_and_reports_both_metric_sets(tmp_path: Path, capsys) -> None:
    result = run_demo(
        tmp_path / "demo",
        n_refs=2,
        natural_size=48,
        n_ct=30,
        n_heldout=10,
        ct_size=64,
        pretrain_epochs=1,
        train_epochs=1,
        overrides={**TINY_NETWORKS, "image_size": 64, "batch_size": 4},
        realcheck_size=96,
    )
    printed = capsys.readouterr().out
    assert "TFKT      PLCC" in printed and "baseline  PLCC" in printed
    assert "real-data check" in printed and printed.count("baseline  Spearman") == 3
    assert "  across slices     model  Spearman" in printed
    assert set(result["realcheck"]) >= {"noise", "views", "pooled"}
    for name in ("plcc", "srocc", "krocc", "aggregate"):
        assert 0.0 <= result["baseline"][name] <= 3.0 and name in result["tfkt"]
    assert result["tfkt"]["n"] == result["baseline"]["n"] == 10
    for path in result["outputs"].values():
        assert Path(path).exists(), path
        assert Path(path).resolve().is_relative_to((tmp_path / "demo").resolve())  # everything under one folder
    with open(result["outputs"]["real_ct_scores"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["file"], row["slice"]) for row in rows] == [("693_UNCI.dcm", "0")]
    assert 0.0 <= float(rows[0]["prediction"]) <= 4.0
    assert Path(result["outputs"]["training_curves"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(result["outputs"]["metrics"]).read_text())["n"] == 10


def test_datasets_are_reused_only_for_the_same_settings(tmp_path: Path) -> None:
    folder, reused = ensure_dataset(tmp_path / "ct", write_ct_dataset, n=6, size=32, seed=0)
    first = (folder / "train.json").stat().st_mtime_ns
    assert not reused
    folder, reused = ensure_dataset(tmp_path / "ct", write_ct_dataset, n=6, size=32, seed=0)
    assert reused and (folder / "train.json").stat().st_mtime_ns == first
    folder, reused = ensure_dataset(tmp_path / "ct", write_ct_dataset, n=5, size=32, seed=0)
    assert not reused and len(json.loads((folder / "train.json").read_text())) == 5
