"""Score real CT: DICOM files and folders, NIfTI, NRRD and MetaImage volumes and TIFF/PNG slices; by slice and per
series.

``python -m scripts score PATH [PATH ...] --output_dir OUT [--ckpt FILE] [--window=-1000,400] [--device D]``

Inputs are indexed from their headers (``scripts.ct_inputs``: DICOM grouped into series and
sorted by slice position, enhanced CT split into frames, volumes along their axial axis, TIFF/PNG
as rendered); DataLoader workers then read, window and resize slices while the network scores
the previous batch. The network is rebuilt from the checkpoint alone. Every input that cannot
be scored becomes an ``errors`` entry ``{path, reason}``; the others are scored regardless.
Outputs in OUT (locked while a run uses it; the whole report written into a temporary folder there, then
swapped in, see ``scripts.output_dir``): ``scores.csv`` (source, series, slice_index, score, score_sd: the spread
over the crops the slice was scored from, 0 for networks that read whole slices),
``summary.json`` (per series: slices, mean/min/max score, the worst slices, the plot; and
``errors``) and ``series/NNN_<name>.png`` (score along the slice axis, best and worst slices).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Compose
from scripts import bundle_root
from scripts.calibration import scoring_calibration
from scripts.ct_inputs import (
    PARALLEL_INDEX_FILES,
    ErrorList,
    acquisition,
    file_items,
    find_files,
    is_slice_image,
    ordered_items,
    read_scored_slice,
    read_volume,
    slice_item,
)
from scripts.ct_io import HU_WINDOW
from scripts.engines import (
    PlainTensorBatch,
    compiled_for_inference,
    place_network,
    reader_processes,
    usable_cores,
    usable_device,
    use_cudnn_autotuner,
    wants_compile,
)
from scripts.handlers import figure_png, pyplot
from scripts.options import LDCT_RANGE, as_bool, check_windows, optional_intercept
from scripts.output_dir import (
    OutputError,
    check_free_space,
    locked_output_dir,
    printable,
    printable_tree,
    report_size,
    staged_report,
)
from scripts.patches import SpreadInferer, pad_collate
from torch.utils.data import Dataset as TorchDataset

logger = logging.getLogger(__name__)

SCORE_RANGE = LDCT_RANGE  # the radiologists' scale: scores are clipped to it
WORST_LISTED = 3
THUMBNAIL_SIZE = 256  # pixels per side of the best and worst slices drawn in a series plot
PARALLEL_PLOTS = 4  # series: from this many, their plots (about 0.1 s each, in matplotlib) are drawn by processes
SliceResult = tuple[float | None, float, str]  # score (None if unreadable), spread over crops, reason if unreadable


@dataclass
class Series:
    """The scored slices of one DICOM series, NIfTI volume or rendered slice file, in slice order, with each one's
    index among the series' slices as indexed (``indices``: slices that could not be read keep their numbers; by
    default 0, 1, 2, ...)."""

    name: str
    items: list[dict] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    spreads: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def slice_indices(self) -> list[int]:
        return self.indices or list(range(len(self.items)))


class SliceScorer:
    """A network behind the bundle's preprocessing; scores are clipped to [0, 4].

    Slices are read by ``num_workers`` DataLoader worker processes while the network runs (``SliceReaders``, started
    with the scorer), or with none (``"auto"`` on a CPU, where the network uses every core) between batches in this
    process. Both constructors take the
    network, preprocessing, inferer and window from a bundle's inference config, so scoring and
    ``monai.bundle run`` cannot drift apart:
    ``from_bundle`` for a bundle folder (its ``models/model.pt``), ``from_checkpoint`` for this
    bundle with any checkpoint.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        transform: Compose,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: Any = "auto",
        window: Any = HU_WINDOW,
        inferer: Any = None,
        prepare_batch: Any = None,
        channels_last: Any = "auto",
        compile: Any = False,
        readers: SliceReaders | None = None,
        slice_intercept: float | None = None,
    ) -> None:
        self.device = torch.device(device)
        use_cudnn_autotuner(self.device)
        self.inferer = inferer or SpreadInferer(batch_size=batch_size)
        self.prepare_batch = prepare_batch or PlainTensorBatch(channels_last)
        self.network = place_network(network, self.device, channels_last).eval()
        if wants_compile(compile):
            self.network = compiled_for_inference(self.network, compile)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.window = check_windows(window)
        self.slice_intercept = optional_intercept(slice_intercept)  # as ``transform`` reads TIFF/PNG: for the plots
        processes = self.readers()  # a bad num_workers fails here, not at the first run
        self.reader_pool = readers or (SliceReaders(transform, processes, self.device) if processes else None)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        num_workers: Any = "auto",
        window: Any = None,
        **options: Any,
    ) -> SliceScorer:
        """The bundle's inference config with this checkpoint (and the settings recorded beside it: the network's,
        and the window it was trained with, which ``window`` replaces when given); ``options`` set its other ids
        (``amp``, ``channels_last``, ``compile``, ``slice_intercept``)."""
        overrides: dict[str, Any] = {"checkpoint": str(checkpoint)}
        if window is not None:
            windows = [list(pair) for pair in check_windows(window)]
            overrides["window"] = windows[0] if len(windows) == 1 else windows
        return cls.from_bundle(bundle_root(), device, batch_size, num_workers, **overrides, **options)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        num_workers: Any = "auto",
        config_file: str = "configs/inference.json",
        **overrides: Any,
    ) -> SliceScorer:
        """``network_def`` with the weights of ``checkpoint``, ``preprocessing``, ``inferer`` and ``window`` of a
        bundle's inference config (``checkpoint``: ``models/model.pt``).

        Works for this repository's ``bundle/`` and for an exported Model Zoo folder; ``overrides``
        replace config ids (``checkpoint=...``, ``window=[...]``, the network settings). The network settings
        recorded beside the checkpoint (``model.json``, written by training) come before the config's own ids.
        """
        from monai.bundle import ConfigParser
        from scripts.checkpoints import CheckpointError, config_ids, read_checkpoint
        from scripts.networks import network_with_weights

        device = usable_device(device)
        parser = ConfigParser()
        parser.read_config(str(Path(bundle_dir) / config_file))
        parser.update({"bundle_root": str(bundle_dir), "device": device, "batch_size": batch_size, **overrides})
        checkpoint = parser.get_parsed_content("checkpoint")
        state_dict, settings = read_checkpoint(checkpoint)  # settings: model.json, or inside an earlier-form file
        parser.update({key: value for key, value in config_ids(settings).items() if key not in overrides})
        transform = parser.get_parsed_content("preprocessing")
        processes = reader_processes(num_workers, device)
        readers = SliceReaders(transform, processes, device) if processes else None  # forked before the network
        try:
            network = network_with_weights(lambda: parser.get_parsed_content("network_def"), state_dict, device)
        except RuntimeError as error:
            reason = " ".join(str(error).split())[:300]
            raise CheckpointError(
                f"{checkpoint} does not fit the network the config describes ({reason}): put the settings file "
                "written with it (model.json) beside it, or set the network ids (network, f_name, s_name, side, "
                "in_channels, patch_size, image_size) to those it was trained with"
            ) from None
        window = parser.get_parsed_content("window")
        inferer = parser.get_parsed_content("inferer")
        prepare_batch = parser.get_parsed_content("prepare_batch")
        ids = ("channels_last", "compile", "slice_intercept")
        options = {key: parser.get_parsed_content(key) for key in ids if key in parser}
        return cls(
            network,
            transform,
            device,
            batch_size,
            num_workers,
            window,
            inferer,
            prepare_batch,
            **options,
            readers=readers,
        )

    def readers(self, slices: int | None = None) -> int:
        """The reader processes of a run of ``slices`` slices (``scripts.engines.reader_processes``)."""
        return reader_processes(self.num_workers, self.device, slices)

    def index(self, paths: Sequence[str | Path], skip: str | Path | None = None) -> tuple[list[dict], list[dict]]:
        """``index_inputs`` of ``paths``, long folders read by this scorer's reader processes."""
        files, errors = find_files(paths, skip)
        return ordered_items(self._file_items(files, errors), errors)

    def _file_items(self, files: list[Path], errors: ErrorList) -> Iterator[list[dict]]:
        """``scripts.ct_inputs.file_items``, the headers of many files read by this scorer's header processes."""
        pool = self.reader_pool
        return file_items(files, errors, pool.processes if pool else 0, pool.headers if pool else None)

    def index_and_score(
        self,
        paths: Sequence[str | Path],
        skip: str | Path | None = None,
        indexed: Callable[[list[dict], list[dict]], None] | None = None,
    ) -> tuple[list[dict], list[dict], list[SliceResult]]:
        """``index`` and ``__call__`` in one: the items in order, ``{path, reason}`` for what was not scored, and each
        item's result; ``indexed(items, errors)`` once every header is read (the report's free-space check).

        A long run read by reader processes (``PARALLEL_INDEX_FILES`` files or more) scores each file's slices as
        soon as its header is read, in file order, instead of after every header is read: on a GPU, indexing a
        1000-file series took as long as a quarter of its network time. The results are put in slice order at the
        end, and those of duplicates dropped, exactly as ``index`` orders and drops them."""
        files, unreadable = find_files(paths, skip)
        if self.reader_pool is None or len(files) < PARALLEL_INDEX_FILES:
            items, errors = ordered_items(self._file_items(files, unreadable), unreadable)
            if indexed is not None:
                indexed(items, errors)
            return items, errors, self(items)
        by_file: list[list[dict]] = []
        ordered: tuple[list[dict], list[dict]] = ([], [])

        def streamed() -> Iterator[list[dict]]:
            nonlocal ordered
            for items in self._file_items(files, unreadable):
                by_file.append(items)
                yield items
            ordered = ordered_items(by_file, unreadable)
            if indexed is not None:
                indexed(*ordered)

        results = self._score_batches(self.batches(streamed()))
        items, errors = ordered
        by_slice = {
            (item["image"], item["frame"]): result for item, result in zip(chain(*by_file), results, strict=True)
        }
        return items, errors, [by_slice[item["image"], item["frame"]] for item in items]

    @torch.inference_mode()
    def __call__(self, items: Sequence[dict]) -> list[SliceResult]:
        """(score, spread over its crops, "") for each item, or (None, 0, reason) when its pixels could not be used."""
        return self._score_batches(self.batches([list(items)], len(items)))

    def _parts(self, items_by_file: Iterable[list[dict]], readers: int) -> Iterator[list[dict]]:
        """The items in the batches each reader reads: with several readers the network's batch is split among them,
        so that all of them read the first batch and the network starts sooner."""
        size = -(-self.batch_size // readers) if readers > 1 else self.batch_size
        part: list[dict] = []
        for items in items_by_file:
            for item in items:
                part.append(slice_item(item))
                if len(part) == size:
                    yield part
                    part = []
        if part:
            yield part

    @torch.inference_mode()
    def _score_batches(self, batches: Iterable[tuple[torch.Tensor, list[str]]]) -> list[SliceResult]:
        """``__call__``'s results for the network batches of ``batches``, in order. A batch's predictions are copied
        back while the next batch is read and queued on the device, so a GPU is never left waiting for this process
        between batches."""
        results: list[SliceResult] = []
        pending: tuple[torch.Tensor, Any, list[str]] | None = None
        for images, errors in batches:
            predictions = self.inferer(images, self.network).reshape(len(images), -1)
            if pending is not None:
                results += _collect(*pending)
            pending = (*_copy_to_host(predictions), errors)
        if pending is not None:
            results += _collect(*pending)
        read_volume.cache_clear()  # the last volume read in this process (num_workers=0)
        return results

    def batches(
        self, items_by_file: Iterable[list[dict]], slices: int | None = None
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """The network's batches of the items on its device, ``batch_size`` slices each (fewer at the end, or where
        the slices' preprocessed size changes), put together from the parts the reader processes read (in this
        process for a run of ``slices`` too few for them, see ``readers``); with each slice's reason it could not be
        read ("" if it was). A run that starts while another holds the scorer's readers (another thread, or
        another of these iterators) gets readers of its own, started for it."""
        readers = self.readers(slices)
        parts = self._parts(items_by_file, readers)
        pool = self.reader_pool if readers else None
        if pool is not None and pool.busy.acquire(blocking=False):
            try:
                yield from self._joined(pool.read(parts))
            finally:
                pool.busy.release()
            return
        loader = DataLoader(
            _SliceReader(self.transform),
            batch_sampler=parts,
            num_workers=readers,
            collate_fn=pad_collate,
            pin_memory=self.device.type == "cuda",
        )
        yield from self._joined(loader)

    def _joined(self, loader: Iterable[dict]) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """``batches`` from the readers' parts: each part preprocessed on the device, joined into network batches."""
        held: list[torch.Tensor] = []
        errors: list[str] = []
        for batch in loader:
            images, _ = self.prepare_batch(batch, self.device, non_blocking=True)
            if held and images.shape[1:] != held[0].shape[1:]:
                yield _cat(held), errors
                held, errors = [], []
            held.append(images)
            errors += batch["error"]
            while len(errors) >= self.batch_size:
                joined = _cat(held)
                yield joined[: self.batch_size], errors[: self.batch_size]
                held = [joined[self.batch_size :]] if len(joined) > self.batch_size else []
                errors = errors[self.batch_size :]
        if errors:
            yield _cat(held), errors


class _SliceReader(TorchDataset):
    """The preprocessing of each item it is handed: a dataset indexed by the items themselves, so that a loader can
    read slices whose headers are still being indexed when it starts."""

    def __init__(self, transform: Compose) -> None:
        self.transform = transform

    def __getitem__(self, item: dict) -> dict:
        preprocessed: dict = self.transform(item)
        return preprocessed


class SliceReaders:
    """Reader processes that last as long as their scorer, so that a run does not wait for them to start: ``read``
    reads parts of items (lists) as ``DataLoader`` batches, by ``processes`` workers, and ``headers`` is a pool of as
    many processes for the headers of long runs (``scripts.ct_inputs.file_items``).

    Forking a process that holds a network on a GPU took 26 ms on an H200 host: four readers and four header
    processes started for each run cost it 0.2 s before its first slice was read. ``SliceScorer.from_bundle`` starts
    them before it loads the network. Each worker keeps the last volume it read (``read_volume``, checked against the
    file's modification time) until its next run. One run at a time: a ``read`` ends the one before it, so
    ``SliceScorer.batches`` holds ``busy`` while it reads.
    """

    def __init__(self, transform: Compose, processes: int, device: str | torch.device) -> None:
        self.processes = processes
        self.busy = threading.Lock()  # held by the run that reads with them
        self._source = _PartSource()
        self.loader = DataLoader(
            _SliceReader(transform),
            batch_sampler=self._source,
            num_workers=processes,
            collate_fn=pad_collate,
            pin_memory=torch.device(device).type == "cuda",
            persistent_workers=True,
        )
        iter(self.loader)  # the readers start now, and wait for parts
        self.headers: ProcessPoolExecutor | None = None  # None: headers are read in the scoring process
        if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
            self.headers = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
            self.headers.submit(int).result()  # a forking pool starts all its processes at its first task

    def read(self, parts: Iterable[list[dict]]) -> Iterator[dict]:
        """The collated, pinned batches of the items of ``parts``, in order."""
        self._source.parts = parts
        return iter(self.loader)


class _PartSource:
    """The batch sampler of ``SliceReaders``' loader: the parts of the run at hand."""

    parts: Iterable[list[dict]] = ()

    def __iter__(self) -> Iterator[list[dict]]:
        return iter(self.parts)


def _cat(images: list[torch.Tensor]) -> torch.Tensor:
    return images[0] if len(images) == 1 else torch.cat(images)


def _copy_to_host(predictions: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A copy of ``predictions`` in host memory, queued behind the network on a GPU, and the event it is ready at
    (None on a CPU, where it is ready now)."""
    if predictions.device.type != "cuda":
        return predictions, None
    host = predictions.to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(predictions.device))  # the network's GPU, not always the current one
    return host, ready


def _collect(predictions: torch.Tensor, ready: Any, errors: list[str]) -> list[SliceResult]:
    """One batch's results from its predictions (score, spread) once they are on the host."""
    if ready is not None:
        ready.synchronize()
    scores = predictions[:, 0].clamp(*SCORE_RANGE).tolist()
    spreads = predictions[:, 1].tolist() if predictions.shape[1] > 1 else [0.0] * len(scores)
    return [
        (None, 0.0, error) if error else (score, spread, "")
        for score, spread, error in zip(scores, spreads, errors, strict=True)
    ]


def downsample(pixels: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """A 2-D slice shrunk to at most ``size`` pixels per side by averaging whole blocks (edges repeated to fill the
    last block); slices already that small come back unchanged."""
    step = -(-max(pixels.shape) // size)
    if step == 1:
        return pixels
    rows, columns = (-(-side // step) * step for side in pixels.shape)
    padded = np.pad(pixels, ((0, rows - pixels.shape[0]), (0, columns - pixels.shape[1])), mode="edge")
    shrunk: np.ndarray = padded.reshape(rows // step, step, columns // step, step).mean(axis=(1, 3))
    return shrunk


def series_png(entry: Series, window: Sequence[float] = HU_WINDOW, slice_intercept: float | None = None) -> bytes:
    """The score along the slice axis, with thumbnails of the best and the worst slice (read as they were scored:
    through ``window``, TIFF/PNG with ``slice_intercept``), as PNG bytes."""
    plt = pyplot()
    scores, indices = entry.scores, entry.slice_indices()
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    figure = plt.figure(figsize=(9, 3.2), dpi=100)
    curve = figure.add_axes((0.07, 0.16, 0.5, 0.72))
    curve.plot(indices, scores, marker="o" if len(scores) < 60 else None)
    curve.set_ylim(*SCORE_RANGE)
    curve.set_xlabel("slice index")
    curve.set_ylabel("score (0 bad .. 4 excellent)")
    curve.set_title(shortened(entry.name), fontsize=8)
    for column, (label, index) in enumerate((("best", best), ("worst", worst))):
        item = entry.items[index]
        thumbnail = figure.add_axes((0.62 + 0.19 * column, 0.16, 0.17, 0.72))
        pixels = _thumbnail(item, window, slice_intercept)
        if pixels is None:
            thumbnail.text(0.5, 0.5, "no longer\nreadable", ha="center", va="center", transform=thumbnail.transAxes)
        else:
            thumbnail.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0)
        thumbnail.set_title(f"{label}: slice {indices[index]}, {scores[index]:.2f}", fontsize=8)
        thumbnail.axis("off")
    return figure_png(figure)


def series_pngs(
    series: Sequence[Series],
    window: Sequence[float],
    processes: int | None = None,
    slice_intercept: float | None = None,
) -> Generator[bytes, None, None]:
    """``series_png`` of each series, in order: drawn by ``processes`` forked processes (default: one per usable
    core) for ``PARALLEL_PLOTS`` series or more, so that an archive's plots do not add a tenth of a second per series
    after its scoring; here for fewer, or where processes cannot be forked, and for the rest if one dies."""
    processes = min(len(series), usable_cores() if processes is None else processes)
    if len(series) < PARALLEL_PLOTS or processes < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (series_png(entry, window, slice_intercept) for entry in series)
        return
    pyplot()  # imported once here, not in each process
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=torch.set_num_threads, initargs=(1,))
    done = 0
    try:
        for png in pool.map(series_png, series, [window] * len(series), [slice_intercept] * len(series)):
            yield png
            done += 1
    except BrokenProcessPool:
        logger.warning("a plotting process died; drawing the other %d plots in this process", len(series) - done)
        yield from (series_png(entry, window, slice_intercept) for entry in series[done:])
    finally:  # also when the report stops early (a full disk): the plots not yet drawn are not drawn
        pool.shutdown(cancel_futures=True)


def _thumbnail(item: dict, window: Sequence[float], slice_intercept: float | None = None) -> np.ndarray | None:
    """A scored slice shrunk for its series' plot, read again from its file; None, with a warning, when the file can
    no longer be read (moved, deleted or rewritten since it was scored): a plot never costs the report."""
    try:
        return downsample(read_scored_slice(item["image"], item["frame"], window, 1, slice_intercept)[0])
    except Exception as error:  # read_scored_slice's InputError, or the OSError of a volume that is gone
        logger.warning("plot without its thumbnail of %s [slice %d]: %s", item["image"], item["frame"], error)
        return None


def shortened(name: str, limit: int = 60) -> str:
    """``name`` in at most ``limit`` characters: its start (a folder, a UID's root) and its end (where the UIDs of
    one scanner's series differ, a digest), around ``...``."""
    if len(name) <= limit:
        return name
    head = (limit - 3) // 2
    return f"{name[:head]}...{name[len(name) - (limit - 3 - head) :]}"


def _plot_name(number: int, name: str) -> str:
    """``series/NNN_<name>.png``, keeping only ASCII letters, digits, ``.`` and ``-`` of the (``shortened``) name."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "_" for c in shortened(Path(name).name))
    return f"series/{number:03d}_{safe}.png"


def write_report(
    output_dir: Path,
    series: list[Series],
    errors: list[dict],
    window: Any = HU_WINDOW,
    extra: dict | None = None,
    plots: bool = True,
    plot_processes: int | None = None,
    slice_intercept: float | None = None,
) -> dict:
    """``scores.csv``, ``summary.json`` and a plot per series (``series_pngs``, by ``plot_processes``; TIFF/PNG
    thumbnails read with ``slice_intercept``, as they were scored), replacing the report in ``output_dir`` as a
    whole.

    Written into a temporary folder inside ``output_dir``, then swapped in (``staged_report``: the caller holds
    the folder's lock); names that are not UTF-8 are written with ``\\xNN`` escapes. Returns the summary written.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["source", "series", "slice_index", "score", "score_sd", "warning"])
    summary: dict[str, Any] = {"series": {}, "errors": errors, **(extra or {})}
    named = [replace(entry, name=printable(entry.name)) for entry in series] if plots else []
    pngs = series_pngs(
        named, window, plot_processes, slice_intercept
    )  # closed with the report: plots not yet drawn are not drawn
    with staged_report(Path(output_dir)) as staging, contextlib.closing(pngs):
        for number, entry in enumerate(series):
            plot = _plot_name(number, entry.name) if plots else None
            if plot:
                (staging / plot).write_bytes(next(pngs))
            rows = zip(entry.slice_indices(), entry.items, entry.scores, entry.spreads, strict=True)
            for index, item, value, spread in rows:
                row = [item["image"], entry.name, index, f"{value:.4f}", f"{spread:.4f}", item.get("warning", "")]
                writer.writerow(printable_tree(row))
            summary["series"][entry.name] = {**series_summary(entry), "plot": plot}
        summary = printable_tree(summary)
        (staging / "scores.csv").write_bytes(buffer.getvalue().encode())
        (staging / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def group_scores(
    items: Sequence[dict], results: Sequence[tuple[float | None, float, str]]
) -> tuple[list[Series], list[dict]]:
    """Scored items into their series (order kept); one ``{path, reason}`` per file and reason for the rest."""
    series: dict[str, Series] = {}
    counts: dict[str, int] = {}
    errors = ErrorList()
    for item, (score, spread, reason) in zip(items, results, strict=True):
        index = counts[item["series"]] = counts.get(item["series"], -1) + 1
        if score is None:
            errors.add(item["image"], reason)
            continue
        entry = series.setdefault(item["series"], Series(item["series"]))
        entry.items.append(item)
        entry.scores.append(score)
        entry.spreads.append(spread)
        entry.indices.append(index)
    return list(series.values()), errors


def score_inputs(
    paths: Sequence[str | Path], scorer: SliceScorer, output_dir: str | Path | None = None
) -> tuple[list[Series], list[dict]]:
    """Every input scored slice by slice and grouped into series, and ``{path, reason}`` for what was not scored.

    ``output_dir`` is not read as input, and is checked for room for the report before scoring.
    """
    series, errors, _ = _score_shares(paths, scorer, output_dir)
    return series, errors


def _score_shares(
    paths: Sequence[str | Path], scorer: SliceScorer, output_dir: str | Path | None, rank: int = 0, world: int = 1
) -> tuple[list[Series], list[dict], list[int]]:
    """``score_inputs`` over ``world`` processes: each indexes the inputs (headers only, the same list everywhere),
    scores whole series of its own share, and rank 0 gathers every result; also the slices each process had.
    Ranks other than 0 return nothing. One process scores as the headers are read (``SliceScorer.index_and_score``).
    """

    def check_room(items: list[dict], errors: list[dict]) -> None:
        if output_dir is not None and rank == 0:
            check_free_space(Path(output_dir), report_size(len(items), len({item["series"] for item in items})))

    if world == 1:
        items, errors, results = scorer.index_and_score(paths, output_dir, check_room)
        series, pixel_errors = group_scores(items, results)
        return series, errors + pixel_errors, [len(items)]
    items, errors = scorer.index(paths, skip=output_dir)
    check_room(items, errors)
    shares = share_series(items, world)
    mine = [items[index] for index in shares[rank]]
    results = scorer(mine) if mine else []
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(results, gathered, dst=0)
    if gathered is None:
        return [], [], []
    by_index = {
        index: result
        for share, part in zip(shares, gathered, strict=True)
        for index, result in zip(share, part, strict=True)
    }
    series, pixel_errors = group_scores(items, [by_index[index] for index in range(len(items))])
    return series, errors + pixel_errors, [len(share) for share in shares]


def share_series(items: Sequence[dict], world: int) -> list[list[int]]:
    """The item indices each of ``world`` processes scores: whole series (a volume is read once, by one process),
    largest first, each to the process with the fewest slices so far, and the slice images of a folder one by one,
    as they are read; one process: all. Rank 0 puts the results of each series together."""
    if world == 1:
        return [list(range(len(items)))]
    by_series: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_series.setdefault(item["image"] if is_slice_image(item["image"]) else item["series"], []).append(index)
    shares: list[list[int]] = [[] for _ in range(world)]
    for indices in sorted(by_series.values(), key=len, reverse=True):
        min(shares, key=len).extend(indices)
    return [sorted(share) for share in shares]


def process_group() -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` a gloo process group (results are gathered as Python objects, whatever
    device each process scores on), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def process_device(device: str | None, world: int) -> str | None:
    """Under ``torchrun`` on a GPU machine, each process on its own GPU (``LOCAL_RANK``) unless told otherwise."""
    if world > 1 and torch.cuda.is_available() and (device is None or str(device) == "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def series_summary(entry: Series) -> dict[str, Any]:
    """Slices, mean/min/max score, the mean spread over crops, the worst slices of one scored series, how many of its
    slices were scored with a warning (``scores.csv`` gives each one's) and how it was acquired (``acquisition``: its
    first slice's header)."""
    sources, indices = [item["image"] for item in entry.items], entry.slice_indices()
    worst = np.argsort(entry.scores, kind="stable")[:WORST_LISTED]
    return {
        "n_slices": len(entry.scores),
        "mean": float(np.mean(entry.scores)),
        "min": float(np.min(entry.scores)),
        "max": float(np.max(entry.scores)),
        "mean_score_sd": float(np.mean(entry.spreads)),
        "n_warned": sum(1 for item in entry.items if item.get("warning")),
        "worst": [
            {"slice_index": indices[i], "source": sources[i], "score": entry.scores[i], "score_sd": entry.spreads[i]}
            for i in worst
        ],
        "acquisition": acquisition(entry.items[0]["image"], entry.items[0].get("frame", 0)),
    }


def model_record(ckpt: str | Path, network: torch.nn.Module) -> dict[str, Any]:
    """Which model scored, for the summary: its checkpoint and the calibration line that ends its scores
    (``scripts.calibration``; null for a network without one)."""
    found = scoring_calibration(network)
    line = None if found is None else {"scale": float(found[1].scale), "shift": float(found[1].shift)}
    return {"checkpoint": str(Path(ckpt).resolve()), "calibration": line}


def score_paths(
    paths: Sequence[str | Path],
    output_dir: str | Path,
    ckpt: str | Path,
    window: Any = None,
    device: str | None = None,
    batch_size: int = 16,
    num_workers: Any = "auto",
    plots: Any = True,
    **options: Any,
) -> dict:
    """Score every input and write the report; returns the summary (``series`` is empty when nothing was scored).

    The output folder is checked and locked before any scoring (``OutputError``: one line, the reason and the fix).
    ``window`` defaults to the one recorded with the checkpoint (else the inference config's, [-1000, 400] HU).
    ``options`` are the inference config's ``amp``, ``channels_last`` and ``compile``; ``plots`` false leaves the
    series plots out (``plot`` is null in the summary). The summary's ``model`` names the checkpoint and its
    calibration line. Under ``torchrun`` the series are shared out between the processes (each on its own GPU, or
    the CPU) and rank 0 writes the one report, as a single process would; ``summary.json`` records ``processes``
    and ``slices_per_process``. Other ranks return ``{}``.
    """
    window = None if window is None else check_windows(window)  # a bad window fails before the lock
    rank, world = process_group()
    target = usable_device(process_device(device, world))  # so does a device this machine lacks
    with _locked_by_rank_0(output_dir, rank, world) as output:
        scorer = SliceScorer.from_checkpoint(ckpt, target, batch_size, num_workers, window, **options)
        series, errors, per_process = _score_shares(paths, scorer, output, rank, world)
        if rank != 0:
            return {}
        windows = [list(pair) for pair in scorer.window]  # as the slices were windowed: the model's, or --window
        extra = {"processes": world, "slices_per_process": per_process, "window": windows}
        extra["model"] = model_record(ckpt, scorer.network)
        extra["slice_intercept"] = scorer.slice_intercept
        plotted = as_bool(plots, "plots")
        return write_report(
            output, series, errors, scorer.window, extra, plotted, slice_intercept=scorer.slice_intercept
        )


@contextlib.contextmanager
def _locked_by_rank_0(output_dir: str | Path, rank: int, world: int) -> Iterator[Path]:
    """The output folder, locked by rank 0 before any scoring; the other ranks wait for its verdict and stop with
    the same ``OutputError`` when it cannot be used."""
    if world == 1:
        with locked_output_dir(output_dir) as output:
            yield output
        return
    if rank != 0:
        verdict: list[Any] = [None]
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise OutputError(verdict[0])
        yield Path(output_dir)
        return
    with contextlib.ExitStack() as stack:
        try:
            output = stack.enter_context(locked_output_dir(output_dir))
        except OutputError as error:
            torch.distributed.broadcast_object_list([str(error)], src=0)
            raise
        torch.distributed.broadcast_object_list([""], src=0)
        yield output
