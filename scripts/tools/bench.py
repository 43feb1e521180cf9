"""``python -m scripts bench``: the input pipeline stage by stage, the bundle's workflows against bare PyTorch on
the same model and batch (``scripts.tools.bench_workflows``), fixed costs and, on a GPU, precision and memory
figures (``scripts.tools.bench_pipeline``), one block per profile.

This module imports neither torch nor MONAI until the benchmark runs, so that ``python -m scripts --help`` and
every other command start without them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from scripts.options import OptionError, amp_choice, compile_mode, worker_count

TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
PROFILES: dict[str, dict[str, Any]] = {
    # the paper's networks at the paper's resolution
    "paper": {"f_name": "tf_efficientnetv2_l", "s_name": "swinv2_base_window8_256", "image_size": 512, "batch_size": 2},
    # the demo's networks at half resolution
    "small": {
        "f_name": "tf_efficientnetv2_b0",
        "s_name": "swinv2_tiny_window8_256",
        "image_size": 256,
        "batch_size": 8,
    },
    # a seconds-long smoke run of the benchmark itself
    "tiny": {
        "f_name": "test_efficientnet",
        "s_name": "swinv2_tiny_window8_256",
        "s_kwargs": TINY_SWIN,
        "side": 32,
        "image_size": 64,
        "batch_size": 4,
    },
}
PARTS = ("pipeline", "inference", "scoring", "long", "training", "gpu")  # what ``bench --parts`` can choose


def run_benchmark(
    profiles: str | tuple[str, ...] = ("paper", "small"),
    device: str | None = None,
    batches: int = 6,
    iterations: int = 3,
    rounds: int = 3,
    series_slices: int = 100,
    long_slices: int = 1000,
    long_rounds: int = 2,
    pipeline_slices: int = 200,
    pipeline_workers: Any = 2,
    batch_size: int | None = None,
    train_batch_size: int | None = None,
    amp: Any = False,
    num_workers: Any = "auto",
    compile: Any = False,
    parts: Any = PARTS,
    output: str | None = None,
) -> dict[str, dict]:
    """Run the benchmark for ``profiles`` and print one block per profile: the pipeline stage by stage per input
    kind, the workflows against bare PyTorch on a ``series_slices`` study and on a ``long_slices`` series (0: not
    run; the paper profile runs it on a GPU only; best of ``long_rounds`` after one to warm up, as ``rounds`` for
    the others: one round on a busy machine moved the ratio by 0.15), the fixed costs of a run and, on a GPU,
    bf16/channels_last figures, peak memory and the largest batch. ``amp``: false, true, bf16 or fp16, as in the
    configs;
    ``train_batch_size``: the training side's batch, when it must be smaller than inference's; ``num_workers``: the
    reading processes of the pipeline, of inference and of scoring (``"auto"``, as the configs: none on a CPU, 4 on
    a GPU, none there for a run of at most 128 slices); the pipeline is also timed with each count of
    ``pipeline_workers`` (one number or a comma list, as ``2,4,8``), its steady rate and its start apart;
    ``compile`` (true or a torch.compile mode, as ``max-autotune``): on a GPU also the bare forward compiled as
    ``score`` compiles it (bf16 + channels_last, frozen weights). ``parts`` (a comma list of ``PARTS``, default
    all) runs only those, as ``gpu,long`` for a GPU's few minutes; the others are null in ``output``."""
    names = _chosen("profiles", profiles, PROFILES)
    chosen = _chosen("parts", parts, PARTS)
    compile_mode(compile)  # a bad value fails here, not after the CPU-side figures
    amp_choice(amp)
    worker_count(num_workers)
    other_workers = _worker_counts(pipeline_workers)
    from scripts.clinical.score import SliceScorer  # after the checks: these import torch and MONAI (seconds)
    from scripts.engines import reader_processes, usable_device
    from scripts.tools.bench_pipeline import bench_pipeline, gpu_figures
    from scripts.tools.bench_workflows import bench_inference, bench_scoring, bench_training, profile_checkpoint

    target = usable_device(device)
    results: dict[str, dict] = {}
    for name in names:
        profile = dict(PROFILES[name])
        if batch_size:
            profile["batch_size"] = int(batch_size)
        with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as workdir:
            checkpoint, parameters = profile_checkpoint(profile, Path(workdir))
            folder = Path(workdir)
            pipeline = inference = scoring = long_run = training = gpu = None
            if "pipeline" in chosen:
                pipeline = bench_pipeline(
                    folder, profile["image_size"], target, profile["batch_size"], num_workers, pipeline_slices,
                    other_workers=other_workers,
                )  # fmt: skip
                rates = ", ".join(f"{kind} {entry['pipeline']['slices_per_s']:.0f}" for kind, entry in pipeline.items())
                print(f"[{name}] pipeline alone, slices/s: {rates}", flush=True)
            if "inference" in chosen:
                inference = bench_inference(profile, checkpoint, target, batches, rounds, folder, amp, num_workers)
                print(f"[{name}] inference ratio {inference['ratio']:.2f}", flush=True)
            if "scoring" in chosen:
                scoring = bench_scoring(profile, checkpoint, target, series_slices, rounds, folder, amp, num_workers)
                print(f"[{name}] scoring ratio {scoring['ratio']:.2f} ({series_slices} slices)", flush=True)
            if "long" in chosen and long_slices and (target.type == "cuda" or name != "paper"):
                long_run = bench_scoring(
                    profile, checkpoint, target, long_slices, long_rounds, folder, amp, num_workers,
                    with_fixed_costs=False,
                )  # fmt: skip
                print(f"[{name}] scoring ratio {long_run['ratio']:.2f} ({long_slices} slices)", flush=True)
            if "training" in chosen:
                training_profile = {**profile, "batch_size": int(train_batch_size or profile["batch_size"])}
                training = bench_training(training_profile, target, iterations, rounds, folder, amp)
            if "gpu" in chosen and target.type == "cuda":
                network = SliceScorer.from_checkpoint(checkpoint, target).network
                gpu = gpu_figures(network, target, 512, profile["batch_size"], compile)
        results[name] = {
            "profile": profile,
            "parameters": parameters,
            "device": str(target),
            "amp": amp,
            "num_workers": num_workers,
            "reader_processes": reader_processes(num_workers, target),
            "pipeline": pipeline,
            "inference": inference,
            "scoring": scoring,
            "long_run": long_run,
            "training": training,
            "gpu": gpu,
        }
        _print_block(name, results[name])
    if output:
        Path(output).write_text(json.dumps(results, indent=2))
    return results


def _comma_list(value: Any) -> list[str]:
    """The entries of an option given as one value, a comma list, or a sequence (fire parses ``2,4,8`` as one)."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for entry in entries for part in str(entry).split(",") if part.strip()]


def _chosen(what: str, value: Any, allowed: Any) -> list[str]:
    """The names of ``value`` (``_comma_list``), each one of ``allowed``."""
    names = _comma_list(value)
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise OptionError(f"unknown {what} {unknown or names}; choose from {', '.join(allowed)}")
    return names


def _worker_counts(value: Any) -> tuple[int, ...]:
    """``pipeline_workers`` as reader-process counts (``_comma_list``)."""
    counts = [worker_count(part) for part in _comma_list(value)]
    numbers = tuple(count for count in counts if isinstance(count, int))
    if not numbers or len(numbers) < len(counts):
        raise OptionError(f"pipeline_workers must be a number of reader processes or a list (2,4,8), got {value!r}")
    return numbers


def _print_block(name: str, result: dict) -> None:
    """One profile's report: the header, then a block for each part that was run."""
    profile = result["profile"]
    lines = [
        f"\n{name}: {profile['f_name']} + {profile['s_name']} ({result['parameters'] / 1e6:.1f} M parameters), "
        f"{profile['image_size']} px, batch {profile['batch_size']}, {result['device']}, amp={result['amp']}",
    ]
    if result["pipeline"]:
        lines += _pipeline_lines(result)
    if result["inference"]:
        inference = result["inference"]
        lines.append(
            f"  inference  bare forward {inference['bare_slices_per_s']:9.2f} slices/s | "
            f"workflow {inference['workflow_slices_per_s']:9.2f} slices/s | ratio {inference['ratio']:.2f} "
            "(target >= 0.9)"
        )
    if result["scoring"]:
        lines.append(_dicom_line(result["scoring"], "study; target >= 0.85"))
    if result["long_run"]:
        long_run = result["long_run"]
        lines.append(
            _dicom_line(
                long_run,
                f"series; target >= 0.9 on a CPU, 0.8 on a GPU; {long_run['beyond_network_s']:.2f} s beyond the "
                f"network: indexing {long_run['index_s']:.2f} s, first batch {long_run['first_batch_s']:.2f} s; "
                f"{long_run['free_network_s']:.2f} s with a network that costs nothing",
            )
        )
    if result["scoring"] and "run_s" in result["scoring"]:
        lines += _fixed_cost_lines(result["scoring"])
    if result["training"]:
        training = result["training"]
        peak = f"; peak GPU memory {training['peak_gib']:.2f} GiB" if "peak_gib" in training else ""
        lines.append(
            f"  training   plain loop   {training['plain_it_per_s']:9.3f} it/s     | "
            f"trainer  {training['trainer_it_per_s']:9.3f} it/s     | ratio {training['ratio']:.2f} (target >= 0.95)"
            f"{peak}"
        )
    if result["gpu"]:
        lines += gpu_lines(result["gpu"], profile["batch_size"])
    print("\n".join(lines), flush=True)


def _dicom_line(run: dict, described: str) -> str:
    """A DICOM scoring run against the bare forward: ``described`` follows its number of slices."""
    return (
        f"  DICOM      bare forward {run['bare_slices_per_s']:9.2f} slices/s | "
        f"scoring  {run['scoring_slices_per_s']:9.2f} slices/s | ratio {run['ratio']:.2f} "
        f"(a {run['slices']}-slice {described})"
    )


def _pipeline_lines(result: dict) -> list[str]:
    """The stage table: ms per slice of each stage and the steady slices/s (and start) per reader setting."""
    first = next(iter(result["pipeline"].values()))
    stages, counts = list(first["ms_per_slice"]), list(first["by_processes"])
    lines = [
        f"  pipeline alone (512 px inputs, no network), ms per slice by stage, alone; steady slices/s (and the "
        f"first pass's extra seconds: the readers' start) with num_workers={result['num_workers']} "
        f"({result['reader_processes']} reader processes) and with {', '.join(counts)} processes:",
        "    input         " + " ".join(f"{stage:>11}" for stage in stages) + "   "
        + " ".join(f"{heading:>16}" for heading in ["slices/s (start)"] + [f"{count} processes" for count in counts]),
    ]  # fmt: skip
    for kind, entry in result["pipeline"].items():
        times = " ".join(f"{entry['ms_per_slice'][stage]:11.2f}" for stage in stages)
        rates = [entry["pipeline"]] + [entry["by_processes"][count] for count in counts]
        lines.append(
            f"    {kind:<13} {times}   "
            + " ".join(f"{rate['slices_per_s']:8.1f} ({rate['start_s']:.2f}s)" for rate in rates)
        )
    return lines


def _fixed_cost_lines(scoring: dict) -> list[str]:
    """A study's cost beyond its network with the model loaded, and a whole ``score`` run's, with where it goes."""
    return [
        f"  a {scoring['slices']}-slice study, model loaded: {scoring['study_s']:.2f} s = network "
        f"{scoring['network_s']:.2f} s + {scoring['study_overhead_s']:.2f} s more (target <= 0.3 s; indexing "
        f"{scoring['index_s']:.2f} s, first batch {scoring['first_batch_s']:.2f} s, report without plots "
        f"{scoring['report_without_plots_s']:.2f} s, plots {scoring['plots_s']:.2f} s)",
        f"  the same study with a network that costs nothing: {scoring['free_network_study_s']:.2f} s "
        "(what it spends beyond its network; target <= 0.3 s)",
        f"  a {scoring['slices']}-slice score run: {scoring['run_s']:.2f} s = network "
        f"{scoring['run_network_s']:.2f} s"
        f" + plots {scoring['plots_s']:.2f} s + loading the model {scoring['load_s']:.2f} s + "
        f"{scoring['run_overhead_s']:.2f} s more",
    ]


def gpu_lines(gpu: dict[str, Any], batch_size: int) -> list[str]:
    """The report's GPU block: each variant ``gpu_figures`` timed, in its order, with its peak memory (GPU only)."""
    variants = [key.removesuffix("_slices_per_s") for key in gpu if key.endswith("_slices_per_s")]
    lines = [f"  GPU, 512 px, batch {batch_size}, bare forward, slices/s (peak GiB):"]
    lines += [
        f"    {name:<36} {gpu[name + '_slices_per_s']:8.1f} ({gpu.get(name + '_peak_gib', 0.0):.2f})"
        for name in variants
    ]
    if "largest_bf16_batch" in gpu:
        lines.append(f"    largest bf16 batch that fits: {gpu['largest_bf16_batch']}")
    return lines
