"""JPEG 2000 DICOM decoded on several cores (``scripts.jpeg2000``): the same values as pydicom's own decoder."""

from __future__ import annotations

import os
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import HTJ2KLossless, JPEG2000TransferSyntaxes
from torch.utils.data import DataLoader, Dataset

from scripts.ct_inputs import InputError, read_ct_slice
from scripts.ct_io import frame_count, frame_hu
from scripts.jpeg2000 import PLUGIN, decode_threads, decoding_options

CORPORA = (Path(get_testdata_file("693_J2KR.dcm")).parent, Path(get_testdata_file("CT_small.dcm")).parent)


def _jpeg2000_files(colour: bool) -> list[Path]:
    """pydicom's and pydicom-data's JPEG 2000 files that hold pixel data, monochrome or colour."""
    found = []
    for path in sorted(path for corpus in CORPORA for path in corpus.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = ds.file_meta.TransferSyntaxUID
        except Exception:
            continue
        if syntax in JPEG2000TransferSyntaxes and (ds.get("SamplesPerPixel", 1) != 1) == colour:
            found.append(path)
    return found


def _pylibjpeg_frames(ds: pydicom.Dataset) -> list[np.ndarray]:
    return [pixel_array(ds, index=index, decoding_plugin="pylibjpeg") for index in range(frame_count(ds))]


def test_every_monochrome_jpeg2000_file_of_pydicoms_corpora_decodes_as_pylibjpeg_decodes_it() -> None:
    """Lossless and lossy, signed and unsigned, 10 to 16 bits, a codestream whose sign differs from Pixel
    Representation (J2K_pixelrep_mismatch.dcm), multi-frame: every frame the plugin decodes equals pydicom's
    default decoder, value for value and type for type; a frame neither can decode fails with both."""
    files = _jpeg2000_files(colour=False)
    assert {"J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm", "emri_small_jpeg_2k_lossless.dcm"} <= {f.name for f in files}
    decoded = failed = 0
    for path in files:
        ds = pydicom.dcmread(path)
        options = decoding_options(ds)
        assert options["decoding_plugin"] == PLUGIN and options["j2k_threads"] == decode_threads()
        try:
            expected = _pylibjpeg_frames(ds)
        except Exception:
            with pytest.raises(Exception):  # noqa: B017 - the same file must fail, whatever pydicom raises
                pixel_array(ds, **options)
            failed += 1
            continue
        for index, frame in enumerate(expected):
            pixels = pixel_array(ds, index=index, **options)  # the plugin alone, no fallback
            assert pixels.dtype == frame.dtype and np.array_equal(pixels, frame), (path.name, index)
            decoded += 1
    assert decoded >= 20 and failed >= 1


def test_colour_jpeg2000_is_left_to_pydicoms_decoders() -> None:
    files = _jpeg2000_files(colour=True)
    assert files
    for path in files:
        ds = pydicom.dcmread(path)
        assert decoding_options(ds) == {}
        with pytest.raises(RuntimeError, match="colour JPEG 2000 is left to pydicom"):
            pixel_array(ds, decoding_plugin=PLUGIN)


def test_ct_in_htj2k_decodes_to_the_hu_of_its_uncompressed_original(tmp_path: Path) -> None:
    """High-throughput JPEG 2000 (DICOM's HTJ2K syntaxes, not in pydicom's corpora): a real CT slice encoded
    losslessly reads as the same HU as the uncompressed file."""
    original = get_testdata_file("693_UNCI.dcm")
    ds = pydicom.dcmread(original)
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(ds.pixel_array)])
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(tmp_path / "htj2k.dcm", enforce_file_format=False)
    compressed = pydicom.dcmread(tmp_path / "htj2k.dcm")
    assert decoding_options(compressed)["decoding_plugin"] == PLUGIN
    hu, is_hu = read_ct_slice(tmp_path / "htj2k.dcm")
    expected, _ = read_ct_slice(original)
    assert is_hu and np.array_equal(hu, expected) and expected.std() > 100
    assert np.array_equal(frame_hu(compressed), frame_hu(pydicom.dcmread(original)))


def test_a_truncated_codestream_is_an_input_error_naming_the_decoders(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("693_J2KR.dcm"))
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    ds.save_as(tmp_path / "truncated.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"pixel data cannot be decoded .*pylibjpeg"):
        read_ct_slice(tmp_path / "truncated.dcm")


class _Threads(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return decode_threads()


def test_decoding_threads_share_the_cores_among_the_processes_that_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    assert decode_threads() == cores
    in_workers = [int(n) for n in DataLoader(_Threads(), batch_size=None, num_workers=2)]
    assert in_workers == [max(1, cores // 2)] * 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more torchrun ranks than cores: one thread each
    assert decode_threads() == 1
