"""Compressed CT decoded through imagecodecs (``scripts.decoders``): the same values as pydicom's own decoders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from scripts import decoders
from scripts.ct_inputs import STORED_PIXELS, InputError, LoadCTSliced, index_inputs, read_ct_slice
from scripts.ct_io import _frame_pixels, compress_dicom, frame_count, frame_hu, write_dicom_slice
from scripts.decoders import (
    PLUGIN,
    SOS,
    SYNTAXES,
    check_codestream,
    check_jpeg_scans,
    codestream_shape,
    decode_threads,
    decoding_options,
    is_lossless_jpeg,
    native_frame,
    register_plugin,
)
from torch.utils.data import DataLoader, Dataset

CORPORA = (Path(get_testdata_file("693_J2KR.dcm")).parent, Path(get_testdata_file("CT_small.dcm")).parent)


def _compressed_files(colour: bool) -> list[Path]:
    """pydicom's and pydicom-data's files in a syntax the plugin decodes (JPEG 2000, JPEG lossless, JPEG-LS),
    monochrome or colour."""
    found = []
    for path in sorted(path for corpus in CORPORA for path in corpus.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = ds.file_meta.TransferSyntaxUID
        except Exception:
            continue
        if syntax in SYNTAXES and (ds.get("SamplesPerPixel", 1) != 1) == colour:
            found.append(path)
    return found


def _pylibjpeg_frames(ds: pydicom.Dataset) -> list[np.ndarray]:
    return [pixel_array(ds, index=index, decoding_plugin="pylibjpeg") for index in range(frame_count(ds))]


def test_every_monochrome_file_of_pydicoms_corpora_decodes_as_pylibjpeg_decodes_it() -> None:
    """JPEG 2000 lossless and lossy, JPEG lossless, JPEG-LS lossless and near-lossless; signed and unsigned, 8 to
    16 bits, a codestream whose sign differs from Pixel Representation (J2K_pixelrep_mismatch.dcm), a real CT in
    JPEG lossless (bad_sequence.dcm), multi-frame: every frame the plugin decodes equals pydicom's default
    decoder, value for value and type for type; a frame neither can decode fails with both."""
    files = _compressed_files(colour=False)
    names = {f.name for f in files}
    assert {"J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm", "emri_small_jpeg_2k_lossless.dcm"} <= names
    assert {"JPEG-LL.dcm", "bad_sequence.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm"} <= names
    decoded = failed = 0
    for path in files:
        ds = pydicom.dcmread(path)
        options = decoding_options(ds)
        assert options["decoding_plugin"] == PLUGIN and options["decode_threads"] == decode_threads()
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
    assert decoded >= 35 and failed >= 1


def test_colour_is_left_to_pydicoms_decoders() -> None:
    files = _compressed_files(colour=True)
    assert files
    for path in files:
        ds = pydicom.dcmread(path)
        assert decoding_options(ds) == {}
        register_plugin(ds.file_meta.TransferSyntaxUID)
        with pytest.raises(RuntimeError, match="colour is left to pydicom"):
            pixel_array(ds, decoding_plugin=PLUGIN)


LOSSLESS = {"htj2k": HTJ2KLossless, "jpeg_ll": JPEGLosslessSV1, "jpeg_ls": JPEGLSLossless}


@pytest.mark.parametrize("syntax", LOSSLESS.values(), ids=LOSSLESS.keys())
def test_a_real_ct_slice_compressed_losslessly_reads_as_the_hu_of_its_original(syntax: str, tmp_path: Path) -> None:
    """A real 512-px CT slice (signed, 14 bits stored) in HTJ2K (not in pydicom's corpora), JPEG lossless and
    JPEG-LS, its stored bits encoded as DICOM encoders do: pydicom's own decoder and the plugin both give the
    original's values, and the slice reads as the same HU."""
    if syntax == HTJ2KLossless and not hasattr(imagecodecs, "htj2k_encode"):
        pytest.skip(f"imagecodecs {imagecodecs.__version__} has no HTJ2K encoder, which newer versions have")
    original = get_testdata_file("693_UNCI.dcm")
    compressed = pydicom.dcmread(compress_dicom(original, syntax, tmp_path / "compressed.dcm"))
    assert compressed.file_meta.TransferSyntaxUID == syntax
    options = decoding_options(compressed)
    assert options["decoding_plugin"] == PLUGIN
    stored = pydicom.dcmread(original).pixel_array
    assert np.array_equal(pixel_array(compressed, decoding_plugin="pylibjpeg"), stored)
    assert np.array_equal(pixel_array(compressed, **options), stored)
    hu, is_hu = read_ct_slice(tmp_path / "compressed.dcm")
    expected, _ = read_ct_slice(original)
    assert is_hu and np.array_equal(hu, expected) and expected.std() > 100
    assert np.array_equal(frame_hu(compressed), frame_hu(pydicom.dcmread(original)))


def test_a_truncated_jpeg2000_codestream_is_an_input_error_naming_the_decoders(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("693_J2KR.dcm"))
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    ds.save_as(tmp_path / "truncated.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"pixel data cannot be decoded .*pylibjpeg"):
        read_ct_slice(tmp_path / "truncated.dcm")


def _declaring(codestream: bytes, rows: int, columns: int, components: int = 1) -> bytes:
    """``codestream`` with its frame header (JPEG, JPEG-LS) or SIZ segment (JPEG 2000) declaring another size, or
    other components (JPEG 2000: as many entries as it declares, each the first one's)."""
    data = bytearray(codestream)
    if data[:2] == b"\xff\xd8":
        at = next(at for at in range(2, len(data)) if data[at] == 0xFF and data[at + 1] in (0xC3, 0xF7))
        data[at + 5 : at + 10] = rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + bytes([components])
        return bytes(data)
    at = bytes(data).index(b"\xff\x4f\xff\x51")
    data[at + 8 : at + 16] = columns.to_bytes(4, "big") + rows.to_bytes(4, "big")
    end = at + 4 + int.from_bytes(data[at + 4 : at + 6], "big")  # the end of the SIZ segment
    entries = data[at + 42 : at + 45] * components
    siz = (38 + 3 * components).to_bytes(2, "big") + data[at + 6 : at + 40] + components.to_bytes(2, "big")
    return bytes(data[: at + 4] + siz + entries + data[end:])


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, *LOSSLESS.values()], ids=["j2k", *LOSSLESS.keys()])
def test_a_codestream_declaring_another_size_than_the_header_is_refused_before_decoding(
    syntax: str, tmp_path: Path
) -> None:
    """A few KB whose codestream declares 60000 x 60000 pixels: the decoders would allocate gigabytes (JPEG-LS and
    JPEG lossless failed after 210 and 110 s); it is refused from the headers, with both sizes named."""
    if syntax == HTJ2KLossless and not hasattr(imagecodecs, "htj2k_encode"):
        pytest.skip(f"imagecodecs {imagecodecs.__version__} has no HTJ2K encoder, which newer versions have")
    source = write_dicom_slice(tmp_path / "slice.dcm", np.full((64, 64), 40.0), "1.2.3")
    ds = pydicom.dcmread(compress_dicom(source, syntax))
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert codestream_shape(codestream) == (64, 64, 1) == codestream_shape(_declaring(codestream, 64, 64))
    ds.PixelData = encapsulate([_declaring(codestream, 60000, 60000)])
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(InputError, match="declares 60000 x 60000 pixels, the header 64 x 64 .Rows x Columns."):
        read_ct_slice(source)
    ds.PixelData = encapsulate([_declaring(codestream, 64, 64, components=200)])  # 6000 took OpenJPEG 3.4 GiB
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(InputError, match="declares 200 components, the header 1 .SamplesPerPixel."):
        read_ct_slice(source)
    ds.PixelData = encapsulate([_declaring(codestream, 0, 64)])  # a JPEG may give its rows later (DNL)
    assert check_codestream(ds) is None


def test_every_compressed_frame_of_pydicoms_corpora_declares_its_headers_size() -> None:
    """The check above passes every frame that decodes (JPEG 2000, JPEG, JPEG-LS; grey and colour, subsampled): each
    declares its header's Rows, Columns and Samples per Pixel."""
    checked = 0
    for path in _compressed_files(colour=False) + _compressed_files(colour=True):
        ds = pydicom.dcmread(path)
        try:
            frame = pixel_array(ds, index=0)
        except Exception:
            continue  # pydicom cannot decode it either
        codestream = next(generate_frames(ds.PixelData, number_of_frames=frame_count(ds)))
        declared = codestream_shape(codestream)
        assert declared is not None and declared[:2] == frame.shape[:2] == (ds.Rows, ds.Columns), path.name
        assert declared[2] == ds.SamplesPerPixel, path.name
        check_codestream(ds)
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLSLossless], ids=["jpeg_ll", "jpeg_ls"])
def test_a_frame_holding_more_scans_than_components_is_refused_before_decoding(syntax: str, tmp_path: Path) -> None:
    """A sequential, lossless or JPEG-LS frame codes each component in one scan; each empty scan after it costs the
    decoders a pass over the image (200 took 90 s at 2048 x 2048 in JPEG-LS, 15 s in JPEG lossless)."""
    source = write_dicom_slice(tmp_path / "slice.dcm", np.full((64, 64), 40.0), "1.2.3")
    ds = pydicom.dcmread(compress_dicom(source, syntax))
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    start = codestream.index(SOS)
    scan_header = codestream[start : start + 2 + int.from_bytes(codestream[start + 2 : start + 4], "big")]
    ds.PixelData = encapsulate([codestream[:-2] + scan_header + b"\xff\xd9"])
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(InputError, match=r"holds more than 1 scan \(one a component, and its frame has 1\)"):
        read_ct_slice(source)


def test_scans_are_counted_across_the_reads_of_a_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan marker split between two reads counts once; counting stops at ``size`` bytes."""
    monkeypatch.setattr(decoders, "SCAN_CHUNK", 3)  # every other marker straddles two reads
    check_jpeg_scans(io.BytesIO(SOS * decoders.MAX_JPEG_SCANS))
    with pytest.raises(ValueError, match=f"holds more than {decoders.MAX_JPEG_SCANS} scans"):
        check_jpeg_scans(io.BytesIO(SOS * (decoders.MAX_JPEG_SCANS + 1)))
    check_jpeg_scans(io.BytesIO(SOS * (decoders.MAX_JPEG_SCANS + 1)), size=2 * decoders.MAX_JPEG_SCANS)


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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this machine, each with 2 readers
    assert decode_threads() == max(1, cores // 2)
    assert [int(n) for n in DataLoader(_Threads(), batch_size=None, num_workers=2)] == [max(1, cores // 4)] * 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: one thread each
    assert decode_threads() == 1


def test_a_lossy_jpeg_stream_under_a_lossless_syntax_is_left_to_pydicoms_decoders(tmp_path: Path) -> None:
    """libjpeg-turbo and pylibjpeg-libjpeg may round a lossy JPEG differently, so the plugin decodes lossless
    codestreams only: a baseline stream mislabelled JPEG lossless is refused by it and read by pydicom's own."""
    ds = pydicom.dcmread(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    lossless = next(generate_frames(ds.PixelData, number_of_frames=1))
    lossy = imagecodecs.jpeg8_encode(ds.pixel_array, level=80)
    assert is_lossless_jpeg(lossless) and not is_lossless_jpeg(lossy) and not is_lossless_jpeg(b"\xff\xd8")
    ds.PixelData = encapsulate([lossy])
    with pytest.raises(RuntimeError, match="not a lossless JPEG codestream"):
        pixel_array(ds, decoding_plugin=PLUGIN)
    assert np.array_equal(_frame_pixels(ds, 0), pixel_array(ds, decoding_plugin="pylibjpeg"))


def test_every_uncompressed_16_bit_file_of_pydicoms_corpora_reads_as_pydicom_decodes_it() -> None:
    """The fast path for uncompressed frames (``native_frame``) takes the little-endian 16-bit monochrome files of
    pydicom's corpora (real CT among them, signed and unsigned, 12 to 16 bits stored, multi-frame) and gives each
    frame exactly pydicom's array, value for value and type for type; it declines the others (and any of those
    whose pixel data is not exactly the size its header declares), which pydicom reads."""
    taken: set[str] = set()
    declined = 0
    for path in sorted(path for corpus in CORPORA for path in corpus.iterdir()):
        try:
            ds = pydicom.dcmread(path)
            expected = [pixel_array(ds, index=index) for index in range(frame_count(ds))]
        except Exception:
            continue
        frames = [native_frame(ds, index) for index in range(len(expected))]
        if frames[0] is None:
            declined += 1
            assert all(frame is None for frame in frames), path.name
            continue
        taken.add(path.name)
        for index, (frame, pixels) in enumerate(zip(frames, expected, strict=True)):
            assert frame.dtype == pixels.dtype and np.array_equal(frame, pixels), (path.name, index)
            assert frame.flags.writeable and frame.dtype.isnative
    assert {"CT_small.dcm", "693_UNCI.dcm", "MR_small.dcm", "emri_small.dcm"} <= taken
    assert len(taken) >= 10 and declined >= 20


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("stored", [12, 14, 16])
def test_bits_above_bits_stored_are_cleared_and_signed_values_sign_extended_as_pydicom_does(
    signed: int, stored: int
) -> None:
    """Scanners leave other bits above Bits Stored (overlays, garbage): pydicom masks them off and sign-extends
    signed values from Bits Stored; the fast path gives the same numbers, for each frame of a multi-frame file."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(stored + signed)
    raw = rng.integers(0, 2**16, size=(3, int(ds.Rows), int(ds.Columns)), dtype=np.uint16)
    raw.flat[:4] = [0xFFFF, 0x8000, 1 << (stored - 1), (1 << (stored - 1)) - 1]
    ds.PixelData, ds.NumberOfFrames = raw.astype("<u2").tobytes(), 3
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, stored - 1, signed
    for index in range(3):
        expected = pixel_array(ds, index=index)
        frame = native_frame(ds, index)
        assert frame.dtype == expected.dtype and np.array_equal(frame, expected), index
    assert native_frame(ds, 3) is None  # no such frame: pydicom's error names it


def test_frames_the_fast_path_does_not_take_are_read_by_pydicom(tmp_path: Path) -> None:
    """Big-endian, compressed, 8-bit and short pixel data are left to pydicom: they read as the same values all the
    same, and pixel data shorter than its header says is an input error that says so."""
    big_endian = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    assert big_endian.file_meta.TransferSyntaxUID == ExplicitVRBigEndian and native_frame(big_endian) is None
    assert np.array_equal(_frame_pixels(big_endian, 0), pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array)
    source = get_testdata_file("CT_small.dcm")
    rle = pydicom.dcmread(compress_dicom(source, RLELossless, tmp_path / "rle.dcm"))
    assert rle.file_meta.TransferSyntaxUID == RLELossless and native_frame(rle) is None
    assert np.array_equal(read_ct_slice(tmp_path / "rle.dcm")[0], read_ct_slice(source)[0])
    eight_bit = pydicom.dcmread(get_testdata_file("OBXXXX1A.dcm"))
    assert eight_bit.BitsAllocated == 8 and native_frame(eight_bit) is None
    short = pydicom.dcmread(source)
    short.PixelData = short.PixelData[:-2]
    short.save_as(tmp_path / "short.dcm")
    assert native_frame(pydicom.dcmread(tmp_path / "short.dcm")) is None
    with pytest.raises(InputError, match=r"\(32,768 bytes\), but PixelData holds 32,766 bytes"):
        read_ct_slice(tmp_path / "short.dcm")


def test_slices_read_from_where_indexing_found_their_pixels_equal_the_full_read(tmp_path: Path) -> None:
    """``index_inputs`` records where an uncompressed slice's pixels lie (``stored_pixels``), and the reader takes
    them from there without parsing the header again: the same HU, value for value and type for type, for real CT,
    signed 12-bit values with other bits set above them, a rescale slope of 2 and each frame of a multi-frame file.
    Compressed files and small slices (whose pixels come with the header) are read in full, as before."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 2**16, size=(3, int(ds.Rows), int(ds.Columns)), dtype=np.uint16)
    ds.PixelData, ds.NumberOfFrames = raw.astype("<u2").tobytes(), 3
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleSlope = 12, 11, 1, 2
    ds.save_as(tmp_path / "frames.dcm")
    for name in ("CT_small.dcm", "693_UNCI.dcm"):
        (tmp_path / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    compress_dicom(get_testdata_file("CT_small.dcm"), RLELossless, tmp_path / "rle.dcm")
    small = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    small.PixelData, small.Rows, small.Columns = small.PixelData[: 2 * 40 * 40], 40, 40  # 3,200 bytes: in the header
    small.save_as(tmp_path / "small.dcm")
    items, errors = index_inputs([tmp_path])
    assert errors == []
    fast = {(Path(item["image"]).name, item["frame"]) for item in items if STORED_PIXELS in item}
    assert fast == {("CT_small.dcm", 0), ("693_UNCI.dcm", 0), *(("frames.dcm", frame) for frame in range(3))}
    for item in items:
        for compact in (False, True):
            expected, in_hu = read_ct_slice(item["image"], item["frame"], 1, compact)
            pixels, hu = read_ct_slice(item["image"], item["frame"], 1, compact, item.get(STORED_PIXELS))
            assert hu and in_hu and pixels.dtype == expected.dtype and np.array_equal(pixels, expected), item
    loaded = LoadCTSliced("image", compact_hu=True)(next(item for item in items if STORED_PIXELS in item))
    assert STORED_PIXELS not in loaded  # where the pixels lie is not part of the batch


def test_a_file_changed_after_indexing_is_read_as_it_is_now(tmp_path: Path) -> None:
    """The reader takes a slice from where indexing found its pixels only while the file is the one indexed (its
    size, modification time and inode): a slice rewritten since reads as its new pixels, and one cut short since
    gives the reason."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.save_as(tmp_path / "ct.dcm")
    (item,), _ = index_inputs([tmp_path / "ct.dcm"])
    changed = pydicom.dcmread(tmp_path / "ct.dcm")
    changed.PixelData = (changed.pixel_array // 2).astype(changed.pixel_array.dtype).tobytes()
    changed.save_as(tmp_path / "new.dcm")
    os.replace(tmp_path / "new.dcm", tmp_path / "ct.dcm")  # same size, another inode
    expected = read_ct_slice(tmp_path / "ct.dcm")[0]
    assert np.array_equal(read_ct_slice(tmp_path / "ct.dcm", 0, 1, False, item[STORED_PIXELS])[0], expected)
    (tmp_path / "ct.dcm").write_bytes((tmp_path / "ct.dcm").read_bytes()[:-5000])
    with pytest.raises(InputError, match="PixelData holds"):
        read_ct_slice(tmp_path / "ct.dcm", 0, 1, False, item[STORED_PIXELS])
