"""Reader processes of inference and scoring (``num_workers``, ``scripts.engines.reader_processes``)."""

from __future__ import annotations

import multiprocessing
import os
from itertools import chain
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from scripts.clinical.score import SliceScorer
from scripts.ct_inputs import PARALLEL_INDEX_FILES, index_inputs
from scripts.ct_io import write_dicom_slice
from scripts.engines import GPU_READERS, IN_PROCESS_SLICES, reader_processes


def test_reader_processes() -> None:
    """``auto`` reads in the network's process on a CPU (whose cores the network uses) and for short runs on a GPU
    (whose readers take longer to start than a short run takes to read); numbers are taken as given."""
    assert reader_processes("auto", "cpu") == 0 and reader_processes(" AUTO ", torch.device("cpu")) == 0
    assert reader_processes("auto", "cpu", slices=10**6) == 0
    gpu_readers = min(GPU_READERS, os.cpu_count() or 1)
    assert reader_processes("auto", "cuda") == gpu_readers == reader_processes("auto", "cuda:0", IN_PROCESS_SLICES + 1)
    assert reader_processes("auto", "cuda", IN_PROCESS_SLICES) == 0
    assert reader_processes(3, "cpu") == 3 and reader_processes("0", torch.device("cpu")) == 0
    assert reader_processes(3, "cuda", slices=1) == 3
    for bad in (-1, 1.5, "many", None, True):
        with pytest.raises(ValueError, match="num_workers must be a number of processes"):
            reader_processes(bad, "cpu")


def test_scoring_reads_in_process_on_a_cpu_by_default(tiny_checkpoint: Path) -> None:
    assert SliceScorer.from_checkpoint(tiny_checkpoint, "cpu").readers(10**6) == 0
    assert SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", num_workers=2).readers() == 2
    with pytest.raises(ValueError, match="num_workers must be a number of processes"):
        SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", num_workers="many")


def test_many_headers_are_indexed_by_processes_with_the_same_items_and_reasons(tmp_path: Path) -> None:
    """A long series indexed by reading processes (as a GPU run does) gives the items and reasons of one process,
    in the same order, a bad file among them."""
    rng = np.random.default_rng(0)
    for index in range(PARALLEL_INDEX_FILES + 8):
        write_dicom_slice(tmp_path / f"{index:04d}.dcm", rng.normal(0, 300, (8, 8)), "1.2.3.4", 60.0 - index)
    (tmp_path / "0100.dcm").write_bytes(b"not a DICOM file at all")
    alone = index_inputs([tmp_path])
    assert len(alone[0]) == PARALLEL_INDEX_FILES + 7 and [error["path"] for error in alone[1]] == [
        str(tmp_path / "0100.dcm")
    ]
    assert alone[0][0]["image"] == str(tmp_path / f"{PARALLEL_INDEX_FILES + 7:04d}.dcm")  # by position
    assert index_inputs([tmp_path], processes=2) == alone


def test_reader_processes_start_with_the_scorer_and_serve_every_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Readers (and as many header processes) are started once, with the scorer, not for each run; a volume
    rewritten at the same path between runs is read anew by them, as a fresh scorer reads it."""
    volume = np.random.default_rng(3).normal(0, 200, (40, 40, 6)).astype(np.float32)
    volume[:, :4] = -1000.0  # air: CT in HU
    path = tmp_path / "vol.nii"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    before = {child.pid for child in multiprocessing.active_children()}
    scorer = SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", batch_size=4, num_workers=2)
    started = {child.pid for child in multiprocessing.active_children()} - before
    assert len(started) == 4  # 2 readers, 2 header processes
    first = scorer.index_and_score([path])[2]
    volume[:, 4:] = np.clip(volume[:, 4:] * 3, -1000, 3000)  # other pixels, same path and shape
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)  # a later modification time, as a new write has
    second = scorer.index_and_score([path])[2]
    assert {child.pid for child in multiprocessing.active_children()} - before == started
    fresh = SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", batch_size=4, num_workers=0).index_and_score([path])[2]
    assert len(first) == len(second) == 6 and all(score is not None for score, _, _ in first + second)
    assert np.allclose([score for score, _, _ in second], [score for score, _, _ in fresh], atol=1e-5)
    assert not np.allclose([score for score, _, _ in first], [score for score, _, _ in second], atol=1e-3)


def test_a_run_started_while_another_reads_gets_readers_of_its_own(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The scorer's readers serve one run at a time: a second run started while the first is reading (here a
    second iterator; in a server, another thread) is read by readers of its own, and neither run's slices mix."""
    rng = np.random.default_rng(4)
    for series in ("1.1", "2.2"):
        for index in range(6):
            hu = rng.normal(0, 100 * (1 + index), (24, 24))
            hu[:4] = -1000.0
            write_dicom_slice(tmp_path / series / f"{index}.dcm", hu, series, float(index))
    scorer = SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", batch_size=4, num_workers=2)
    items = {series: scorer.index([tmp_path / series])[0] for series in ("1.1", "2.2")}
    alone = {series: scorer(items[series]) for series in items}
    first = scorer.batches([items["1.1"]], len(items["1.1"]))
    opening = next(first)  # the first run holds the scorer's readers
    assert not scorer.reader_pool.busy.acquire(blocking=False)
    meanwhile = scorer._score_batches(scorer.batches([items["2.2"]], len(items["2.2"])))
    rest = scorer._score_batches(chain([opening], first))
    assert scorer.reader_pool.busy.acquire(blocking=False)  # released when the first run ended
    scorer.reader_pool.busy.release()
    for got, expected in ((meanwhile, alone["2.2"]), (rest, alone["1.1"])):
        assert np.allclose([score for score, _, _ in got], [score for score, _, _ in expected], atol=1e-6)
    assert not np.allclose([score for score, _, _ in alone["1.1"]], [score for score, _, _ in alone["2.2"]])
