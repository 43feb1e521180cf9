"""MetaImage headers (``.mha``, ``.mhd``): ITK's format, which grand-challenge.org and LUNA16 use for CT.

A header is ``Key = Value`` lines ending with ``ElementDataFile``: ``LOCAL`` (the voxels follow in the same file,
an ``.mha``) or the name of a data file beside it (an ``.mhd`` and its ``.raw``). Parsed here, in Python, because
ITK's MetaIO (through SimpleITK) aborts or crashes the whole process on malformed headers: ``NDims = -1``, or a
garbled ``ElementDataFile``, among the first few thousand fuzzed files. The reader (``scripts.ct_inputs``) then
reads the voxels as SimpleITK does: the tests compare the two on valid files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEAD_BYTES = 65536  # a header is at most this long: real ones take a few hundred bytes
ELEMENT_TYPES = {  # MetaIO's element types as numpy types (MET_LONG is 4 bytes in MetaIO)
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class MetaImageHeader:
    """What a MetaImage header declares. ``shape`` in the header's order (x first), ``directions`` with a column
    per axis (ITK's direction matrix, in LPS), ``data_file`` None for voxels in the header's own file, from byte
    ``data_offset`` (-1: the last bytes of the data file, MetaImage's ``HeaderSize = -1``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    directions: np.ndarray
    data_file: Path | None
    data_offset: int
    compressed: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the voxels, uncompressed."""
        return math.prod(self.shape) * self.dtype.itemsize


def _numbers(fields: dict[str, str], keys: tuple[str, ...], count: int, default: list[float]) -> tuple[float, ...]:
    """The ``count`` finite numbers of the first of ``keys`` the header has, else ``default``."""
    key = next((key for key in keys if key in fields), None)
    if key is None:
        return tuple(default)
    try:
        values = [float(value) for value in fields[key].split()]
    except ValueError:
        raise ValueError(f"{key} = {fields[key][:60]!r} is not {count} numbers") from None
    if len(values) < count or not all(math.isfinite(value) for value in values):
        raise ValueError(f"{key} = {fields[key][:60]!r} is not {count} finite numbers")
    return tuple(values[:count])


def read_header(path: Path) -> MetaImageHeader:
    """The header of the MetaImage file ``path``; ``ValueError`` with the reason when it is not one this reader
    takes (voxels of several channels, as text, or spread over a list of files are refused by name)."""
    with open(path, "rb") as stream:
        head = stream.read(HEAD_BYTES)
    fields: dict[str, str] = {}
    position, end = 0, -1
    while position < len(head):
        newline = head.find(b"\n", position)
        line = head[position : len(head) if newline < 0 else newline].decode("latin-1").strip()
        position = len(head) if newline < 0 else newline + 1
        key, equals, value = line.partition("=")
        if line and not equals:
            raise ValueError(f"not a MetaImage header: the line {line[:60]!r} is not 'Key = Value'")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            end = position
            break
    if end < 0:
        raise ValueError(f"not a MetaImage header: no ElementDataFile line in its first {HEAD_BYTES} bytes")
    if fields.get("ObjectType", "Image").strip().lower() != "image":
        raise ValueError(f"ObjectType = {fields['ObjectType'][:40]!r}: not an image")
    try:
        dimensions = int(fields.get("NDims", ""))
        shape = tuple(int(side) for side in fields.get("DimSize", "").split())
    except ValueError:
        raise ValueError("NDims and DimSize must be whole numbers") from None
    if not 1 <= dimensions <= 4 or len(shape) != dimensions or min(shape) < 1:
        raise ValueError(f"NDims = {dimensions} with DimSize = {shape}: not an image of 1 to 4 dimensions")
    element = fields.get("ElementType", "")
    if element not in ELEMENT_TYPES:
        raise ValueError(f"ElementType = {element[:40]!r} is none of MetaIO's number types")
    channels = fields.get("ElementNumberOfChannels", "1")
    if channels != "1":
        raise ValueError(f"MetaImage data of {channels[:20]} components a voxel (colour or vectors)")
    if fields.get("BinaryData", "True").lower() not in TRUE:
        raise ValueError("MetaImage voxels stored as text (BinaryData = False) are not read")
    big_endian = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower() in TRUE
    matrix = _numbers(
        fields, ("TransformMatrix", "Rotation", "Orientation"), dimensions**2, np.eye(dimensions).ravel().tolist()
    )
    data_name = fields["ElementDataFile"]
    if not data_name.isprintable() or len(data_name) > 255:
        raise ValueError(f"ElementDataFile = {data_name[:24]!r}... is not a file name: the header is damaged")
    if data_name.upper() == "LOCAL":
        data_file, offset = None, end
    elif data_name.upper().startswith("LIST") or "%" in data_name or Path(data_name).name != data_name:
        raise ValueError(f"ElementDataFile = {data_name[:60]!r}: voxels in several files or another folder")
    else:
        try:
            data_file, offset = path.parent / data_name, int(fields.get("HeaderSize", "0"))
        except ValueError:
            raise ValueError(f"HeaderSize = {fields['HeaderSize'][:40]!r} is not a whole number") from None
    return MetaImageHeader(
        shape=shape,
        dtype=np.dtype(ELEMENT_TYPES[element]).newbyteorder(">" if big_endian else "<"),
        spacing=_numbers(fields, ("ElementSpacing", "ElementSize"), dimensions, [1.0] * dimensions),
        origin=_numbers(fields, ("Offset", "Position", "Origin"), dimensions, [0.0] * dimensions),
        directions=np.asarray(matrix).reshape(dimensions, dimensions).T,  # a row of the file's matrix per axis
        data_file=data_file,
        data_offset=offset,
        compressed=fields.get("CompressedData", "False").lower() in TRUE,
    )


def data_file_name(path: Path) -> str | None:
    """The name of the data file a ``.mhd`` header names beside it; None for ``LOCAL`` or a header that cannot be
    read. That file is the volume's voxels, not an input of its own."""
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return None
    return None if header.data_file is None else header.data_file.name
