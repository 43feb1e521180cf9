"""Command line of the bundle's tools: ``python -m scripts <command> --help``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire
from scripts.options import (
    LDCT_RANGE,
    OptionError,
    amp_choice,
    as_bool,
    channels_last_choice,
    check_windows,
    compile_mode,
    optional_intercept,
    optional_size,
    positive_number,
    whole_number,
    windows_text,
    worker_count,
)
from scripts.tools.bench import run_benchmark


def _without_result(function: Callable[..., Any]) -> Callable[..., None]:
    """``function`` for fire, which would otherwise print what it returns after its own report."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)

    return run


def _checkpoint_or_exit(ckpt: str | None) -> str:
    """``ckpt``, or the default model (saying which), checked readable; one line and exit 1 when it is missing or
    cannot be used (a folder, not a checkpoint, pickled code)."""
    from scripts.checkpoints import CheckpointError, default_checkpoint, read_checkpoint

    try:
        path, what = (Path(ckpt), "") if ckpt else default_checkpoint()
        read_checkpoint(path)  # says what is wrong: missing, a folder, not a checkpoint, pickled code
    except (FileNotFoundError, CheckpointError) as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None
    if what:
        print(f"using {what}: {path} (pass --ckpt FILE for another)")
    return str(path)


def _check_options(
    batch_size: Any,
    max_slice_mb: Any,
    amp: Any,
    channels_last: Any,
    compile: Any,
    num_workers: Any,
    window: Any,
    slice_intercept: Any = None,
) -> list[tuple[float, float]] | None:
    """The options ``score`` and ``compare`` share, checked before torch and MONAI are imported (seconds) and the
    model is loaded: ``OptionError`` (one line and exit 2, from ``main``) for one they cannot take. Returns the
    windows ``--window`` asks for, or None."""
    whole_number(batch_size, "batch_size", 1)
    positive_number(max_slice_mb, "max_slice_mb")
    amp_choice(amp)
    channels_last_choice(channels_last)
    compile_mode(compile)
    worker_count(num_workers)
    optional_intercept(slice_intercept)
    return None if window is None else check_windows(window)


def _warn_other_window(wanted: list[tuple[float, float]] | None, ckpt: str) -> None:
    """A warning when ``--window`` (``wanted``, checked) is not the window the model was trained with."""
    from scripts.checkpoints import read_settings
    from scripts.transforms import recorded_windows

    if wanted is None:
        return
    trained = recorded_windows(read_settings(ckpt))
    if wanted != trained:
        print(
            f"warning: --window {windows_text(wanted)} is not the window the model was trained with "
            f"({windows_text(trained)}): its scores are not on the scale it learnt, nor comparable with scores "
            "through its own window",
            file=sys.stderr,
        )


def _scoring_setup(
    ckpt: str | None,
    window: Any,
    batch_size: Any,
    max_slice_mb: float,
    amp: Any,
    channels_last: Any,
    compile: Any,
    num_workers: Any,
    slice_intercept: Any = None,
) -> tuple[str, dict[str, Any]]:
    """``score``'s and ``compare``'s checks before the model loads (one line and an exit for a bad option or
    checkpoint): the inference config's speed ids and the window, then the checkpoint. Sets the cap per slice for
    this process and the reading workers it forks."""
    wanted = _check_options(batch_size, max_slice_mb, amp, channels_last, compile, num_workers, window, slice_intercept)
    from scripts import transforms  # after the checks: it imports torch and MONAI (seconds)

    ckpt = _checkpoint_or_exit(ckpt)
    _warn_other_window(wanted, ckpt)
    transforms.MAX_SLICE_MB = float(max_slice_mb)
    intercept = optional_intercept(slice_intercept)
    return ckpt, {"amp": amp, "channels_last": channels_last, "compile": compile, "slice_intercept": intercept}


def check_data(
    dataset_dir: str | None = None,
    layout: str = "ldct",
    labels: str | None = None,
    score_range: Any = LDCT_RANGE,
    split: Any = 0.1,
    seed: int = 48,
    slice_intercept: Any = None,
) -> None:
    """Check a KADID-10k (layout=kadid) or LDCTIQA (layout=ldct) folder, or a scored-CT labels file (layout=scored_ct
    --labels FILE; ``slice_intercept`` as in training), and the validation side training's ``--split`` and ``--seed``
    would give it; every problem is listed, as (file, reason)."""
    from scripts.data import DatasetError, check_dataset

    try:
        check_dataset(dataset_dir, layout, labels, score_range, split, seed, slice_intercept)
    except DatasetError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None


def synth_ct(output_dir: str, n: int = 600, size: int = 512, seed: int = 0, layout: str = "train") -> None:
    """Simulated low-dose CT slices with simulated radiologists' scores: in the LDCTIQA layout (``train``, ``test``),
    or a reader study of ``n`` slices (``scored_ct``: DICOM series and NIfTI volumes of 4 slices each, labels.csv)."""
    from scripts.synthetic.ct import write_ct_dataset, write_scored_ct_dataset

    if layout == "scored_ct":
        print(write_scored_ct_dataset(output_dir, patients=max(2, -(-n // 4)), slices=4, size=size, seed=seed))
    elif layout in ("train", "test"):
        print(write_ct_dataset(output_dir, n=n, size=size, seed=seed, layout=layout))
    else:
        print(f"layout must be train, test or scored_ct, got {layout!r}", file=sys.stderr)
        raise SystemExit(1)


def synth_natural(output_dir: str, n_refs: int = 12, size: int = 128, seed: int = 0) -> None:
    """Distorted photographs with mean opinion scores, in the KADID-10k layout."""
    from scripts.synthetic.natural import write_natural_dataset

    print(write_natural_dataset(output_dir, n_refs=n_refs, size=size, seed=seed))


def _leave_process_group() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def score(
    *paths: str,
    output_dir: str,
    ckpt: str | None = None,
    window: Any = None,
    device: str | None = None,
    batch_size: int = 16,
    num_workers: Any = "auto",
    max_slice_mb: float = 64.0,
    amp: Any = False,
    channels_last: Any = "auto",
    compile: Any = False,
    plots: Any = True,
    slice_intercept: Any = None,
) -> None:
    """Score DICOM files/folders, NIfTI/NRRD/MetaImage volumes and TIFF/PNG slices: scores.csv and summary.json in
    output_dir
    (``torchrun --nproc_per_node N -m scripts score ...`` shares the series out between N processes).

    ``ckpt`` defaults to the bundle's ``models/model.pt``, else the demo's model (which it names); ``window`` to
    the HU window(s) the model was trained with (its model.json), else [-1000, 400];
    ``num_workers`` processes read slices while the network runs (0: this process reads between batches; ``auto``:
    0 on a CPU, where the network uses every core, and on a GPU 4, or 0 for at most 128 slices; the readers and as
    many header processes start before the network loads, and with them a folder of 256 files or more is scored
    while its headers are read); a slice
    that would take more than ``max_slice_mb`` MiB as float32 is refused unread (listed in errors). ``amp``
    (false/true/bf16/fp16), ``channels_last`` (default auto: on a CUDA GPU) and ``compile`` (torch.compile, with the
    weights frozen; true or a mode: max-autotune, reduce-overhead, ...) as in the inference config; ``plots``
    false skips the series plots; ``slice_intercept`` reads TIFF/PNG slices as CT numbers, HU = value + intercept
    (-32768 for DeepLesion's 16-bit PNGs, -1024 for HU + 1024, 0 for HU), windowed as CT is. Exits
    non-zero when no input could be scored, or (before scoring, with one line) when output_dir cannot be used.
    """
    as_bool(plots, "plots")
    ckpt, options = _scoring_setup(
        ckpt, window, batch_size, max_slice_mb, amp, channels_last, compile, num_workers, slice_intercept
    )
    from scripts.clinical.score import score_paths  # after the checks, as every import of torch and MONAI
    from scripts.output_dir import OutputError, printable

    try:
        inputs = [str(path) for path in paths]  # fire reads a name like 2024 as a number
        summary = score_paths(inputs, str(output_dir), ckpt, window, device, batch_size, num_workers, plots, **options)
    except OutputError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        _leave_process_group()
    if not summary:  # a rank other than 0 under torchrun: rank 0 reports
        return
    slices = sum(entry["n_slices"] for entry in summary["series"].values())
    print(f"scored {slices} slices in {len(summary['series'])} series; {len(summary['errors'])} inputs not scored")
    warned = sum(entry["n_warned"] for entry in summary["series"].values())
    if warned:
        print(f"{warned} of the {slices} slices scored with a warning: see the warning column of scores.csv")
    shown = printable(str(output_dir))
    print(f"  {shown}/scores.csv\n  {shown}/summary.json")
    if not slices:
        raise SystemExit(1)


def compare(
    first: str,
    second: str,
    output_dir: str,
    ckpt: str | None = None,
    window: Any = None,
    device: str | None = None,
    batch_size: int = 16,
    num_workers: Any = "auto",
    max_slice_mb: float = 64.0,
    amp: Any = False,
    channels_last: Any = "auto",
    compile: Any = False,
    slice_intercept: Any = None,
) -> None:
    """Compare two scans of the same anatomy slice by slice (low and full dose, two reconstructions): each a DICOM
    file or folder, a NIfTI/NRRD/MetaImage volume or slice images; compare.json and pairs.csv in output_dir.

    Scored as ``score`` scores them (the same options); slices paired by series (one a side, else by folder under
    each input) and position; the mean difference (second - first), the share of pairs where each side scores
    higher, the Wilcoxon signed-rank p-value, and the Mann-Whitney U p-value over every slice. Exits non-zero when
    either side has no slice scored.
    """
    ckpt, options = _scoring_setup(
        ckpt, window, batch_size, max_slice_mb, amp, channels_last, compile, num_workers, slice_intercept
    )
    from scripts.clinical.compare import compare_lines, compare_paths  # after the checks, as in score
    from scripts.output_dir import OutputError, printable

    try:
        sides = str(first), str(second)  # fire reads a name like 2024 as a number
        result = compare_paths(*sides, str(output_dir), ckpt, window, device, batch_size, num_workers, **options)
    except OutputError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(compare_lines(result)))
    shown = printable(str(output_dir))
    print(f"  {shown}/compare.json\n  {shown}/pairs.csv")
    if not (result["first"]["n_slices"] and result["second"]["n_slices"]):
        raise SystemExit(1)


def realcheck(
    *inputs: str,
    ckpt: str | None = None,
    output_dir: str | None = None,
    size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 16,
    per_series: int = 3,
) -> None:
    """Does the model rank real CT slices (never used in training) by dose? Model and noise baseline side by side.

    Three real slices from pydicom-data, or given ``inputs`` (DICOM files or folders, CT volumes) up to
    ``per_series`` slices of each CT series or volume found there, dose lowered in the projection domain (fewer photons;
    fewer views), scored through the scoring path. ``ckpt`` defaults to the bundle's ``models/model.pt``, else
    the demo's model (which it names); ``size`` resamples the slices (default: their own size); ``output_dir``
    gets ``realcheck.json``.
    """
    per_series = whole_number(per_series, "per_series", 1)
    size, batch_size = optional_size(size, "size"), whole_number(batch_size, "batch_size", 1)
    from scripts.tools.realcheck import RealCheckError, realcheck_lines, run_realcheck

    ckpt = _checkpoint_or_exit(ckpt)
    try:
        result = run_realcheck(ckpt, output_dir, size, seed, device, batch_size, inputs, per_series)
    except RealCheckError as error:
        print(f"real-data check failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(realcheck_lines(result)))
    if output_dir:
        print(f"  {output_dir}/realcheck.json")


def export(
    output_dir: str,
    ckpt: str | None = None,
    metrics: str | None = None,
    weights_url: str = "",
    torchscript: bool = True,
    overwrite: bool = False,
    onnx: bool = False,
) -> None:
    """A self-contained Model Zoo bundle folder (configs, models with model.ts, docs, scripts, LICENSE).

    ``--onnx true`` adds models/model.onnx (needs ``pip install onnx onnxruntime``).
    """
    with_onnx = as_bool(onnx, "onnx")
    flags = as_bool(torchscript, "torchscript"), as_bool(overwrite, "overwrite"), with_onnx
    from scripts.checkpoints import CheckpointError
    from scripts.tools.export import ExportError, export_bundle

    try:
        result = export_bundle(output_dir, ckpt, metrics, weights_url, *flags)
    except (ExportError, CheckpointError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"exported the bundle to {result['output_dir']}")
    if result["torchscript_max_difference"] is not None:
        print(f"  models/model.ts matches the eager network within {result['torchscript_max_difference']:.2g}")
    if result["onnx_max_difference"] is not None:
        print(f"  models/model.onnx matches the eager network within {result['onnx_max_difference']:.2g}")
    elif with_onnx:
        print("  models/model.onnx written, not run (onnxruntime is not installed: pip install onnxruntime)")
    for note in result["notes"]:
        print(f"  {note}")


def demo(output_dir: str | None = None, seed: int = 0) -> None:
    """The whole pipeline offline on synthetic data: phase 1, phase 2, evaluation, scoring, baseline."""
    from scripts.tools.demo import DEFAULT_OUTPUT, run_demo

    run_demo(output_dir or DEFAULT_OUTPUT, seed=seed)


def main() -> None:
    try:
        _commands()
    except OptionError as error:  # a value an option cannot take: its reason alone, as argparse exits for a bad flag
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (reports are swapped in whole, or not at all)
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None


def _commands() -> None:
    fire.Fire(
        {
            "bench": _without_result(run_benchmark),
            "check_data": check_data,
            "synth_ct": synth_ct,
            "synth_natural": synth_natural,
            "score": score,
            "compare": compare,
            "realcheck": realcheck,
            "export": export,
            "demo": demo,
        }
    )


if __name__ == "__main__":
    main()
