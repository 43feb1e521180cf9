"""JPEG 2000 DICOM decoded on several cores: a pydicom decoder plugin that runs OpenJPEG through imagecodecs.

pydicom's default JPEG 2000 decoder (pylibjpeg-openjpeg) decodes a frame on one core and holds the GIL: 30-60 ms
for a 512 x 512 CT slice, the slowest stage of scoring a compressed archive by far. imagecodecs wraps the same
OpenJPEG with its thread pool, which decodes a frame's code blocks in parallel. The plugin returns the bytes
pylibjpeg's would (samples in a container sized by the codestream's precision), so pydicom's own handling after
decoding (a codestream's sign against Pixel Representation, then the modality LUT) is unchanged. It decodes
monochrome frames only; colour, and any frame it cannot decode, are left to pydicom's other plugins.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from pydicom.uid import JPEG2000TransferSyntaxes

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN = "imagecodecs-threaded"
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2024.9.22",) for uid in JPEG2000TransferSyntaxes}


def is_available(uid: str) -> bool:
    """Whether imagecodecs is installed with its JPEG 2000 codec (a pydicom plugin's required function)."""
    try:
        import imagecodecs
    except ImportError:
        return False
    return uid in JPEG2000TransferSyntaxes and bool(imagecodecs.JPEG2K.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One monochrome JPEG 2000 frame, as pylibjpeg-openjpeg would give it: a container of 1, 2 or 4 bytes a
    sample by the codestream's precision. The option ``j2k_threads`` (default 1) sets OpenJPEG's threads."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise ValueError("colour JPEG 2000 is left to pydicom's other decoders")
    frame = imagecodecs.jpeg2k_decode(src, numthreads=int(runner.get_option("j2k_threads", 1)))
    precision = runner.get_option("j2k_precision", runner.bits_stored)
    container = 1 if precision <= 8 else 2 if precision <= 16 else 4
    if frame.ndim != 2 or frame.dtype.itemsize != container:
        raise ValueError(f"decoded a {frame.dtype} frame of shape {frame.shape} for precision {precision}")
    runner.set_option("bits_allocated", 8 * container)
    return frame.tobytes()


def decode_threads() -> int:
    """OpenJPEG threads for one decode: this process's cores shared by the processes that decode at once (a
    DataLoader's workers, or torchrun's local ranks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker = torch.utils.data.get_worker_info()
    sharing = worker.num_workers if worker is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, sharing))


def decoding_options(ds: Any) -> dict[str, Any]:
    """Options for ``pydicom.pixels.pixel_array`` that decode ``ds`` with this plugin on ``decode_threads()``
    cores; none (pydicom's own choice) for another transfer syntax or where imagecodecs is missing."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in JPEG2000TransferSyntaxes or ds.get("SamplesPerPixel", 1) != 1 or not is_available(syntax):
        return {}
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(syntax)
    if PLUGIN not in decoder.available_plugins:
        try:
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # another thread added it first
            pass
    return {"decoding_plugin": PLUGIN, "j2k_threads": decode_threads()}
