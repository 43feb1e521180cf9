"""Hostile inputs to scoring: headers that declare more than their files hold or than the caps allow end in
``errors`` from the header alone, quickly and without large memory; DICOM series are de-duplicated, split by
size and orientation, and sorted along the slice normal."""

from __future__ import annotations

import gzip
import io
import json
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from scripts import transforms
from scripts.clinical.score import SliceScorer, downsample, score_inputs
from scripts.ct_inputs import InputError, index_inputs, read_ct_slice, read_scored_slice
from scripts.ct_io import write_dicom_slice
from scripts.transforms import ImageReadError, read_slice

from tests.conftest import REPO_ROOT

QUICK_S = 3.0  # seconds: a header is read, no pixel


def rss_mib() -> float:
    """This process's peak resident memory so far (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def huge_nifti(path: Path, shape: tuple[int, ...] = (1000, 1000, 1000)) -> Path:
    """A 404-byte NIfTI whose header declares ``shape`` int16 voxels (gzipped for ``.nii.gz``)."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["magic"], header["vox_offset"] = b"n+1", 352
    data = header.binaryblock + b"\0" * 56
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def dicom_with(path: Path, **changes: object) -> Path:
    """A 16 x 16 CT slice (512 bytes of pixels) whose header then says ``changes``."""
    ds = pydicom.dcmread(write_dicom_slice(path, np.zeros((16, 16)), "1.9.9"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_ct_with(path: Path, **changes: object) -> Path:
    """pydicom's CT_small.dcm, RLE-compressed (one fragment), whose header then says ``changes``."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.compress(RLELossless)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def huge_tiff(path: Path, side: int = 20000) -> Path:
    """A tile-compressed TIFF of ``side`` x ``side`` zeros: a few hundred KB, 1.5 GiB as float32."""
    tile = np.zeros((512, 512), np.uint8)
    tiles = (tile for _ in range((-(-side // 512)) ** 2))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint8, tile=(512, 512), compression="zlib")
    return path


def only_error(paths: list[Path]) -> str:
    """The one reason ``index_inputs`` gives for ``paths``, which must give no item, within ``QUICK_S``."""
    start = time.perf_counter()
    items, errors = index_inputs(paths)
    assert time.perf_counter() - start < QUICK_S
    assert items == [] and len(errors) == 1, (items[:3], errors)
    return errors[0]["reason"]


def test_nifti_declaring_a_huge_volume_is_refused_from_its_header(tmp_path: Path) -> None:
    path = huge_nifti(tmp_path / "huge.nii")
    assert path.stat().st_size == 404
    reason = "declares a volume of 1000 x 1000 x 1000 int16 voxels (2,000,000,352 bytes with the header), "
    assert only_error([path]) == reason + "but the file has 404 bytes"
    with pytest.raises(InputError, match="declares a volume of 1000 x 1000 x 1000"):
        read_scored_slice(path, 0)  # read time is guarded too
    compressed = huge_nifti(tmp_path / "huge.nii.gz")  # its compressed size says little: the cap decides
    assert only_error([compressed]) == (
        "declared volume 1000 x 1000 x 1000 needs 3,815 MiB as float32, over the cap of 2048 MiB per volume "
        "(MAX_VOLUME_MB)"
    )


def test_nifti_volume_and_slice_caps_are_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vol.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((64, 64, 40), np.float32), np.eye(4)), path)
    assert len(index_inputs([path])[0]) == 40
    monkeypatch.setattr("scripts.ct_inputs.MAX_VOLUME_MB", 0.5)  # 64 x 64 x 40 float32 is 0.625 MiB
    assert only_error([path]).startswith("declared volume 64 x 64 x 40 needs 0.62 MiB as float32, over the cap of 0.5")
    with pytest.raises(InputError, match="over the cap of 0.5 MiB per volume"):
        read_scored_slice(path, 0)
    monkeypatch.setattr("scripts.ct_inputs.MAX_VOLUME_MB", 2048.0)
    monkeypatch.setattr(transforms, "MAX_SLICE_MB", 0.01)  # 64 x 64 float32 is 0.016 MiB
    cap = "declared size 64 x 64 needs 0.016 MiB as float32, over the cap of 0.01 MiB per slice (MAX_SLICE_MB)"
    assert only_error([path]) == cap


METAIMAGE_HEADER = "ObjectType = Image\nNDims = 3\nDimSize = {sizes}\nElementType = MET_SHORT\n{data}"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_volume_declaring_a_huge_size_is_refused_before_its_data_are_read(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"huge{suffix}"  # 1000^3 voxels declared, 20 bytes of (gzip) data
    if suffix == ".nrrd":
        path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1000 1000 1000\nencoding: gzip\n\n" + bytes(20))
    else:
        data = "CompressedData = True\nCompressedDataSize = 20\nElementDataFile = LOCAL\n"
        path.write_bytes(METAIMAGE_HEADER.format(sizes="1000 1000 1000", data=data).encode() + bytes(20))
    assert only_error([path]) == (
        "declared volume 1000 x 1000 x 1000 needs 3,815 MiB as float32, "
        "over the cap of 2048 MiB per volume (MAX_VOLUME_MB)"
    )
    with pytest.raises(InputError, match="over the cap of 2048 MiB per volume"):
        read_scored_slice(path, 0)


def test_metaimage_data_that_inflate_past_their_declared_volume_are_refused_early(tmp_path: Path) -> None:
    """Compressed MetaImage voxels are inflated up to the declared size only: 1 GiB of zeros (1 MB compressed) under
    a 64 x 64 x 4 header is refused once it inflates past those voxels, without the gigabyte."""
    packer = zlib.compressobj()
    zeros = b"".join(packer.compress(bytes(2**24)) for _ in range(64)) + packer.flush()
    data = f"CompressedData = True\nCompressedDataSize = {len(zeros)}\nElementDataFile = LOCAL\n"
    path = tmp_path / "bomb.mha"
    path.write_bytes(METAIMAGE_HEADER.format(sizes="64 64 4", data=data).encode() + zeros)
    before, start = rss_mib(), time.perf_counter()
    with pytest.raises(
        InputError, match="the compressed voxels of bomb.mha inflate to more than the 64 x 64 x 4 its header"
    ):
        read_scored_slice(path, 0)
    assert time.perf_counter() - start < QUICK_S and rss_mib() - before < 200


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_nrrd_data_that_inflate_past_their_declared_volume_are_refused_early(encoding: str, tmp_path: Path) -> None:
    """Compressed NRRD data read as pynrrd reads them; data that inflate to more than the header's sizes need are
    refused as soon as they do: pynrrd inflated 1 MB of gzip zeros to 1 GiB before it counted them."""
    import bz2
    import zlib

    import nrrd

    volume = np.random.default_rng(0).normal(0, 300, (40, 30, 5)).astype(np.int16)
    nrrd.write(str(tmp_path / "ct.nrrd"), volume, {"encoding": encoding, "space": "left-posterior-superior"})
    nrrd.write(str(tmp_path / "raw.nrrd"), volume, {"encoding": "raw", "space": "left-posterior-superior"})
    assert np.array_equal(read_scored_slice(tmp_path / "ct.nrrd", 2), read_scored_slice(tmp_path / "raw.nrrd", 2))
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16) if encoding == "gzip" else bz2.BZ2Compressor()
    zeros = b"".join(packer.compress(bytes(2**24)) for _ in range(16)) + packer.flush()  # 256 MiB
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 4\nendian: little\nencoding: {encoding}\n\n"
    (tmp_path / "bomb.nrrd").write_bytes(header.encode() + zeros)
    assert (tmp_path / "bomb.nrrd").stat().st_size < 500_000
    before, start = rss_mib(), time.perf_counter()
    with pytest.raises(InputError, match=f"its {encoding} data inflate to more than the 64 x 64 x 4 voxels"):
        read_scored_slice(tmp_path / "bomb.nrrd", 0)
    assert time.perf_counter() - start < QUICK_S and rss_mib() - before < 100


@pytest.mark.parametrize("kind", ["nifti1", "nifti2"])
def test_a_nifti_whose_extensions_would_fill_memory_is_refused_from_its_first_bytes(kind: str, tmp_path: Path) -> None:
    """nibabel reads every header extension into memory before the voxels: a .nii.gz of a few hundred KB whose
    extension held 256 MiB of zeros took 269 MiB. A header putting its voxels past 64 MiB is refused; one with the
    usual few KB of extensions (a DICOM header dump, say) is read."""
    image_type = nibabel.Nifti1Image if kind == "nifti1" else nibabel.Nifti2Image
    volume = np.random.default_rng(0).normal(0, 300, (64, 64, 3)).astype(np.int16)
    image = image_type(volume, np.diag([0.7, 0.7, 2.5, 1.0]))
    image.header.extensions.append(nibabel.nifti1.Nifti1Extension(6, b"dicom header dump " * 200))  # 3.6 KB
    nibabel.save(image, tmp_path / "ct.nii.gz")
    assert read_scored_slice(tmp_path / "ct.nii.gz", 1).shape == (1, 64, 64)
    image.header.extensions.append(nibabel.nifti1.Nifti1Extension(40, bytes(96 * 2**20)))
    nibabel.save(image, tmp_path / "bomb.nii.gz")
    assert (tmp_path / "bomb.nii.gz").stat().st_size < 1_000_000
    assert only_error([tmp_path / "bomb.nii.gz"]) == (
        "its header puts the voxels 96 MiB into the file (vox_offset: header extensions before them), over the cap "
        "of 64 MiB (MAX_NIFTI_OFFSET_MB)"
    )
    with pytest.raises(InputError, match="over the cap of 64 MiB .MAX_NIFTI_OFFSET_MB."):
        read_scored_slice(tmp_path / "bomb.nii.gz", 0)


def test_dicom_declaring_100000_frames_is_refused_from_its_header(tmp_path: Path) -> None:
    path = dicom_with(tmp_path / "frames.dcm", NumberOfFrames=100000)
    assert path.stat().st_size < 3000
    assert only_error([path]) == (
        "declares 100,000 frames of 16 x 16 pixels at 16 bits (51,200,000 bytes), but PixelData holds 512 bytes"
    )
    with pytest.raises(InputError, match="declares 100,000 frames"):
        read_scored_slice(path, 99999)
    compressed = rle_ct_with(tmp_path / "rle_frames.dcm", NumberOfFrames=100000)
    assert only_error([compressed]) == (
        "declares 100,000 frames of 128 x 128 pixels, but its compressed pixel data has 1 fragment(s) "
        "and 1 offset table entry(s)"
    )
    with pytest.raises(InputError, match="has 1 fragment"):
        read_scored_slice(compressed, 5)


def test_dicom_slices_over_the_cap_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native = dicom_with(tmp_path / "native.dcm", Rows=20000, Columns=20000)
    assert only_error([native]).startswith("declares 1 frame of 20000 x 20000 pixels at 16 bits (800,000,000 bytes)")
    compressed = rle_ct_with(tmp_path / "rle.dcm", Rows=20000, Columns=20000)  # one fragment: the size says little
    cap = "declared size 20000 x 20000 needs 1,526 MiB as float32, over the cap of 64 MiB per slice (MAX_SLICE_MB)"
    assert only_error([compressed]) == cap
    with pytest.raises(InputError, match="over the cap of 64 MiB"):
        read_scored_slice(compressed, 0)
    consistent = dicom_with(tmp_path / "fine.dcm")
    assert len(index_inputs([consistent])[0]) == 1
    monkeypatch.setattr(transforms, "MAX_SLICE_MB", 0.0005)  # 16 x 16 float32 is 0.001 MiB
    assert only_error([consistent]) == (
        "declared size 16 x 16 needs 0.00098 MiB as float32, over the cap of 0.0005 MiB per slice (MAX_SLICE_MB)"
    )


def test_a_deflated_dicom_file_is_read_unless_it_inflates_past_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom inflates a Deflated Explicit VR file whole, in memory: 0.8 MB of deflated zeros took 800 MiB. A file
    that would inflate past ``MAX_VOLUME_MB`` is refused, counted without keeping what it inflates to."""
    plain = write_dicom_slice(tmp_path / "plain.dcm", np.random.default_rng(0).normal(40, 20, (64, 64)), "1.9.8")
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert np.array_equal(read_scored_slice(tmp_path / "deflated.dcm", 0), read_scored_slice(plain, 0))
    ds.SOPInstanceUID = "1.9.8.2"
    ds.add_new(0x00091010, "OB", bytes(3 * 2**20))  # 3 MiB of zeros in a private element
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    assert (tmp_path / "bomb.dcm").stat().st_size < 10_000
    assert len(index_inputs([tmp_path / "bomb.dcm"])[0]) == 1  # within the cap: read
    monkeypatch.setattr("scripts.ct_inputs.MAX_VOLUME_MB", 2.0)
    reason = "deflated (transfer syntax Deflated Explicit VR), and over 2 MiB inflated (MAX_VOLUME_MB)"
    assert only_error([tmp_path / "bomb.dcm"]) == reason
    with pytest.raises(InputError, match=r"over 2 MiB inflated \(MAX_VOLUME_MB\)"):
        read_scored_slice(tmp_path / "bomb.dcm", 0)
    assert only_error([Path(get_testdata_file("image_dfl.dcm"))]) == "modality OT is not CT; only CT is scored"


def test_tiff_declaring_20000_squared_is_refused_from_its_header(tmp_path: Path) -> None:
    path = huge_tiff(tmp_path / "huge.tif")
    assert path.stat().st_size < 1_000_000
    cap = "declared size 20000 x 20000 needs 1,526 MiB as float32, over the cap of 64 MiB per slice (MAX_SLICE_MB)"
    assert only_error([path]) == cap
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="over the cap of 64 MiB"):
        read_slice(path)  # read time (and training) is guarded too
    assert time.perf_counter() - start < QUICK_S
    tifffile.imwrite(tmp_path / "cut.tif", np.zeros((256, 256), np.uint16))  # uncompressed, then cut short
    data = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[:4000])
    reason = only_error([tmp_path / "cut.tif"])
    assert reason.startswith("declared size 256 x 256 (uncompressed) needs the file to reach byte") and reason.endswith(
        "but it has 4,000 bytes"
    )


@pytest.mark.parametrize(
    ("compression", "layout", "marker", "at"),
    [
        ("jpeg", {"rowsperstrip": 16}, b"\xff\xc0", 5),  # 100 rows: the last strip holds 4
        ("jpeg", {"tile": (32, 32)}, b"\xff\xc0", 5),
        ("jpeg2000", {}, b"\xff\x4f\xff\x51", 8),
        ("jpeg2000", {"tile": (64, 64)}, b"\xff\x4f\xff\x51", 8),
    ],
    ids=["jpeg-strips", "jpeg-tiles", "jpeg2000-strip", "jpeg2000-tiles"],
)
def test_a_compressed_tiff_segment_declaring_more_pixels_than_it_holds_is_refused_unread(
    tmp_path: Path, compression: str, layout: dict, marker: bytes, at: int
) -> None:
    """JPEG and JPEG 2000 tiles and strips read as tifffile reads them; one whose codestream declares 60000 x 60000
    pixels is refused before its decoder allocates them (a 64 x 64 slice took 18 s and 4.2 GiB)."""
    path = tmp_path / "slice.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (100, 70), dtype=np.uint8)
    tifffile.imwrite(path, pixels, compression=compression, **layout)
    assert np.array_equal(read_slice(path), tifffile.imread(path) / np.float32(255))
    data = bytearray(path.read_bytes())
    where = data.index(marker) + at
    width = 4 if compression == "jpeg2000" else 2
    data[where : where + 2 * width] = (60000).to_bytes(width, "big") * 2
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(
        ImageReadError, match="declares 60000 x 60000 x 1 samples, more than its (16 x 70|32 x 32|100 x 70|64 x 64) x 1"
    ):
        read_slice(path)
    assert time.perf_counter() - start < QUICK_S


def progressive_jpeg(pixels: np.ndarray, repeats: int = 0) -> bytes:
    """A progressive JPEG of grey uint8 ``pixels`` (pillow's 6 scans), its last scan then repeated ``repeats`` times."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True, quality=95)
    codestream = buffer.getvalue()
    last = codestream.rindex(b"\xff\xda")
    return codestream[:-2] + codestream[last:-2] * repeats + b"\xff\xd9"


def jpeg_slice(path: Path, codestream: bytes, shape: tuple[int, int]) -> Path:
    """``codestream`` as a .jpg file, a TIFF's one strip or a DICOM CT slice's frame, by ``path``'s suffix."""
    if path.suffix == ".jpg":
        path.write_bytes(codestream)
    elif path.suffix == ".tif":
        tifffile.imwrite(path, iter([codestream]), shape=shape, dtype=np.uint8, compression="jpeg", rowsperstrip=64)
    else:
        ds = pydicom.dcmread(write_dicom_slice(path, np.zeros(shape), "1.2.3"))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = encapsulate([codestream])
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".tif", ".dcm"])
def test_a_jpeg_holding_too_many_scans_is_refused_before_decoding(suffix: str, tmp_path: Path) -> None:
    """Decoders pass over the whole image once a scan, however small: a 200 KB 4096 x 4096 JPEG repeating one scan
    3000 times took 31 s as a .jpg, 33 s as a TIFF strip and 86 s as a DICOM frame. A JPEG of up to
    ``MAX_JPEG_SCANS`` (100) scans reads as pillow decodes it; one of more is refused unread."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)
    allowed = progressive_jpeg(pixels, repeats=100 - 6)
    with Image.open(io.BytesIO(allowed)) as image:
        expected = np.asarray(image)
    path = jpeg_slice(tmp_path / f"slice{suffix}", allowed, pixels.shape)
    read = read_ct_slice(path)[0][0] if suffix == ".dcm" else read_slice(path) * 255
    assert np.abs(read - expected).max() < 1e-3
    jpeg_slice(path, progressive_jpeg(pixels, repeats=100 - 5), pixels.shape)
    start = time.perf_counter()
    with pytest.raises((InputError, ImageReadError), match="holds more than 100 scans .MAX_JPEG_SCANS; progressive"):
        read_ct_slice(path)
    assert time.perf_counter() - start < QUICK_S


def test_a_jpeg_with_a_thumbnail_before_its_frame_reads(tmp_path: Path) -> None:
    """A baseline JPEG holds one scan for its one component; an EXIF thumbnail (a JPEG with its own scan, in APP1
    before the frame header) is not counted."""
    pixels = np.random.default_rng(1).integers(0, 255, (64, 80), dtype=np.uint8)
    image, thumbnail = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(image, "JPEG", quality=95)
    Image.fromarray(pixels[:8, :8]).save(thumbnail, "JPEG")
    payload = b"Exif\0\0" + thumbnail.getvalue()
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    path = tmp_path / "slice.jpg"
    path.write_bytes(image.getvalue()[:2] + app1 + image.getvalue()[2:])
    with Image.open(path) as decoded:
        assert np.array_equal(read_slice(path) * 255, np.asarray(decoded, np.float32))


def test_hostile_files_end_in_errors_quickly_and_small(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    huge_nifti(folder / "huge.nii")
    huge_nifti(folder / "huge.nii.gz")
    dicom_with(folder / "frames.dcm", NumberOfFrames=100000)
    dicom_with(folder / "wide.dcm", Rows=20000, Columns=20000)
    rle_ct_with(folder / "wide_rle.dcm", Rows=20000, Columns=20000)
    huge_tiff(folder / "huge.tif")
    write_dicom_slice(folder / "good.dcm", np.full((64, 64), 40.0), "2.2.2")
    scorer = SliceScorer.from_checkpoint(tiny_checkpoint, "cpu", num_workers=0)
    before, start = rss_mib(), time.perf_counter()
    series, errors = score_inputs([folder], scorer)
    elapsed, grown = time.perf_counter() - start, rss_mib() - before
    assert [(entry.name, len(entry.scores)) for entry in series] == [("2.2.2", 1)]
    assert sorted(Path(error["path"]).name for error in errors) == sorted(
        ["huge.nii", "huge.nii.gz", "frames.dcm", "wide.dcm", "wide_rle.dcm", "huge.tif"]
    )
    assert elapsed < 10.0 and grown < 200, (elapsed, grown)  # before: minutes and gigabytes


def test_report_thumbnails_are_downsampled() -> None:
    pixels = np.arange(1000 * 600, dtype=np.float32).reshape(1000, 600)
    small = downsample(pixels)
    assert small.shape == (250, 150) and max(small.shape) <= 256
    assert small[0, 0] == pixels[:4, :4].mean() and small[-1, -1] == pixels[-4:, -4:].mean()
    assert downsample(pixels[:256, :200]).shape == (256, 200)  # small enough already: unchanged
    odd = downsample(np.ones((513, 300), np.float32))  # edges repeated to fill the last block
    assert odd.shape == (171, 100) and np.all(odd == 1.0)


# --- series correctness ---------------------------------------------------------------------------------------------


def ct_slice(path: Path, series: str = "3.3.3", size: int = 32, **changes: object) -> Path:
    """A CT slice of ``series`` whose header then says ``changes`` (ImagePositionPatient, InstanceNumber...)."""
    ds = pydicom.dcmread(write_dicom_slice(path, np.full((size, size), 40.0), series))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows along +y (anterior to posterior), columns along -z: normal -x


def test_a_copied_file_is_scored_once_and_reported(tmp_path: Path) -> None:
    for z in (0.0, 1.0, 2.0):
        ct_slice(tmp_path / f"slice_{int(z)}.dcm", ImagePositionPatient=[0.0, 0.0, z])
    shutil.copyfile(tmp_path / "slice_1.dcm", tmp_path / "slice_1_copy.dcm")
    (tmp_path / "enhanced.dcm").write_bytes(Path(get_testdata_file("eCT_Supplemental.dcm")).read_bytes())
    shutil.copyfile(tmp_path / "enhanced.dcm", tmp_path / "enhanced_copy.dcm")
    items, errors = index_inputs([tmp_path])
    assert sorted(Path(item["image"]).name for item in items) == [
        "enhanced.dcm",
        "enhanced.dcm",
        "slice_0.dcm",
        "slice_1.dcm",
        "slice_2.dcm",
    ]
    assert errors == [  # the enhanced copy's two frames give one entry
        {
            "path": str(tmp_path / "enhanced_copy.dcm"),
            "reason": f"duplicate of {tmp_path / 'enhanced.dcm'} (same SOPInstanceUID)",
        },
        {
            "path": str(tmp_path / "slice_1_copy.dcm"),
            "reason": f"duplicate of {tmp_path / 'slice_1.dcm'} (same SOPInstanceUID)",
        },
    ]


def test_another_image_under_a_reused_uid_is_scored_in_its_own_folder_series(tmp_path: Path) -> None:
    """Low-dose copies made from full-dose files keep their UIDs: neither half of a pair may be dropped as a copy."""
    rng = np.random.default_rng(5)
    for z in (0.0, 1.0):
        full = write_dicom_slice(tmp_path / "full" / f"{int(z)}.dcm", rng.normal(40, 10, (64, 64)), "6.6", z)
        ds = pydicom.dcmread(full)
        hu = ds.pixel_array.astype(np.int32) + rng.normal(0, 40, (64, 64)).round().astype(np.int32)  # more noise
        ds.PixelData = np.clip(hu, 0, 65535).astype(np.uint16).tobytes()
        (tmp_path / "low").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "low" / f"{int(z)}.dcm", enforce_file_format=True)
    lossless = pydicom.dcmread(tmp_path / "full" / "0.dcm")
    lossless.compress(RLELossless, generate_instance_uid=False)  # the same image re-encoded: a copy
    lossless.save_as(tmp_path / "rle_copy.dcm", enforce_file_format=True)

    items, errors = index_inputs([tmp_path / "full", tmp_path / "low", tmp_path / "rle_copy.dcm"])
    assert errors == [
        {
            "path": str(tmp_path / "rle_copy.dcm"),
            "reason": f"duplicate of {tmp_path / 'full' / '0.dcm'} (same SOPInstanceUID)",
        }
    ]
    assert [(item["series"], Path(item["image"]).relative_to(tmp_path).as_posix()) for item in items] == [
        ("6.6 (64x64 full)", "full/0.dcm"),
        ("6.6 (64x64 full)", "full/1.dcm"),
        ("6.6 (64x64 low)", "low/0.dcm"),
        ("6.6 (64x64 low)", "low/1.dcm"),
    ]
    assert [item["warning"] for item in items] == ["", ""] + [
        f"same SOPInstanceUID as {tmp_path / 'full' / name}, other pixels: scored as an image of its own"
        for name in ("0.dcm", "1.dcm")
    ]
    assert not np.array_equal(
        read_scored_slice(tmp_path / "low" / "0.dcm"), read_scored_slice(tmp_path / "full" / "0.dcm")
    )


def test_folders_holding_one_series_at_the_same_positions_are_two_series(tmp_path: Path) -> None:
    for z in (0.0, 1.0):  # new SOPInstanceUIDs, the series UID kept: a full-dose and a low-dose version
        ct_slice(tmp_path / "full" / f"{int(z)}.dcm", "7.7", ImagePositionPatient=[0.0, 0.0, z])
        ct_slice(tmp_path / "low" / f"{int(z)}.dcm", "7.7", ImagePositionPatient=[0.0, 0.0, z])
    for z in (0.0, 1.0, 2.0, 3.0):  # one series over two folders at other positions, as CD exports split them
        ct_slice(tmp_path / "cd" / f"part{int(z) // 2}" / f"{int(z)}.dcm", "8.8", ImagePositionPatient=[0.0, 0.0, z])
    items, errors = index_inputs([tmp_path])
    series = [(item["series"], Path(item["image"]).relative_to(tmp_path).as_posix()) for item in items]
    assert errors == [] and series == [
        ("8.8", "cd/part0/0.dcm"),
        ("8.8", "cd/part0/1.dcm"),
        ("8.8", "cd/part1/2.dcm"),
        ("8.8", "cd/part1/3.dcm"),
        ("7.7 (32x32 full)", "full/0.dcm"),
        ("7.7 (32x32 full)", "full/1.dcm"),
        ("7.7 (32x32 low)", "low/0.dcm"),
        ("7.7 (32x32 low)", "low/1.dcm"),
    ]


def test_a_folder_of_slices_without_series_uid_is_one_series_per_description(tmp_path: Path) -> None:
    """Anonymisers that empty SeriesInstanceUID and SOPInstanceUID (TotalSegmentator's example_ct_dicom): the slices
    of a folder that agree on what a series shares are one series, sorted along the normal; a copy of a file is found
    by the file meta's SOPInstanceUID; two files at one position are not one series, and each stays on its own."""
    anonymised = {"SeriesInstanceUID": "", "SOPInstanceUID": "", "StudyInstanceUID": ""}
    for name, z in (("c.dcm", 0.0), ("a.dcm", 2.0), ("b.dcm", 1.0)):
        ct_slice(tmp_path / "anon" / name, SeriesDescription="Body 3.0", ImagePositionPatient=[0, 0, z], **anonymised)
    ct_slice(tmp_path / "anon" / "lung.dcm", SeriesDescription="Lung 1.0", ImagePositionPatient=[0, 0, 0], **anonymised)
    shutil.copyfile(tmp_path / "anon" / "a.dcm", tmp_path / "anon" / "a_copy.dcm")
    for name in ("full.dcm", "low.dcm"):  # two versions of one slice that only the removed UIDs told apart
        ct_slice(tmp_path / "pair" / name, ImagePositionPatient=[0.0, 0.0, 0.0], **anonymised)

    items, errors = index_inputs([tmp_path])
    series = [(item["series"], Path(item["image"]).relative_to(tmp_path).as_posix()) for item in items]
    body, lung = series[0][0], series[3][0]
    assert body.startswith("anon: Body 3.0 (no SeriesInstanceUID, ") and lung.startswith("anon: Lung 1.0 (no ")
    assert series == [
        (body, "anon/c.dcm"),
        (body, "anon/b.dcm"),
        (body, "anon/a.dcm"),
        (lung, "anon/lung.dcm"),
        ("full.dcm (no SeriesInstanceUID)", "pair/full.dcm"),
        ("low.dcm (no SeriesInstanceUID)", "pair/low.dcm"),
    ]
    assert errors == [
        {
            "path": str(tmp_path / "anon" / "a_copy.dcm"),
            "reason": f"duplicate of {tmp_path / 'anon' / 'a.dcm'} (same SOPInstanceUID)",
        }
    ]


def test_a_series_is_split_by_slice_size_and_orientation(tmp_path: Path) -> None:
    for z in (0.0, 1.0):
        ct_slice(tmp_path / "sizes" / f"small_{int(z)}.dcm", "4.4", 32, ImagePositionPatient=[0.0, 0.0, z])
        ct_slice(tmp_path / "sizes" / f"large_{int(z)}.dcm", "4.4", 48, ImagePositionPatient=[0.0, 0.0, z])
        axial = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ct_slice(
            tmp_path / "planes" / f"ax_{int(z)}.dcm",
            "5.5",
            ImageOrientationPatient=axial,
            ImagePositionPatient=[0.0, 0.0, z],
        )
        ct_slice(
            tmp_path / "planes" / f"sag_{int(z)}.dcm",
            "5.5",
            ImageOrientationPatient=SAGITTAL,
            ImagePositionPatient=[z, 0.0, 0.0],
        )
    items, errors = index_inputs([tmp_path / "sizes", tmp_path / "planes"])
    assert errors == []
    series = {}
    for item in items:
        series.setdefault(item["series"], []).append(Path(item["image"]).name)
    assert series == {
        "4.4 (48x48)": ["large_0.dcm", "large_1.dcm"],
        "4.4 (32x32)": ["small_0.dcm", "small_1.dcm"],
        "5.5 (32x32 axial)": ["ax_0.dcm", "ax_1.dcm"],
        "5.5 (32x32 sagittal)": ["sag_1.dcm", "sag_0.dcm"],  # along the normal (-x)
    }
    for z in (0.0, 1.0, 2.0):  # rounding: tiny differences in the cosines are one orientation
        ct_slice(
            tmp_path / "jitter" / f"{int(z)}.dcm",
            "6.6",
            ImagePositionPatient=[0.0, 0.0, z],
            ImageOrientationPatient=[1.0, 1e-5 * z, 0.0, 0.0, 1.0, 0.0],
        )
    assert {item["series"] for item in index_inputs([tmp_path / "jitter"])[0]} == {"6.6"}


def test_slices_are_sorted_along_the_slice_normal(tmp_path: Path) -> None:
    for name, x in (("a.dcm", 20.0), ("b.dcm", 40.0), ("c.dcm", 10.0), ("d.dcm", 30.0)):  # names not in order
        ct_slice(tmp_path / "sag" / name, ImageOrientationPatient=SAGITTAL, ImagePositionPatient=[x, -50.0, 100.0])
    items, _ = index_inputs([tmp_path / "sag"])
    assert [Path(item["image"]).name for item in items] == ["b.dcm", "d.dcm", "a.dcm", "c.dcm"]  # -x: 40, 30, 20, 10
    assert [item["position"] for item in items] == [-40.0, -30.0, -20.0, -10.0]
    # no positions: InstanceNumber, then file name
    for name, number in (("a.dcm", 3), ("b.dcm", 1), ("c.dcm", 2), ("d.dcm", 2)):
        ds = pydicom.dcmread(ct_slice(tmp_path / "numbered" / name, "7.7", InstanceNumber=number))
        del ds.ImagePositionPatient
        ds.save_as(tmp_path / "numbered" / name, enforce_file_format=True)
    items, _ = index_inputs([tmp_path / "numbered"])
    assert [Path(item["image"]).name for item in items] == ["b.dcm", "c.dcm", "d.dcm", "a.dcm"]


def test_enhanced_ct_frames_are_sorted_along_the_normal_of_their_plane_orientation(tmp_path: Path) -> None:
    path = tmp_path / "enhanced.dcm"
    path.write_bytes(Path(get_testdata_file("eCT_Supplemental.dcm")).read_bytes())
    ds = pydicom.dcmread(path)
    orientation = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert list(map(float, orientation)) == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # normal: -z
    items, _ = index_inputs([path])
    assert [(item["frame"], item["position"]) for item in items] == [(1, 149.0), (0, 159.0)]  # z -149, -159


def test_the_slice_cap_is_a_score_option(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``--max_slice_mb`` reaches the readers (the reading workers too): a 48 x 48 slice is 0.009 MiB as float32."""
    ct = write_dicom_slice(tmp_path / "in" / "ct.dcm", np.zeros((48, 48)), "1.9.8")
    command = [sys.executable, "-m", "scripts", "score", str(ct), "--ckpt", str(tiny_checkpoint), "--device", "cpu"]
    capped = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "capped"), "--max_slice_mb", "0.005"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert capped.returncode == 1 and "scored 0 slices" in capped.stdout
    (error,) = json.loads((tmp_path / "capped" / "summary.json").read_text())["errors"]
    assert "over the cap of 0.005 MiB per slice" in error["reason"]
    default = subprocess.run([*command, "--output_dir", str(tmp_path / "default")], cwd=REPO_ROOT, capture_output=True)
    assert default.returncode == 0


def test_a_volume_without_slices_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii"
    nibabel.save(nibabel.Nifti1Image(np.zeros((16, 16, 0), np.int16), np.eye(4)), path)
    reason = "no slices: the header declares an empty slice axis"
    assert index_inputs([path]) == ([], [{"path": str(path), "reason": reason}])
