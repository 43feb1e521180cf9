"""MetaImage volumes (``scripts.metaimage``, read in ``scripts.ct_inputs``): valid files read as SimpleITK reads
them, voxels and geometry; malformed headers, which make SimpleITK abort the process, are errors with a reason."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK
from scripts.ct_inputs import _metaimage_image, index_inputs

DIRECTIONS = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # a column per axis: rotated in-plane


def _image(pixels: np.ndarray) -> SimpleITK.Image:
    """``pixels`` (x, y[, z]) as a SimpleITK image, rotated in-plane, with its own spacing and origin."""
    image = SimpleITK.GetImageFromArray(pixels.transpose())  # SimpleITK's arrays run (z, y, x)
    axes = pixels.ndim
    image.SetDirection(DIRECTIONS[:axes, :axes].ravel().tolist() if axes == 3 else [0.0, 1.0, -1.0, 0.0])
    image.SetSpacing((0.7, 0.8, 2.5)[:axes])
    image.SetOrigin((-120.0, 35.5, 300.0)[:axes])
    return image


def _big_endian(path: Path) -> None:
    """The uncompressed .mha at ``path`` with its voxels swapped to big-endian, as its header then says."""
    data = path.read_bytes()
    end = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = data[:end].replace(b"BinaryDataByteOrderMSB = False", b"BinaryDataByteOrderMSB = True")
    path.write_bytes(header + np.frombuffer(data[end:], "<i2").astype(">i2").tobytes())


def _header_size_minus_one(path: Path) -> None:
    """The .mhd at ``path`` with 100 bytes of junk before the voxels of its .raw, skipped by ``HeaderSize = -1``."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(b"J" * 100 + raw.read_bytes())
    path.write_text(path.read_text().replace("ElementDataFile", "HeaderSize = -1\nElementDataFile"))


RNG = np.random.default_rng(7)
CASES = {  # name: (pixels, file name, compressed, edit after writing)
    "mha-compressed-int16": (RNG.normal(0, 300, (20, 16, 3)).astype(np.int16), "ct.mha", True, None),
    "mha-int16": (RNG.normal(0, 300, (20, 16, 3)).astype(np.int16), "ct.mha", False, None),
    "mhd-raw-float32": (RNG.normal(0, 300, (20, 16, 3)).astype(np.float32), "ct.mhd", False, None),
    "mha-compressed-uint8-2d": (RNG.integers(0, 255, (20, 16), dtype=np.uint8), "ct.mha", True, None),
    "mha-big-endian": (RNG.normal(0, 300, (20, 16, 3)).astype(np.int16), "ct.mha", False, _big_endian),
    "mhd-header-size-minus-one": (
        RNG.normal(0, 300, (20, 16, 3)).astype(np.int16),
        "ct.mhd",
        False,
        _header_size_minus_one,
    ),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_a_metaimage_file_reads_as_simpleitk_reads_it(case: str, tmp_path: Path) -> None:
    pixels, name, compressed, edit = CASES[case]
    path = tmp_path / name
    SimpleITK.WriteImage(_image(pixels), str(path), useCompression=compressed)
    if edit is not None:
        edit(path)
    reference = SimpleITK.ReadImage(str(path))
    image = _metaimage_image(path, pixels=True)
    assert image.get_data_dtype() == pixels.dtype and np.array_equal(image.dataobj, pixels)
    assert np.array_equal(np.asarray(image.dataobj), SimpleITK.GetArrayFromImage(reference).transpose())
    for index in [(0, 0, 0), (19, 0, 0), (0, 15, 0), (19, 15, 2)]:  # the same place in the patient (RAS = -L, -P, S)
        index = index[: pixels.ndim]
        lps = np.array(reference.TransformIndexToPhysicalPoint(index))
        ras = (image.affine @ [*index, *[0] * (3 - len(index)), 1])[: pixels.ndim]
        assert ras == pytest.approx(lps * np.array([-1.0, -1.0, 1.0])[: pixels.ndim])


GOOD_HEADER = (
    "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
    "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 1 1 1\nDimSize = 16 16 3\n"
    "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
)
# SimpleITK 2.5.7 crashes on the first (a segmentation fault); fuzzed headers with a garbled ElementDataFile made it
# abort (an invalid free)
MALFORMED = {
    "ndims-minus-one": (("NDims = 3", "NDims = -1"), "NDims = -1 with DimSize = (16, 16, 3): not an image of 1 to 4"),
    "garbled-data-file": (("= LOCAL\n", "= LO"), "ElementDataFile = 'LO\\x18ü\\x18ü"),  # runs into the voxels
    "short-list": (
        ("= LOCAL", "= LIST\nct1.raw\nct2.raw\n"),
        "ElementDataFile = LIST names 2 files, DimSize 16 x 16 x 3",
    ),
    "list-of-list": (("= LOCAL", "= LIST 2Dx"), "ElementDataFile = 'LIST 2Dx': LIST takes the files' dimensions"),
    "short-pattern": (("= LOCAL", "= ct%02d.raw 1 2 1"), "ElementDataFile = 'ct%02d.raw 1 2 1' numbers 2 files"),
    "reversed-pattern": (("= LOCAL", "= ct%02d.raw 3 1 1"), "ElementDataFile = 'ct%02d.raw 3 1 1': no run of numbers"),
    "string-pattern": (("= LOCAL", "= ct%s.raw"), "ElementDataFile = 'ct%s.raw' is not a file name with one %d field"),
    "empty-data-file": (("= LOCAL", "="), "ElementDataFile is empty"),
    "too-many-files": (
        (
            "16 16 3\nElementType = MET_SHORT\nElementDataFile = LOCAL",
            "16 16 200000\nElementType = MET_SHORT\nElementDataFile = ct%d.raw",
        ),
        "ElementDataFile = 'ct%d.raw': 200,000 files, over the cap of 100,000",
    ),
    "missing-slice": (
        ("= LOCAL", "= ct%d.raw"),
        "3 of its 3 data files (ElementDataFile) are not found, 'ct1.raw' first",
    ),
    "text-voxels": (
        ("BinaryData = True", "BinaryData = False"),
        "MetaImage voxels stored as text (BinaryData = False)",
    ),
    "channels": (("ElementType", "ElementNumberOfChannels = 3\nElementType"), "MetaImage data of 3 components a voxel"),
    "element-type": (("MET_SHORT", "MET_COMPLEX"), "ElementType = 'MET_COMPLEX' is none of MetaIO's number types"),
    "matrix": (("1 0 0 0 1 0 0 0 1", "1 0 0 nan 1 0"), "TransformMatrix = '1 0 0 nan 1 0' is not 9 finite numbers"),
    "data-file": (("= LOCAL", "= ct.raw"), "its data file 'ct.raw' (ElementDataFile) is not found"),
    "truncated": (
        ("DimSize = 16 16 3", "DimSize = 16 16 4"),
        "ct.mha holds 1,536 bytes of voxels, the header declares 16 x 16 x 4 of 2 bytes (2,048)",
    ),
    "not-metaimage": (
        ("ObjectType = Image", "<html>"),
        "not a MetaImage header: the line '<html>' is not 'Key = Value'",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=MALFORMED)
def test_a_malformed_metaimage_header_is_an_error_naming_what_is_wrong(case: str, tmp_path: Path) -> None:
    (old, new), reason = MALFORMED[case]
    assert GOOD_HEADER.count(old) == 1
    path = tmp_path / "ct.mha"
    path.write_bytes(GOOD_HEADER.encode() + np.full(16 * 16 * 3, -1000, "<i2").tobytes())
    assert index_inputs([path])[1] == []  # the file before the edit is read
    path.write_bytes(GOOD_HEADER.replace(old, new).encode("latin-1") + np.full(16 * 16 * 3, -1000, "<i2").tobytes())
    items, errors = index_inputs([path])
    assert items == [] and [error["path"] for error in errors] == [str(path)]
    assert errors[0]["reason"].startswith(reason), errors[0]["reason"]


SLICES = RNG.normal(0, 300, (20, 16, 3)).astype(np.int16)  # (x, y, z), a data file per slice
DATA_FILES = {  # name: (ElementDataFile and the lines after it, the name of slice k's file, other header lines)
    "list": ("LIST\nct1.raw\nct2.raw\nct3.raw\n", "ct{}.raw", ""),
    "list-2d-in-a-subfolder": ("LIST 2D\nslices/a1.raw\nslices/a2.raw\nslices/a3.raw\n", "slices/a{}.raw", ""),
    "pattern": ("ct%03d.raw 1 3 1\n", "ct{:03d}.raw", ""),
    "pattern-first-only": ("ct%d.raw 5\n", "ct{}.raw", ""),
    "pattern-first-and-last": ("ct%d.raw 2 9\n", "ct{}.raw", ""),  # a step of 7 // 3, the first 3 of 2, 4, 6, 8
    "pattern-with-spaces": ("my ct %02d.raw 1 3 1\n", "my ct {:02d}.raw", ""),
    "header-size-each": ("ct%d.raw 1 3 1\n", "ct{}.raw", "HeaderSize = 10\n"),
    "header-size-minus-one-each": ("ct%d.raw 1 3 1\n", "ct{}.raw", "HeaderSize = -1\n"),
    "compressed-each": ("ct%d.raw 1 3 1\n", "ct{}.raw", "CompressedData = True\n"),
}


def _data_file_header(tmp_path: Path, case: str) -> Path:
    """``SLICES`` as a .mhd header naming a data file per slice, the files written as ``DATA_FILES[case]`` says."""
    data_file, slice_name, lines = DATA_FILES[case]
    first, step = {"pattern-first-only": (5, 1), "pattern-first-and-last": (2, 2)}.get(case, (1, 1))
    for k in range(SLICES.shape[2]):
        voxels = SLICES[:, :, k].tobytes(order="F")
        voxels = zlib.compress(voxels) if "compressed" in case else voxels
        junk = b"J" * 10 if "header-size" in case else b""
        path = tmp_path / slice_name.format(first + k * step)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(junk + voxels)
    header = GOOD_HEADER.replace("DimSize = 16 16 3", "DimSize = 20 16 3").replace("CompressedData = False\n", "")
    header = header.replace("ElementDataFile = LOCAL\n", lines + "ElementDataFile = " + data_file)
    (tmp_path / "ct.mhd").write_text(header)
    return tmp_path / "ct.mhd"


@pytest.mark.parametrize("case", DATA_FILES, ids=DATA_FILES)
def test_voxels_in_a_data_file_per_slice_read_as_simpleitk_reads_them(case: str, tmp_path: Path) -> None:
    path = _data_file_header(tmp_path, case)
    image = _metaimage_image(path, pixels=True)
    assert np.array_equal(image.dataobj, SLICES)
    assert np.array_equal(SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(str(path))).transpose(), SLICES)


def test_a_pattern_counting_down_reads_its_files_in_that_order(tmp_path: Path) -> None:
    """MetaIO reads nothing for a negative step (SimpleITK returns uninitialised memory); here it counts down."""
    path = _data_file_header(tmp_path, "pattern")
    path.write_text(path.read_text().replace("ct%03d.raw 1 3 1", "ct%03d.raw 3 1 -1"))
    assert np.array_equal(_metaimage_image(path, pixels=True).dataobj, SLICES[:, :, ::-1])


def test_data_files_are_read_with_their_header_and_not_scored_as_inputs(tmp_path: Path) -> None:
    path = _data_file_header(tmp_path, "list-2d-in-a-subfolder")
    (path.parent / "notes.txt").write_text("not CT")
    items, errors = index_inputs([tmp_path])
    assert [(item["image"], item["frame"]) for item in items] == [(str(path), k) for k in range(3)]
    assert [(error["path"], error["reason"][:16]) for error in errors] == [
        (str(tmp_path / "notes.txt"), "not a DICOM file")
    ]
    (path.parent / "slices" / "a2.raw").write_bytes(b"short")  # a data file of the wrong size: its name and reason
    items, errors = index_inputs([path])
    assert items == [] and errors[0]["reason"].startswith("a2.raw holds 5 bytes of voxels, the header declares its 640")
