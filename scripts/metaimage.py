"""MetaImage headers (``.mha``, ``.mhd``): ITK's format, which grand-challenge.org and LUNA16 use for CT.

A header is ``Key = Value`` lines ending with ``ElementDataFile``: ``LOCAL`` (the voxels follow in the same file,
an ``.mha``), the name of a data file (an ``.mhd`` and its ``.raw``), or several data files of a slice (or of a
volume of a 4-D image) each, as MetaIO writes and reads them: ``LIST [kD]`` with a file name per line after it,
or a pattern ``name%03d.raw [first [last [step]]]``. Names are relative to the header's folder unless absolute;
``HeaderSize`` and ``CompressedData`` apply to each data file. Parsed here, in Python, because
ITK's MetaIO (through SimpleITK) aborts or crashes the whole process on malformed headers: ``NDims = -1``, or a
garbled ``ElementDataFile``, among the first few thousand fuzzed files. The reader (``scripts.ct_inputs``) then
reads the voxels as SimpleITK does: the tests compare the two on valid files.
"""

from __future__ import annotations

import math
import re
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
MAX_NAME_CHARS = 255  # a longer data file name is a damaged header
MAX_DATA_FILES = 100_000  # a LIST or a pattern naming more files is refused: real ones name one per slice
MAX_LIST_BYTES = 64 * 2**20  # the names of a LIST, read after the header
PATTERN = re.compile(r"[^%]*%0?[0-9]{0,2}[di][^%]*")  # one whole-number field, as MetaIO's sprintf takes it


@dataclass(frozen=True)
class MetaImageHeader:
    """What a MetaImage header declares. ``shape`` in the header's order (x first), ``directions`` with a column
    per axis (ITK's direction matrix, in LPS), ``data_files`` the files of the voxels in their order, each holding
    an equal share of them (none: in the header's own file), from byte ``data_offset`` of each (-1: its last bytes,
    MetaImage's ``HeaderSize = -1``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    directions: np.ndarray
    data_files: tuple[Path, ...]
    data_offset: int
    compressed: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the voxels, uncompressed."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def file_nbytes(self) -> int:
        """Bytes of the voxels in each data file (or in the header's own file), uncompressed."""
        return self.nbytes // max(1, len(self.data_files))


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


def _check_file_count(data_name: str, count: int) -> None:
    """``ValueError`` when the header needs more data files than ``MAX_DATA_FILES``: a damaged ``DimSize``."""
    if count > MAX_DATA_FILES:
        raise ValueError(f"ElementDataFile = {data_name[:40]!r}: {count:,} files, over the cap of {MAX_DATA_FILES:,}")


def _listed_files(path: Path, after: int, data_name: str, shape: tuple[int, ...]) -> list[str]:
    """The names of ``ElementDataFile = LIST [kD]``: one a line after the header (its first ``after`` bytes), a
    file per ``k``-D block of the voxels (k = NDims - 1 when not given or not from 1 to NDims)."""
    words = data_name.split()
    dims = re.match(r"[0-9]+", words[1]) if len(words) > 1 else None
    if len(words) > 1 and (dims is None or words[1][dims.end() :] not in ("", "D", "d")):
        raise ValueError(f"ElementDataFile = {data_name[:40]!r}: LIST takes the files' dimensions, as LIST 2D")
    file_dims = int(dims.group()) if dims else 0
    file_dims = file_dims if 1 <= file_dims <= len(shape) else len(shape) - 1
    count = math.prod(shape[file_dims:])
    _check_file_count(data_name, count)
    with open(path, "rb") as stream:
        stream.seek(after)
        text = stream.read(MAX_LIST_BYTES).decode("latin-1")
    names: list[str] = []
    for line in filter(None, map(str.strip, text.splitlines())):
        if len(names) == count or not line.isprintable() or len(line) > MAX_NAME_CHARS:
            break  # the names end where the header's file does, or where other bytes follow them
        names.append(line)
    if len(names) < count:
        raise ValueError(
            f"ElementDataFile = LIST names {len(names):,} files, DimSize {' x '.join(map(str, shape))} needs "
            f"{count:,} of {file_dims}-D blocks"
        )
    return names


def _pattern_files(data_name: str, count: int) -> list[str]:
    """The names of ``ElementDataFile = name%03d.raw [first [last [step]]]``, the first ``count``, a file per slice:
    numbered from ``first`` (1) by ``step`` (1; (last - first) / count, whole, when only ``last`` is given), as
    MetaIO reads them, and counting down for a negative step (where MetaIO reads nothing); a name with spaces ends in
    all three numbers."""
    _check_file_count(data_name, count)
    words = data_name.split()
    numbers: list[int] = []
    while len(words) > 1 and len(numbers) < 3 and re.fullmatch(r"[+-]?[0-9]+", words[-1]):
        numbers.insert(0, int(words.pop()))
    name = " ".join(words)
    if not PATTERN.fullmatch(name):
        raise ValueError(f"ElementDataFile = {data_name[:60]!r} is not a file name with one %d field for the slice")
    first = numbers[0] if numbers else 1
    last = numbers[1] if len(numbers) > 1 else first + count - 1
    step = numbers[2] if len(numbers) > 2 else int((last - first) / count) or 1  # MetaIO loops for ever on 0
    if step == 0 or (last - first) * step < 0:
        raise ValueError(f"ElementDataFile = {data_name[:60]!r}: no run of numbers from {first} to {last} by {step}")
    indices = range(first, last + (1 if step > 0 else -1), step)
    if len(indices) < count:
        raise ValueError(
            f"ElementDataFile = {data_name[:60]!r} numbers {len(indices):,} files, the header's DimSize needs {count:,}"
        )
    return [name % index for index in indices[:count]]


def read_header(path: Path) -> MetaImageHeader:
    """The header of the MetaImage file ``path``; ``ValueError`` with the reason when it is not one this reader
    takes (voxels of several channels or as text are refused by name)."""
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
    if not data_name.isprintable() or len(data_name) > MAX_NAME_CHARS:
        raise ValueError(f"ElementDataFile = {data_name[:24]!r}... is not a file name: the header is damaged")
    if not data_name:
        raise ValueError("ElementDataFile is empty: it must be LOCAL, a data file's name, LIST or a pattern")
    try:
        offset = end if data_name.upper() == "LOCAL" else int(fields.get("HeaderSize", "0"))
    except ValueError:
        raise ValueError(f"HeaderSize = {fields['HeaderSize'][:40]!r} is not a whole number") from None
    if data_name.upper() == "LOCAL":
        names = []
    elif data_name.split()[0] == "LIST":
        names = _listed_files(path, end, data_name, shape)
    elif "%" in data_name:
        names = _pattern_files(data_name, shape[-1])
    else:
        names = [data_name]
    return MetaImageHeader(
        shape=shape,
        dtype=np.dtype(ELEMENT_TYPES[element]).newbyteorder(">" if big_endian else "<"),
        spacing=_numbers(fields, ("ElementSpacing", "ElementSize"), dimensions, [1.0] * dimensions),
        origin=_numbers(fields, ("Offset", "Position", "Origin"), dimensions, [0.0] * dimensions),
        directions=np.asarray(matrix).reshape(dimensions, dimensions).T,  # a row of the file's matrix per axis
        data_files=tuple(path.parent / name for name in names),  # an absolute name stays as it is
        data_offset=offset,
        compressed=fields.get("CompressedData", "False").lower() in TRUE,
    )


def data_files(path: Path) -> tuple[Path, ...]:
    """The data files a ``.mhd`` header names; none for ``LOCAL`` or a header that cannot be read. They are the
    volume's voxels, not inputs of their own."""
    try:
        return read_header(path).data_files
    except (OSError, ValueError):
        return ()
