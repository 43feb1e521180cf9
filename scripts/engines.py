"""How the bundle's trainers and evaluators feed the network: reader processes, batch preparation, mixed
precision (``amp``), memory format (``channels_last``) and ``torch.compile`` (``compile``), each a top-level
config id."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, cast

import torch
from monai.data import MetaTensor
from monai.engines import PrepareBatch
from monai.inferers import Inferer
from scripts.options import AMP_DTYPES, OptionError, amp_choice, channels_last_choice, compile_mode, worker_count
from torch import nn

# the dtype of each name scripts.options takes
AMP_NAMES: dict[str, torch.dtype] = {word: getattr(torch, dtype) for word, dtype in AMP_DTYPES.items()}


def amp_dtype(amp: Any, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype the ``amp`` id asks for: None (false/0), bf16 or fp16 by name; true means bf16 on a CUDA
    GPU that supports it, else fp16 there, and nothing on a CPU (where bf16 is slower on most processors and, at
    the start of training, can round every prediction to the same value; ask for it by name)."""
    choice = amp_choice(amp)
    if isinstance(choice, str):
        return AMP_NAMES[choice]
    if not choice or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def usable_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None or "": the first CUDA GPU, else the CPU); ``OptionError`` for a name torch
    does not know or a device this machine lacks (``cuda`` without a CUDA GPU, ``cuda:2`` with two), which torch
    would only report at the first tensor sent there, in words about something else."""
    if device is None or device == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise OptionError(f"device {device!r}: no CUDA GPU is usable here; leave device unset or use cpu")
        if chosen.index is not None and chosen.index >= count:
            raise OptionError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {device!r}: Apple's MPS is not usable here; leave device unset or use cpu")
    return chosen


def needs_grad_scaler(amp: Any, device: str | torch.device = "cpu") -> bool:
    """Whether training needs a gradient scaler (MONAI's ``amp`` flag of the trainer): fp16 on a CUDA GPU."""
    return amp_dtype(amp, device) == torch.float16 and torch.device(device).type == "cuda"


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the device's type with ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def wants_channels_last(channels_last: Any, device: str | torch.device) -> bool:
    """The ``channels_last`` id: true or false, or ``"auto"``: on a CUDA GPU (the paper network's bf16 forward ran
    1.27 times as fast on an H100), not on a CPU, where it gains little."""
    choice = channels_last_choice(channels_last)
    return torch.device(device).type == "cuda" if choice == "auto" else bool(choice)


def place_network(network: nn.Module, device: str | torch.device, channels_last: Any = False) -> nn.Module:
    """The network on ``device``, in the channels-last memory format when asked (``wants_channels_last``; faster
    convolutions on GPUs with tensor cores; the numbers are the same)."""
    network = network.to(device)
    if wants_channels_last(channels_last, device):
        network = network.to(memory_format=torch.channels_last)
    return network


def use_cudnn_autotuner(device: str | torch.device) -> None:
    """cuDNN's autotuner (``torch.backends.cudnn.benchmark``) on, for inference on a CUDA GPU only: slices come resized
    to one size, so the fastest kernels found for it are kept (1.12 times the paper network's bf16 forward on an
    H100). A CPU run leaves the process-wide flag as it is."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def wants_compile(compile: Any) -> bool:
    """Whether the ``compile`` id asks for ``torch.compile`` (the engines' ``compile`` flag)."""
    return compile_mode(compile) is not None


def compile_kwargs(compile: Any = True, frozen: bool = False) -> dict[str, Any]:
    """``torch.compile``'s arguments for the ``compile`` id: its mode as inductor's options and, for a network that
    only scores (``frozen``), frozen weights: inductor makes them constants and folds each BatchNorm into its
    convolution (the paper network in bf16 on an H100: 1293 slices/s, 923 without). Never frozen for training or
    its validation, whose weights change between calls."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(compile_mode(compile) or "default"))
    return {"options": {**options, "freezing": True} if frozen else options}


def compiled_for_inference(network: nn.Module, compile: Any = True) -> nn.Module:
    """``torch.compile`` for scoring, which never trains (``compile_kwargs`` frozen), in the mode ``compile`` names.

    A network that scores crops (``scripts.patches.PatchScorer``) keeps its tiling uncompiled, and its network of one
    crop is compiled: scoring calls ``score_with_spread``, which a compiled module would run uncompiled."""
    from scripts.patches import PatchScorer  # patches imports this module

    arguments = compile_kwargs(compile, frozen=True)
    if isinstance(network, PatchScorer):
        return network.around(cast(nn.Module, torch.compile(network.network, **arguments)))
    return cast(nn.Module, torch.compile(network, **arguments))  # an OptimizedModule


# "auto" on a GPU: an H100 host read 952 / 1412 / 1599 DICOM slices/s with 2 / 4 / 8 of them; an H200 host scored a
# 1000-slice series at 0.84 and 0.82 of the bare forward with 4, 0.81 and 0.77 with 8
GPU_READERS = 4
IN_PROCESS_SLICES = 128  # "auto" on a GPU reads a run of this many slices or fewer in the network's process


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a batch scheduler or ``taskset`` sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reader_processes(num_workers: Any, device: str | torch.device = "cpu", slices: int | None = None) -> int:
    """The DataLoader worker processes that read slices: a number as given; ``"auto"``: none on a CPU device, and on
    a GPU ``GPU_READERS`` (at most the cores) or, for a run of ``slices`` <= ``IN_PROCESS_SLICES``, none.

    On a CPU the network's threads already keep every core busy: a reader running beside them (a process or a
    thread) delays one of them, and every parallel operation waits for its slowest thread, so the network loses far
    more time than the reading takes (2 cores: 0.65-0.86 of the bare network with a reader thread, 0.90-0.99 reading
    between batches). Reading in this process also spares the copy of every slice between processes. A GPU leaves
    the cores to the readers, but handing them a run took 0.2-0.3 s when they were started for each run, more than
    reading 100 slices here (1.3 ms each on an H100 host) while the GPU scores the batch before; scoring now starts
    them once, with its network (``scripts.clinical.score.SliceReaders``).
    """
    count = worker_count(num_workers)
    if isinstance(count, int):
        return count
    if torch.device(device).type == "cpu" or (slices is not None and slices <= IN_PROCESS_SLICES):
        return 0
    return min(GPU_READERS, usable_cores())


class AutocastInferer(Inferer):
    """The network's output under autocast (``amp_dtype``), returned as float32 so that losses and metrics keep
    full precision: training's inferer, where MONAI's ``amp`` flag only autocasts on CUDA."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        with autocast(inputs.device, self.dtype):
            outputs = network(inputs, *args, **kwargs)
        return outputs.float()


class PlainTensorBatch(PrepareBatch):
    """``(image, label)`` of a dictionary batch as plain tensors on ``device``, optionally preprocessed there.

    The data pipeline keeps ``MetaTensor`` images so handlers can name each file (they read
    ``engine.state.batch``), but the network gains nothing from metadata and every operation on
    a ``MetaTensor`` pays for tracking it; stripping it here makes the workflows run as fast as a
    bare PyTorch loop. With ``preprocess`` (``scripts.transforms.BatchPreprocess``) the images arrive as read
    (HU at native size, padded to one size by ``scripts.patches.pad_collate``, which records each one's own) and
    are windowed, resized and normalised as one batch on the device, after a non-blocking copy (from pinned
    memory where the loader pins it). With ``augment`` (``BatchFlipRotate``, training) the batch is then
    augmented there.
    """

    def __init__(self, channels_last: Any = False, preprocess: Any = None, augment: Any = None) -> None:
        wants_channels_last(channels_last, "cpu")  # a bad value fails here, not at the first batch
        self.channels_last = channels_last
        self.preprocess = preprocess
        self.augment = augment

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = _plain(batchdata["image"]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.preprocess is not None:
            flags = batchdata.get("hu", [False] * len(image))  # no flags: rendered slices only
            image = self.preprocess(image, flags, batchdata.get("spatial_shape"))
        if self.augment is not None:
            image = self.augment(image)
        if image.ndim == 4 and wants_channels_last(self.channels_last, image.device):
            image = image.contiguous(memory_format=torch.channels_last)
        label = batchdata.get("label")
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            label = None
        return image, label


def _plain(image: Any) -> torch.Tensor:
    return image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)


class BatchFlipRotate:
    """The paper's training augmentation (random horizontal and vertical flips, random 90-degree rotations, each with
    probability ``prob``; MONAI's ``RandFlipd`` x 2 and ``RandRotate90d``), drawn per slice but applied to the whole
    batch on its device, after the cached slices arrive there: no per-slice loop in the data loader.

    The draws come from torch's global generator (seeded by ``set_determinism``, saved and restored with the last
    state). Slices that are not square are turned by 180 degrees only, so the batch keeps its shape.
    """

    def __init__(self, prob: float = 0.5, max_k: int = 3) -> None:
        self.prob = float(prob)
        self.max_k = int(max_k)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        draws = torch.rand(3, batch)
        turns = torch.randint(1, self.max_k + 1, (batch,)) * (draws[2] < self.prob)
        if images.shape[-1] != images.shape[-2]:
            turns = torch.where(turns > 0, torch.full_like(turns, 2), turns)
        shape = (batch,) + (1,) * (images.ndim - 1)
        images = torch.where((draws[0] < self.prob).view(shape).to(images.device), images.flip(-2), images)
        images = torch.where((draws[1] < self.prob).view(shape).to(images.device), images.flip(-1), images)
        turned = images.clone()
        for k in range(1, self.max_k + 1):
            chosen = (turns == k).nonzero().flatten().tolist()
            if chosen:
                turned[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
        return turned
