"""Faster decoders for CT: a pydicom decoder plugin that decodes compressed frames through imagecodecs, and the
usual uncompressed frame read straight from its bytes (``native_frame``).

pydicom's default decoders (the pylibjpeg plugins) are the slowest stage of scoring a compressed archive. For a
512 x 512 CT slice on this project's 2-core machine:

- JPEG 2000 and HTJ2K: pylibjpeg-openjpeg decodes a frame on one core, holding Python's lock, in 25-55 ms.
  imagecodecs runs the same OpenJPEG with its thread pool, which decodes a frame's code blocks in parallel.
- JPEG lossless (processes 14 and 14 SV1, the usual lossless syntax of PACS exports): pylibjpeg-libjpeg takes
  about 15 ms, libjpeg-turbo through imagecodecs about 2 ms.
- JPEG-LS: CharLS through imagecodecs is about ten times faster than pylibjpeg-libjpeg.

The plugin returns the bytes pylibjpeg's would (the same samples in the same container), so what pydicom does after
decoding (a codestream's sign against Pixel Representation, then the modality LUT) is unchanged. It decodes
monochrome frames only; colour, lossy JPEG (whose decoders may round differently), and any frame it cannot decode
are left to pydicom's other plugins.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)
from scripts.engines import usable_cores

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN = "imagecodecs-fast"
JPEG_LOSSLESS_SYNTAXES = (JPEGLossless, JPEGLosslessSV1)
SYNTAXES = (*JPEG2000TransferSyntaxes, *JPEG_LOSSLESS_SYNTAXES, *JPEGLSTransferSyntaxes)
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2024.9.22",) for uid in SYNTAXES}
CODESTREAM_SYNTAXES = (*JPEG2000TransferSyntaxes, *JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)
J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ: a JPEG 2000 codestream's first two markers
J2K_SEARCH = 4096  # bytes searched for them: a JP2 file puts its header boxes before the codestream
SOS = b"\xff\xda"  # a JPEG scan's first marker: entropy-coded data follow every 0xFF with 0x00 or RSTn, never 0xDA
MAX_JPEG_SCANS = 100  # scans a progressive JPEG may hold: encoders write 6 to 12 (a sequential one: one a component)
PROGRESSIVE_FRAMES = (0xC2, 0xC6, 0xCA, 0xCE)  # SOF2, SOF6, SOF10, SOF14
SCAN_CHUNK = 1 << 20  # bytes read at a time while counting scans; the frame header is looked for in the first piece


def is_available(uid: str) -> bool:
    """Whether imagecodecs is installed with the codec for ``uid`` (a pydicom plugin's required function)."""
    try:
        import imagecodecs
    except ImportError:
        return False
    if uid in JPEG2000TransferSyntaxes:
        return bool(imagecodecs.JPEG2K.available)
    if uid in JPEG_LOSSLESS_SYNTAXES:
        return bool(imagecodecs.JPEG8.available)
    return uid in JPEGLSTransferSyntaxes and bool(imagecodecs.JPEGLS.available)


def _jpeg_frame_header(src: bytes) -> int | None:
    """Where a JPEG or JPEG-LS codestream's frame header (SOFn, or JPEG-LS's SOF55) starts, found by walking its
    marker segments from SOI; None when a scan or the end comes first."""
    position = 2  # after SOI
    while position + 4 <= len(src) and src[position] == 0xFF:
        marker = src[position + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:  # not DHT, JPG, DAC
            return position
        if marker == 0xDA:  # a scan before any frame header
            return None
        position += 2 + int.from_bytes(src[position + 2 : position + 4], "big")
    return None


def is_lossless_jpeg(src: bytes) -> bool:
    """Whether a JPEG codestream's frame header is a lossless one (SOF3, SOF7, SOF11 or SOF15)."""
    position = _jpeg_frame_header(src)
    return position is not None and src[position + 1] in (0xC3, 0xC7, 0xCB, 0xCF)


def codestream_shape(src: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) that a JPEG, JPEG-LS or JPEG 2000 codestream declares: its frame header (JPEG
    2000's SIZ segment, also inside a JP2 file's boxes), read from its first bytes. Rows 0: a JPEG that gives them
    later (in a DNL segment). None where no such header can be read."""
    if src[:2] == b"\xff\xd8":
        position = _jpeg_frame_header(src)
        if position is None or position + 10 > len(src):
            return None
        rows, columns = (int.from_bytes(src[at : at + 2], "big") for at in (position + 5, position + 7))
        return rows, columns, src[position + 9]
    start = src.find(J2K_START, 0, J2K_SEARCH)
    if start < 0 or start + 42 > len(src):
        return None
    width, height, left, top = (int.from_bytes(src[at : at + 4], "big") for at in range(start + 8, start + 24, 4))
    return height - top, width - left, int.from_bytes(src[start + 40 : start + 42], "big")


class Readable(Protocol):
    """A file, or tifffile's file handle."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (-1: all that are left)."""


def count_scans(data: bytes | memoryview) -> int:
    """The FF DA pairs in ``data``: found with numpy, five times as fast as ``bytes.count`` here (60 against
    330 us for a 358 KB JPEG lossless frame, which takes 2 to 4 ms to decode)."""
    values = np.frombuffer(data, np.uint8)
    before = np.flatnonzero(values[1:] == SOS[1])  # where a DA follows
    return int(np.count_nonzero(values[before] == SOS[0]))


def scan_limit(head: bytes) -> tuple[int, int, str]:
    """(where a JPEG or JPEG-LS codestream's frame header starts in ``head``, its first bytes; the scans it may hold;
    why). A sequential, lossless or JPEG-LS frame codes each component in one scan, so it holds at most as many scans
    as components; a progressive one (or one whose frame header is not in ``head``) up to ``MAX_JPEG_SCANS``."""
    position = _jpeg_frame_header(head)
    if position is None or position + 10 > len(head):
        return 0, MAX_JPEG_SCANS, "MAX_JPEG_SCANS"
    if head[position + 1] in PROGRESSIVE_FRAMES:
        return position, MAX_JPEG_SCANS, "MAX_JPEG_SCANS; progressive JPEGs have 6 to 12"
    components = head[position + 9]
    return position, max(1, components), f"one a component, and its frame has {components}"


def check_jpeg_scans(source: bytes | Readable, size: int = -1) -> None:
    """``ValueError`` when a JPEG or JPEG-LS codestream holds more scans after its frame header than ``scan_limit``
    allows: ``source`` itself, or the next ``size`` bytes of a stream (all of it: -1), read a piece at a time and
    counted until past the limit (APPn segments before the frame header, such as an EXIF thumbnail, not counted).

    Decoders pass over the whole image once a scan, however few bytes the scan holds: a 4096 x 4096 progressive
    JPEG of 200 KB repeating one 33-byte scan 3000 times took 31 s to read as a .jpg and 86 s as a DICOM frame (at
    100 scans, 1 and 2.8 s); a 2048 x 2048 JPEG-LS frame followed by 200 empty scans (2.7 KB in all) 90 s, a JPEG
    lossless one 15 s."""
    if isinstance(source, bytes):
        start, limit, why = scan_limit(source)
        scans = count_scans(memoryview(source)[start:])
    else:
        head = source.read(int(min(SCAN_CHUNK, size if size >= 0 else SCAN_CHUNK)))
        start, limit, why = scan_limit(head)
        scans, carry, left = count_scans(head[start:]), head[-1:], size - len(head) if size >= 0 else float("inf")
        while left > 0 and scans <= limit:
            chunk = source.read(int(min(SCAN_CHUNK, left)))
            if not chunk:
                break
            left -= len(chunk)
            scans += count_scans(carry + chunk)
            carry = chunk[-1:]  # a marker split between two pieces; a DA kept here cannot begin one
    if scans > limit:
        raise ValueError(
            f"the JPEG codestream holds more than {limit} scan{'s' if limit > 1 else ''} ({why}): decoders pass over "
            "the whole image once a scan, so it would take minutes; the file is damaged or hostile"
        )


def check_codestream(ds: Any, index: int = 0) -> None:
    """``ValueError`` when compressed frame ``index`` declares another size than the header's Rows x Columns, or
    other components than its Samples per Pixel, or (JPEG) holds more scans than ``scan_limit`` allows.

    Decoders size their output by the codestream: a few KB that declare 60000 x 60000 pixels made the JPEG-LS and
    JPEG lossless decoders allocate gigabytes and fail after 210 and 110 s on 2 cores, and a 512 x 512 JPEG 2000
    frame declaring 6000 components took OpenJPEG 3.4 GiB. Checked before any decoder runs; frames of other
    syntaxes, and frames whose codestream cannot be read here, are left to the decoders."""
    from pydicom.encaps import get_frame

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in CODESTREAM_SYNTAXES or "PixelData" not in ds:
        return
    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
        rows, columns, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception:  # malformed: pydicom's decoders say what is wrong
        return
    shape = codestream_shape(frame)
    if shape is None:
        return
    damaged = "the pixel data is damaged or belongs to another image"
    if shape[1] != columns or shape[0] not in (0, rows):
        raise ValueError(
            f"the compressed frame declares {shape[0]} x {shape[1]} pixels, the header {rows} x {columns} "
            f"(Rows x Columns): {damaged}"
        )
    if shape[2] != samples:
        raise ValueError(
            f"the compressed frame declares {shape[2]} components, the header {samples} (SamplesPerPixel): {damaged}"
        )
    if frame[:2] == b"\xff\xd8":
        check_jpeg_scans(frame)


def _container_bits(precision: int) -> int:
    return 8 if precision <= 8 else 16 if precision <= 16 else 32


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One monochrome frame, as the pylibjpeg plugins would give it. JPEG 2000 and JPEG-LS samples come in a
    container of 1, 2 or 4 bytes by the codestream's precision, JPEG lossless ones in Bits Allocated. The option
    ``decode_threads`` (default 1) sets OpenJPEG's threads."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise ValueError("colour is left to pydicom's other decoders")
    syntax = runner.transfer_syntax
    if syntax in JPEG2000TransferSyntaxes:
        frame = imagecodecs.jpeg2k_decode(src, numthreads=int(runner.get_option("decode_threads", 1)))
        bits = _container_bits(runner.get_option("j2k_precision", runner.bits_stored))
    elif syntax in JPEGLSTransferSyntaxes:
        frame = imagecodecs.jpegls_decode(src)
        bits = _container_bits(runner.get_option("jls_precision", runner.bits_stored))
    else:  # lossless JPEG only: a lossy stream under a lossless syntax is left to pydicom's decoders
        if not is_lossless_jpeg(src):
            raise ValueError("not a lossless JPEG codestream")
        frame = imagecodecs.jpeg8_decode(src)
        bits = runner.bits_allocated
        if frame.dtype.itemsize < bits // 8:  # 8-bit samples allocated 16 bits
            frame = frame.astype(f"u{bits // 8}")
    if frame.ndim != 2 or 8 * frame.dtype.itemsize != bits:
        raise ValueError(f"decoded a {frame.dtype} frame of shape {frame.shape} for a {bits}-bit container")
    runner.set_option("bits_allocated", bits)
    return frame.tobytes()


def native_layout(ds: Any) -> tuple[int, int, int, int, int] | None:
    """(rows, columns, frames, bits stored, signed) of uncompressed little-endian 16-bit monochrome pixel data, the
    usual CT slice, which ``unpack_native`` reads straight from its bytes; from the header alone (the pixels may be
    left in the file). None for anything else, which pydicom decodes."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or "PixelData" not in ds:
        return None
    try:
        rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
        allocated, stored, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):  # a missing or malformed element: pydicom says what is wrong
        return None
    if allocated != 16 or not 0 < stored <= 16 or signed not in (0, 1) or samples != 1 or frames < 1:
        return None
    return rows, columns, frames, stored, signed


def native_frame(ds: Any, index: int = 0) -> np.ndarray | None:
    """One frame of the pixel data ``native_layout`` describes, read straight from its bytes: the array pydicom's
    ``pixel_array`` gives (its values and type, the bits above Bits Stored cleared and signed values sign-extended),
    without its decoder's checks, which cost a 512 x 512 slice about 0.35 ms, as long as reading the file. None for
    anything else, which pydicom decodes."""
    layout = native_layout(ds)
    if layout is None:
        return None
    rows, columns, frames, stored, signed = layout
    data = ds.PixelData
    if not 0 <= index < frames or not isinstance(data, bytes) or len(data) != 2 * rows * columns * frames:
        return None
    return unpack_native(data, rows, columns, stored, signed, index)


def unpack_native(data: bytes, rows: int, columns: int, stored: int, signed: int, index: int = 0) -> np.ndarray:
    """Frame ``index`` of little-endian 16-bit pixel data (``native_layout``) as pydicom's ``pixel_array`` gives it."""
    size = rows * columns
    frame = np.frombuffer(data, "<u2", size, 2 * size * index).reshape(rows, columns)
    if stored < 16:
        frame = frame & np.uint16((1 << stored) - 1)
        if signed:
            sign = np.int32(1 << (stored - 1))
            return ((frame.astype(np.int32) ^ sign) - sign).astype(np.int16)
    return frame.astype(np.int16 if signed else np.uint16)  # a copy, native-endian and writable


def decode_threads() -> int:
    """Threads for one decode: this process's cores shared by the processes that decode at once (torchrun's local
    ranks, times each one's DataLoader workers)."""
    cores = usable_cores()
    worker = torch.utils.data.get_worker_info()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // (ranks * (worker.num_workers if worker is not None else 1)))


def register_plugin(syntax: str) -> None:
    """Add the plugin to pydicom's decoder of ``syntax``, once."""
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(syntax)
    if PLUGIN not in decoder.available_plugins:
        try:
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # another thread added it first
            pass


def decoding_options(ds: Any) -> dict[str, Any]:
    """Options for ``pydicom.pixels.pixel_array`` that decode ``ds`` with this plugin (JPEG 2000 on
    ``decode_threads()`` cores); none, pydicom's own choice, for another transfer syntax, a colour image, or where
    imagecodecs is missing."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in SYNTAXES or ds.get("SamplesPerPixel", 1) != 1 or not is_available(syntax):
        return {}
    register_plugin(syntax)
    return {"decoding_plugin": PLUGIN, "decode_threads": decode_threads()}
