"""Fuzzing: valid DICOM (uncompressed, RLE, JPEG 2000), NIfTI and TIFF files, mutated in their headers and bytes,
each end scored or in ``errors``, within a time bound, without a crash.

CI runs a fixed set of 100 examples per kind (``derandomize``). For thousands of fresh random ones:

    FUZZ_EXAMPLES=3000 python -m pytest -q tests/test_fuzz.py

A failure prints the mutation and a ``@reproduce_failure`` line to paste above the test.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, RLELossless

from scripts.ct_inputs import LoadCTSliced, index_inputs
from scripts.ct_io import write_dicom_slice
from scripts.output_dir import printable_tree

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))  # per kind: 500 in all in CI
SECONDS_PER_FILE = 10  # index and read one mutated file; a valid one takes milliseconds
SUFFIXES = {"dicom": ".dcm", "dicom_rle": ".dcm", "dicom_j2k": ".dcm", "nifti": ".nii", "tiff": ".tif"}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every odd element it meets
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize="FUZZ_EXAMPLES" not in os.environ,  # CI: the same examples every run
    deadline=None,  # the alarm below bounds the time; hypothesis' deadline is too fragile on a busy machine
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _hu(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).normal(40.0, 300.0, size=shape).clip(-1024, 3000)


def _valid_files(folder: Path) -> dict[str, bytes]:
    """One small valid file of each kind, as bytes."""
    dicom = write_dicom_slice(folder / "seed.dcm", _hu((16, 16)), "1.2.3.4")
    compressed = {}
    for kind, syntax, side in (("dicom_rle", RLELossless, 16), ("dicom_j2k", JPEG2000Lossless, 64)):
        ds = pydicom.dcmread(write_dicom_slice(folder / f"{side}.dcm", _hu((side, side)), "1.2.3.4"))
        ds.compress(syntax)  # JPEG 2000's default 6 resolutions need 32 px or more
        compressed[kind] = folder / f"{kind}.dcm"
        ds.save_as(compressed[kind], enforce_file_format=True)
    nifti = folder / "seed.nii"
    nibabel.save(nibabel.Nifti1Image(_hu((16, 16, 3)).astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0])), nifti)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.random.default_rng(1).random((16, 16), dtype=np.float32))
    files = {"dicom": dicom.read_bytes(), "nifti": nifti.read_bytes(), "tiff": tiff.getvalue()}
    return files | {kind: path.read_bytes() for kind, path in compressed.items()}


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _valid_files(tmp_path_factory.mktemp("fuzz_seeds"))


@st.composite
def mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, bytes]]:
    """A few edits: overwrite bytes (most often in the header), insert bytes, or truncate."""
    header = min(size, 400)
    edit = st.tuples(
        st.sampled_from(["overwrite", "overwrite", "overwrite", "insert", "truncate"]),
        st.one_of(st.integers(0, header - 1), st.integers(0, size - 1)),
        st.one_of(
            st.binary(min_size=1, max_size=8),
            st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\xff" * 8, b"\x00\x80", b"\x01"]),
        ),
    )
    return draw(st.lists(edit, min_size=1, max_size=6))


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, chunk in edits:
        position = min(position, len(buffer))
        if kind == "overwrite":
            buffer[position : position + len(chunk)] = chunk
        elif kind == "insert":
            buffer[position:position] = chunk
        else:
            del buffer[position:]
    return bytes(buffer)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """``TimeoutError`` when the block runs longer than ``seconds`` (a header that makes a reader spin)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"a mutated file took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def score_without_network(path: Path) -> tuple[int, list[dict]]:
    """What ``score`` does before the network: index, then read every slice; (slices read, errors)."""
    items, errors = index_inputs([path])
    load = LoadCTSliced("image")
    read = 0
    for item in items:
        loaded = load(dict(item))
        if loaded["error"]:
            errors.append({"path": item["image"], "reason": loaded["error"]})
        else:
            assert loaded["image"].ndim == 3 and bool(np.isfinite(loaded["image"].numpy()).all())
            read += 1
    return read, errors


@pytest.mark.parametrize("kind", sorted(SUFFIXES))
def test_mutated_files_end_scored_or_in_errors(kind: str, valid_files: dict[str, bytes], tmp_path: Path) -> None:
    original = valid_files[kind]

    @FUZZ_SETTINGS
    @given(edits=mutations(len(original)))
    def check(edits: list[tuple[str, int, bytes]]) -> None:
        path = tmp_path / f"mutated{SUFFIXES[kind]}"
        path.write_bytes(mutate(original, edits))
        with time_limit(SECONDS_PER_FILE):
            read, errors = score_without_network(path)
        assert read > 0 or errors, "the file was neither scored nor reported"
        assert all(error["path"] == str(path) and error["reason"].strip() for error in errors)
        json.dumps(printable_tree(errors))  # the report can hold every reason

    check()


def test_the_valid_seeds_are_scored(valid_files: dict[str, bytes], tmp_path: Path) -> None:
    """The fuzzing starts from files that work: without mutations every kind is read in full."""
    for kind, data in valid_files.items():
        path = tmp_path / f"seed{SUFFIXES[kind]}"
        path.write_bytes(data)
        assert score_without_network(path) == (3 if kind == "nifti" else 1, [])


def test_a_decoder_that_panics_is_an_error_not_a_crash(valid_files: dict[str, bytes], tmp_path: Path) -> None:
    """pylibjpeg-rle is written in Rust: corrupt RLE segments make it panic, and a panic is a ``BaseException``
    that ``except Exception`` lets through (found by the fuzzing above). Every byte of the fragment is set to 50
    in turn; several of these files made the decoder panic."""
    data = valid_files["dicom_rle"]
    offset_table = data.find(b"\xfe\xff\x00\xe0", data.find(b"\xe0\x7f\x10\x00"))
    fragment = data.find(b"\xfe\xff\x00\xe0", offset_table + 8) + 8
    path = tmp_path / "corrupt_rle.dcm"
    for position in range(fragment, len(data)):
        path.write_bytes(data[:position] + b"\x32" + data[position + 1 :])
        read, errors = score_without_network(path)
        assert read == 1 or [error["path"] for error in errors] == [str(path)]
