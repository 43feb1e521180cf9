"""Reader processes of inference and scoring (``num_workers``, ``scripts.engines.reader_processes``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.clinical.score import SliceScorer
from scripts.engines import reader_processes


def test_reader_processes() -> None:
    """``auto`` reads in the network's process on a CPU (whose cores the network uses); numbers are taken as given."""
    assert reader_processes("auto", "cpu") == 0 and reader_processes(" AUTO ", torch.device("cpu")) == 0
    assert reader_processes(3, "cpu") == 3 and reader_processes("0", torch.device("cpu")) == 0
    for bad in (-1, 1.5, "many", None):
        with pytest.raises(ValueError, match="num_workers must be a number of processes"):
            reader_processes(bad, "cpu")


def test_scoring_reads_in_process_on_a_cpu_by_default(tiny_checkpoint: Path) -> None:
    assert SliceScorer.from_checkpoint(tiny_checkpoint, "cpu").num_workers == 0
    assert SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", num_workers=2).num_workers == 2
