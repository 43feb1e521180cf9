"""MetaImage volumes (``scripts.metaimage``, read in ``scripts.ct_inputs``): valid files read as SimpleITK reads
them, voxels and geometry; malformed headers, which make SimpleITK abort the process, are errors with a reason."""

from __future__ import annotations

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
    "list-of-files": (("= LOCAL", "= LIST"), "ElementDataFile = 'LIST': voxels in several files or another folder"),
    "text-voxels": (
        ("BinaryData = True", "BinaryData = False"),
        "MetaImage voxels stored as text (BinaryData = False)",
    ),
    "channels": (("ElementType", "ElementNumberOfChannels = 3\nElementType"), "MetaImage data of 3 components a voxel"),
    "element-type": (("MET_SHORT", "MET_COMPLEX"), "ElementType = 'MET_COMPLEX' is none of MetaIO's number types"),
    "matrix": (("1 0 0 0 1 0 0 0 1", "1 0 0 nan 1 0"), "TransformMatrix = '1 0 0 nan 1 0' is not 9 finite numbers"),
    "data-file": (("= LOCAL", "= ct.raw"), "its data file 'ct.raw' (ElementDataFile) is not beside it"),
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
