"""Fuzzing: valid DICOM (uncompressed, RLE, JPEG 2000, JPEG lossless, JPEG-LS), NIfTI, MetaImage, TIFF and JPEG files,
mutated in
their headers and bytes, each end scored or in ``errors``, within a time bound, without a crash.

CI runs a fixed set of 100 examples per kind (``derandomize``). For thousands of fresh random ones:

    FUZZ_EXAMPLES=3000 python -m pytest -q tests/test_fuzz.py

A failure prints the mutation and a ``@reproduce_failure`` line to paste above the test.
"""

from __future__ import annotations

import base64
import faulthandler
import io
import json
import os
import signal
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless
from scripts.ct_inputs import LoadCTSliced, index_inputs, read_ct_slice
from scripts.ct_io import compress_dicom, write_dicom_slice
from scripts.output_dir import printable_tree

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))  # per kind: 900 in all in CI
SECONDS_PER_FILE = 10  # index and read one mutated file; a valid one takes milliseconds
DICOM_KINDS = ("dicom", "dicom_rle", "dicom_j2k", "dicom_jpeg_lossless", "dicom_jpeg_ls")
SUFFIXES = dict.fromkeys(DICOM_KINDS, ".dcm") | {"nifti": ".nii", "metaimage": ".mha", "tiff": ".tif", "jpeg": ".jpg"}
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


def _fixed_uids(path: Path) -> Path:
    """The same bytes on every run (``write_dicom_slice`` draws new UIDs), so CI fuzzes the same files each time."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.save_as(path, enforce_file_format=True)
    return path


def _valid_files(folder: Path) -> dict[str, bytes]:
    """One small valid file of each kind, as bytes, the same on every run."""
    dicom = _fixed_uids(write_dicom_slice(folder / "seed.dcm", _hu((16, 16)), "1.2.3.4"))
    compressed = {}  # JPEG 2000's default 6 resolutions need 32 px or more
    for kind, syntax, side in (
        ("dicom_rle", RLELossless, 16),
        ("dicom_j2k", JPEG2000Lossless, 64),
        ("dicom_jpeg_lossless", JPEGLosslessSV1, 16),
        ("dicom_jpeg_ls", JPEGLSLossless, 16),
    ):
        seed = _fixed_uids(write_dicom_slice(folder / f"{kind}_seed.dcm", _hu((side, side)), "1.2.3.4"))
        compressed[kind] = compress_dicom(seed, syntax, folder / f"{kind}.dcm")
    nifti = folder / "seed.nii"
    nibabel.save(nibabel.Nifti1Image(_hu((16, 16, 3)).astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0])), nifti)
    metaimage = folder / "seed.mha"  # compressed, as grand-challenge.org writes it
    volume = SimpleITK.GetImageFromArray(_hu((3, 16, 16)).astype(np.int16))
    SimpleITK.WriteImage(volume, str(metaimage), useCompression=True)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.random.default_rng(1).random((16, 16), dtype=np.float32))
    jpeg = io.BytesIO()  # progressive: 6 scans, whose markers the mutations may multiply
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 16), dtype=np.uint8)).save(
        jpeg, "JPEG", progressive=True
    )
    files = {"dicom": dicom.read_bytes(), "nifti": nifti.read_bytes(), "metaimage": metaimage.read_bytes()}
    files |= {"tiff": tiff.getvalue(), "jpeg": jpeg.getvalue()}
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
    """``TimeoutError`` when the block runs longer than ``seconds`` (a header that makes a reader spin). Readers
    that catch every exception can swallow that one, so a block still running at twice the limit ends the whole
    test process with every thread's traceback: a hang is never silent."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"a mutated file took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    faulthandler.dump_traceback_later(2 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
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


# A mutated seed TIFF (an insert and overwrites in its first page's tags) whose page chain made tifffile's series
# view loop forever: the fuzzing above found it. zlib-compressed, base64.
LOOPING_TIFF = (
    "eNpdk31Mk1cUxt+2gDDKh0UKfowxvgSsCCgI2vc8gEUHyuTDAUFUxBYQFRvoKkq0KOBkQlajogxBwLkhI4w5I9NUh4qu+oebfAhD"
    "WJAwFR2CbDAiw+5FXUI8yXPPL/ee55yb3NywME/GlGEYK4bhGTE8jqw58aYxnyd4zY6cBG95SibT2JLHZ2Zx+TrzC2eZ+b+bW2yn"
    "VYmndbV7w7kGg0HDGDHMHJ7x67NHnOa+5eec3Kf5fbgpQi6PcYqZ2p8axgiYN5HjlJW2WalwWua43sdf4ujjv2Ev827w3pFqa0pK"
    "ytbtCi/l1D12v1OtDx2hKyYC1EQHoyQqC7nXLFlthQ3trItGQ1cm9H4a2lhzmpTZG0FXO6mr+zBF9cdAdSyPig7co5f3XCA5L4T1"
    "ye/YyhsPpb4nNkD6KAinpprfMENpeBROttRQ7c3HpL4fBr1+kk2QllHSr6/YXu8ndEC8BwEhZpQe3Ewt8rvkKk+FNjaSJo8yeB5x"
    "kJqSq6WP7IKgNNvH6o58QeOzDTSSPk7ee4fYEzNz4HcT8Fykhn2Vjm0/HIgQuxLqKH4Pq/TbUd9cTCMtgfh7vwtVup8l04hsnD/V"
    "QaL3jTBuOE7D4YOsg+I3Min/AMtkA3ShbSUqf75E+sF5KGoPhXFbOpr1XeQocWJ3vFiKyqgZOBu8CSKvZ9Sv0lFQsobNFj0lWy8X"
    "pDqHwnVlAoRMIk3cscPkUAT2LSigEFUD7ebHwbhvFqIz+EhXS1B+m49xhxyU3ArCcOMGtjvbjvoLzWHZGgXr+GK2/5kX/DNCsEgT"
    "htKjmyBcKqNeN0voUiOQubqR0p6uIK1mlEyNv2HzV22m+cMJ+HLAEzZ7E2FhHgedPAkphgpyq3hBHlYOEEUWkW/SNuQmP1meVBKL"
    "sQhX+P64nyZWB+DgrlbqefwJWoo0CI/WklfNMLkkJ1JSuA8CvnVG/ZJ4iOw/xk92e+D0gxpyewUkznOIeShhP+8fo76vGmi2UIEC"
    "wRrEZ3SSY5wNygbEqLCWo7JSLzW98pJ6UiVIGHtM8rBtKIzNQmttDKL1g6T6PhmHbEtYoYUHtssKSZiZQ+qRhfjsigyuWVsQdC2e"
    "zrhuwo6766CaUUVBmbnsvtJQLIiJwcX7z+iYyp0SF9uSzKaJ0tuDkbugmrjvy6onvKEuIBx64E9Lsq0g7rtD/6xlwHRfXe7xqRMu"
    "KA4S86cFLL/uICuHeQgY7GRrlZfpptgJfKUM47euU1KtXtpTF4jf/Xi4sWU+1vg4U9PtbkpzT0aj6UbUj1VRWeuHUMbUsc4Za9H5"
    "USFdNNSTatEuDCw0R+FD7t34YfSXRQjmCjTQjpWz2Ra7qXmVmBzz8+iu7DTV9B9nn7cp0PwqjzQt2yBPXIHcM940/5wvSoxW4sl1"
    "ATW1GtG66ibSXypi+XkdZF03SmlST1xTiZC/c4C0xzeTtZsY/5oM0JHRWJzr9oXkZSCG1ouwrO8y1fhpyffYH9QlF8FhhY7yW2xJ"
    "q+tlGx4sZoscIuk/vZC9Sg=="
)


def test_a_tiff_whose_page_chain_loops_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """Only the first page header (and whether a second exists) is read; a file of several pages is a stack."""
    path = tmp_path / "loop.tif"
    path.write_bytes(zlib.decompress(base64.b64decode(LOOPING_TIFF)))
    with time_limit(SECONDS_PER_FILE):
        read, errors = score_without_network(path)
    assert read == 0 and [error["path"] for error in errors] == [str(path)]
    assert "several pages" in errors[0]["reason"]


def test_the_valid_seeds_are_scored(valid_files: dict[str, bytes], tmp_path: Path) -> None:
    """The fuzzing starts from files that work: without mutations every kind is read in full, and every DICOM
    kind (in its own transfer syntax) to the HU it was written with."""
    syntaxes = set()
    for kind, data in valid_files.items():
        path = tmp_path / f"seed_{kind}{SUFFIXES[kind]}"
        path.write_bytes(data)
        assert score_without_network(path) == (3 if kind in ("nifti", "metaimage") else 1, [])
        if kind in DICOM_KINDS:
            syntaxes.add(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
            hu = read_ct_slice(path)[0][0]
            assert np.array_equal(hu, np.rint(_hu(hu.shape)))
    assert len(syntaxes) == len(DICOM_KINDS)


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
