"""The input pipeline alone (no network), stage by stage, per input kind; the fixed costs of a scoring run; and on
a GPU the precision and memory figures. Used by ``python -m scripts bench``.

Stages, each timed on its own over the same slices in this process: read/decode (file to HU, or to [0, 1] for a
rendered TIFF), HU + window, resize, normalise, collate, host to device. The pipeline itself is the inference
config's: the DataLoader reads and decodes (in worker processes, or with none in this process),
``BatchPreprocess`` windows, resizes and normalises the batch on the device; its rate counts every slice from the
files to a ready batch on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1
from scripts.ct_inputs import STORED_PIXELS, LoadCTSliced, index_inputs, read_ct_slice
from scripts.ct_io import HU_WINDOW, compress_dicom, write_dicom_slice
from scripts.engines import PlainTensorBatch, compiled_for_inference, reader_processes, wants_compile
from scripts.patches import pad_collate
from scripts.transforms import BatchPreprocess

INPUT_KINDS = ("tiff", "dicom", "dicom_jpeg_ll", "dicom_j2k", "nifti")
COMPRESSED = {"dicom_jpeg_ll": JPEGLosslessSV1, "dicom_j2k": JPEG2000Lossless}  # both lossless
STAGES = ("read_decode", "hu_window", "resize", "normalise", "collate", "to_device")
STAGE_SLICES = 64  # stages are timed per slice over at most these many (enough for a steady figure)


def write_inputs(kind: str, folder: Path, n: int, size: int = 512, seed: int = 0) -> Path:
    """``n`` slices of ``size`` px of one input kind: float32 TIFF in [0, 1] (LDCTIQA's form), a DICOM series
    uncompressed, in JPEG lossless (SV1) or in JPEG 2000 (lossless), or one NIfTI volume of ``n`` slices."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        import nibabel

        volume = rng.normal(0.0, 300.0, (size, size, n)).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), folder / "volume.nii")
        return folder
    for index in range(n):
        if kind == "tiff":
            tifffile.imwrite(folder / f"{index:04d}.tif", rng.random((size, size), dtype=np.float32))
            continue
        path = write_dicom_slice(folder / f"{index:04d}.dcm", rng.normal(0.0, 300.0, (size, size)), "1.2.826.0.1.99.2")
        if kind in COMPRESSED:
            compress_dicom(path, COMPRESSED[kind])
    return folder


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``function(*args)`` and the seconds it took (waiting for the GPU to finish)."""
    synchronize(device)
    start = time.perf_counter()
    result = function(*args)
    synchronize(device)
    return result, time.perf_counter() - start


def _seconds(step: Callable[[], Any], device: torch.device) -> float:
    return timed(device, step)[1]


def _read(items: list[dict]) -> list[tuple[np.ndarray, bool]]:
    """Each item's slice as the readers read it: from where indexing found its pixels, where it did."""
    return [read_ct_slice(item["image"], item["frame"], stored=item.get(STORED_PIXELS)) for item in items]


def stage_times(
    items: list[dict], image_size: int | None, device: torch.device, batch_size: int, window: Any = HU_WINDOW
) -> dict[str, float]:
    """Milliseconds per slice of each stage (``BatchPreprocess``'s own steps), each run over every item in this
    process (one thread of work)."""
    preprocess = BatchPreprocess(window, 1, image_size)
    times = dict.fromkeys(STAGES, 0.0)
    for start in range(0, len(items), batch_size):
        read, times_read = timed(device, _read, items[start : start + batch_size])
        loaded = [{"image": torch.from_numpy(pixels), "hu": hu} for pixels, hu in read]
        batch, times_collate = timed(device, pad_collate, loaded)
        host = torch.as_tensor(batch["image"])
        host = host.pin_memory() if device.type == "cuda" else host
        images, times_copy = timed(device, lambda tensor: tensor.to(device, non_blocking=True).float(), host)
        times_window = 0.0
        if all(hu for _, hu in read):
            images, times_window = timed(device, preprocess.window, images)
        images, times_resize = timed(device, preprocess.resize, images)
        _, times_normalise = timed(device, preprocess.normalise, images)
        for stage, seconds in zip(
            STAGES, (times_read, times_window, times_resize, times_normalise, times_collate, times_copy), strict=True
        ):
            times[stage] += seconds
    return {stage: 1000.0 * seconds / len(items) for stage, seconds in times.items()}


def pipeline_rate(
    items: list[dict],
    image_size: int | None,
    device: torch.device,
    batch_size: int,
    num_workers: Any,
    rounds: int = 2,
) -> dict[str, float]:
    """The inference config's pipeline from the files to ready batches on the device, with ``num_workers`` reader
    processes (``"auto"`` as the config has it): ``slices_per_s`` in steady state and ``start_s``, what starting
    the reader processes adds to a run.

    The first pass over the items starts the readers; the best of ``rounds`` more passes with the same readers
    (kept alive, as in a long run) gives the steady rate, and the first pass's extra time the start.
    """
    workers = reader_processes(num_workers, device)
    loader = DataLoader(
        Dataset(items, Compose([LoadCTSliced("image", compact_hu=True), EnsureTyped("image")])),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=pad_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    prepare = PlainTensorBatch(preprocess=BatchPreprocess(HU_WINDOW, 1, image_size))

    def each_batch() -> None:
        for batch in loader:
            prepare(batch, device, non_blocking=True)

    first_s = _seconds(each_batch, device)
    steady_s = min(_seconds(each_batch, device) for _ in range(rounds))
    return {"slices_per_s": len(items) / steady_s, "start_s": max(0.0, first_s - steady_s)}


def bench_pipeline(
    workdir: Path,
    image_size: int | None,
    device: torch.device,
    batch_size: int = 8,
    num_workers: Any = "auto",
    slices: int = 200,
    kinds: tuple[str, ...] = INPUT_KINDS,
    other_workers: tuple[int, ...] = (2,),
) -> dict[str, dict]:
    """Per input kind: milliseconds per slice of each stage, and the pipeline's steady slices/s and start with
    ``num_workers`` reader processes (``pipeline``) and with each count of ``other_workers`` (``by_processes``)."""
    results = {}
    for kind in kinds:
        folder = write_inputs(kind, workdir / f"pipeline_{kind}", slices)
        items, errors = index_inputs([folder])
        if errors or len(items) != slices:
            raise RuntimeError(f"the {kind} timing inputs were not all indexed: {errors}")
        results[kind] = {
            "ms_per_slice": stage_times(items[:STAGE_SLICES], image_size, device, batch_size),
            "pipeline": pipeline_rate(items, image_size, device, batch_size, num_workers),
            "by_processes": {
                str(count): pipeline_rate(items, image_size, device, batch_size, count) for count in other_workers
            },
        }
    return results


def start_costs(scorer: Any, folder: Path) -> tuple[list[dict], dict[str, float]]:
    """The items of ``folder`` and the seconds a scoring run spends on them before its network's first batch:
    indexing, and the first network batch (the first reads: the readers start with the scorer)."""
    items: list[dict] = []
    index_s = _seconds(lambda: items.extend(scorer.index([folder])[0]), scorer.device)
    batches = scorer.batches([items], len(items))
    first_batch_s = _seconds(lambda: next(batches), scorer.device)
    batches.close()
    return items, {"index_s": index_s, "first_batch_s": first_batch_s}


def fixed_costs(scorer: Any, folder: Path, workdir: Path) -> dict[str, float]:
    """Seconds a scoring run spends outside the network's steady state on ``folder``: indexing, the first batch
    (``start_costs``), and the report with its plots and without (``--plots false``)."""
    from scripts.clinical.score import group_scores, write_report

    items, costs = start_costs(scorer, folder)
    series, errors = group_scores(items, scorer(items))
    for plots in (True, False):
        report = workdir / f"report_{plots}"
        report.mkdir(exist_ok=True)
        key = "report_s" if plots else "report_without_plots_s"
        _, costs[key] = timed(scorer.device, write_report, report, series, errors, scorer.window, None, plots)
    return costs


GPU_VARIANTS = (  # name, autocast dtype, channels_last, cudnn.benchmark
    ("fp32", None, False, False),
    ("bf16", torch.bfloat16, False, False),
    ("bf16_channels_last", torch.bfloat16, True, False),
    ("bf16_channels_last_cudnn_benchmark", torch.bfloat16, True, True),
)


def gpu_figures(
    network: torch.nn.Module,
    device: torch.device,
    image_size: int,
    batch_size: int,
    compile: Any = False,
    largest_batch: int = 1024,
) -> dict[str, Any]:
    """Bare forward slices/s in float32, bf16, bf16 + channels_last, and that with cuDNN's autotuner
    (``torch.backends.cudnn.benchmark``), with ``compile`` (true or a torch.compile mode) also bf16 + channels_last
    compiled as ``score`` compiles it (``compiled_for_inference``); on a
    GPU the peak memory of each and the largest bf16 batch that fits at ``image_size`` (doubling until out of
    memory, up to ``largest_batch``). The bench runs it on GPUs; on a CPU (the tests) it gives the rates only."""
    network = network.to(device).eval()
    results: dict[str, Any] = {}
    compiled = [("bf16_channels_last_compiled", torch.bfloat16, True, False)] if wants_compile(compile) else []
    variants = list(GPU_VARIANTS) + compiled
    autotune = torch.backends.cudnn.benchmark
    for name, dtype, channels_last, benchmark in variants:
        torch.backends.cudnn.benchmark = benchmark
        model = network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model = compiled_for_inference(model, compile) if name.endswith("compiled") else model
        batch = torch.rand(batch_size, 1, image_size, image_size, device=device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)

        def forward(model: torch.nn.Module = model, batch: torch.Tensor = batch, dtype: Any = dtype) -> None:
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                for _ in range(5):
                    model(batch)

        forward()  # warm: kernels, the autotuner, compilation
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results[f"{name}_slices_per_s"] = 5 * batch_size / _seconds(forward, device)
        if device.type == "cuda":
            results[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    torch.backends.cudnn.benchmark = autotune
    network = network.to(memory_format=torch.contiguous_format)
    if device.type != "cuda":
        return results
    largest, size = 0, batch_size
    while size <= largest_batch:
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                network(torch.rand(size, 1, image_size, image_size, device=device))
            largest, size = size, size * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    results["largest_bf16_batch"] = largest
    return results
