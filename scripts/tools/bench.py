"""Throughput of the bundle's workflows against bare PyTorch on the same model and batch.

For each profile (network names, image size, batch size) on the current device:

- inference: slices/s of the bare network forward on a ready batch, against the slices/s of
  ``inference.json``'s evaluator reading the same number of slices from TIFF files (loading,
  resizing, batching, writing predictions.csv included), and their ratio;
- scoring: slices/s of ``python -m scripts score`` on a DICOM series (indexing, reading, HU,
  window, resize and the network, with reading in DataLoader workers) against the bare network
  forward on the same number of ready batches, and their ratio (target >= 0.8);
- training: iterations/s of a plain PyTorch loop (forward, MSE, backward, Adam step) on one ready
  batch, against ``train.json``'s ``SupervisedTrainer`` reading cached data with its random
  transforms and handlers, and their ratio.

Ratios near 1 mean the bundle adds little on top of the network itself; the targets are >= 0.9
(>= 0.8 for scoring DICOM, which also decodes the files).
Weights are random (never downloaded): speed does not depend on their values.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from monai.bundle import ConfigWorkflow
from scripts import bundle_root
from scripts.checkpoints import config_overrides, save_checkpoint
from scripts.clinical.score import SliceScorer, score_inputs, score_paths, write_report
from scripts.ct_io import write_dicom_slice
from scripts.data import MIN_VALIDATION
from scripts.engines import amp_dtype, autocast, compile_mode, needs_grad_scaler, reader_processes
from scripts.networks import build_network, count_parameters
from scripts.output_dir import locked_output_dir, write_json_atomic
from scripts.tools.bench_pipeline import (
    INPUT_KINDS,
    STAGES,
    bench_pipeline,
    fixed_costs,
    gpu_figures,
    start_costs,
    synchronize,
    timed,
)

CONFIG_DIR = bundle_root() / "configs"

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
NETWORK_KEYS = ("f_name", "s_name", "side", "f_kwargs", "s_kwargs")
PARTS = ("pipeline", "inference", "scoring", "long", "training", "gpu")  # what ``bench --parts`` can choose


def write_timing_slices(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` random float32 slices with random scores, in the LDCTIQA training layout: speed needs no content."""
    rng = np.random.default_rng(seed)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    labels = {}
    for index in range(n):
        tifffile.imwrite(folder / "image" / f"{index:04d}.tif", rng.random((size, size), dtype=np.float32))
        labels[f"{index:04d}.tif"] = round(float(rng.integers(0, 21)) / 5, 1)
    write_json_atomic(folder / "train.json", labels)
    return folder


def _best_times(
    baseline: Callable[[], Any], candidate: Callable[[], Any], device: torch.device, rounds: int
) -> tuple[float, float]:
    """Best seconds of ``baseline`` and of ``candidate`` over ``rounds`` alternating calls, after one of each.

    Alternating gives both the same machine conditions, and the best round is the one least
    disturbed by whatever else the machine is doing.
    """
    best = [float("inf"), float("inf")]
    for round_index in range(rounds + 1):  # round 0 warms up: allocator, kernels, worker start-up code
        for slot, step in enumerate((baseline, candidate)):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index:
                best[slot] = min(best[slot], time.perf_counter() - start)
    return best[0], best[1]


def _autocast(device: torch.device, amp: Any) -> Any:
    """The autocast the bundle's workflows use for ``amp`` (``scripts.engines.amp_dtype``), so both sides match."""
    return autocast(device, amp_dtype(amp, device))


def profile_checkpoint(profile: dict[str, Any], workdir: Path) -> tuple[Path, int]:
    """A checkpoint of the profile's networks with random weights (never downloaded), and their parameter count."""
    network = build_network(pretrained=False, **{k: v for k, v in profile.items() if k in NETWORK_KEYS})
    return save_checkpoint(workdir / "model.pt", network, profile["image_size"]), count_parameters(network)


def bench_inference(
    profile: dict[str, Any],
    checkpoint: Path,
    device: torch.device,
    batches: int,
    rounds: int,
    workdir: Path,
    amp: Any,
    num_workers: Any = "auto",
) -> dict:
    """Bare forward vs the inference workflow, in slices/s."""
    batch_size, image_size = profile["batch_size"], profile["image_size"]
    slices = write_timing_slices(workdir / "slices", n=batches * batch_size, size=512, seed=0)
    workflow = ConfigWorkflow(
        str(CONFIG_DIR / "inference.json"),
        logging_file=False,
        workflow_type="inference",
        **config_overrides(checkpoint),
        dataset_dir=str(slices / "image"),
        output_dir=str(workdir / "inference"),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
    )
    workflow.initialize()
    model = workflow.parser.get_parsed_content("model")
    evaluator = workflow.parser.get_parsed_content("evaluator")

    batch = torch.rand(batch_size, profile.get("in_channels", 1), image_size, image_size, device=device)

    def forward() -> None:
        with torch.inference_mode(), _autocast(device, amp):
            model(batch)

    def bare_batches() -> None:
        for _ in range(batches):
            forward()

    bare_seconds, workflow_seconds = _best_times(bare_batches, evaluator.run, device, rounds)
    bare = batches * batch_size / bare_seconds
    workflow_rate = batches * batch_size / workflow_seconds
    return {
        "bare_slices_per_s": bare,
        "workflow_slices_per_s": workflow_rate,
        "ratio": workflow_rate / bare,
    }


def write_timing_series(folder: Path, n: int, size: int = 512, seed: int = 0) -> Path:
    """A CT series of ``n`` random slices (uint16 with a rescale to HU, as scanners write them)."""
    rng = np.random.default_rng(seed)
    for index in range(n):
        hu = rng.normal(0.0, 300.0, (size, size))
        write_dicom_slice(folder / f"{index:04d}.dcm", hu, series_uid="1.2.826.0.1.3680043.99.1", position=index * 2.5)
    return folder


def bench_scoring(
    profile: dict[str, Any],
    checkpoint: Path,
    device: torch.device,
    series_slices: int,
    rounds: int,
    workdir: Path,
    amp: Any,
    num_workers: Any = "auto",
    with_fixed_costs: bool = True,
) -> dict:
    """Bare forward vs scoring a DICOM series from its files (``scripts.clinical.score.SliceScorer``), in slices/s;
    with ``with_fixed_costs`` also a whole ``score`` run's cost beyond its network time and plots."""
    batch_size, image_size = profile["batch_size"], profile["image_size"]
    series = write_timing_series(workdir / f"series_{series_slices}", series_slices)
    scorer = SliceScorer.from_checkpoint(checkpoint, device, batch_size=batch_size, num_workers=num_workers)
    batches = [
        torch.rand(min(batch_size, series_slices - start), 1, image_size, image_size, device=device)
        for start in range(0, series_slices, batch_size)
    ]

    def bare_forward() -> None:
        with torch.inference_mode(), _autocast(device, amp):
            for batch in batches:
                scorer.network(batch)

    def score_series() -> None:
        with _autocast(device, amp):
            _, errors, results = scorer.index_and_score([series])
        if errors or any(score is None for score, _, _ in results):
            raise RuntimeError(f"the timing series was not fully scored: {errors or results}")

    bare_seconds, scoring_seconds = _best_times(bare_forward, score_series, device, rounds)
    bare, scoring = series_slices / bare_seconds, series_slices / scoring_seconds
    result = {
        "slices": series_slices,
        "bare_slices_per_s": bare,
        "scoring_slices_per_s": scoring,
        "ratio": scoring / bare,
    }
    if with_fixed_costs:
        costs = _run_costs(scorer, series, checkpoint, device, batch_size, num_workers, workdir, bare_forward, rounds)
        result.update(costs)
    else:  # a long run: where its time beyond the network goes, before the first batch reaches the network
        result.update(start_costs(scorer, series)[1], beyond_network_s=scoring_seconds - bare_seconds)
    return result


def _run_costs(
    scorer: SliceScorer,
    series: Path,
    checkpoint: Path,
    device: torch.device,
    batch_size: int,
    num_workers: Any,
    workdir: Path,
    bare_forward: Callable[[], None],
    rounds: int = 3,
) -> dict[str, float]:
    """What a study pays beyond its network time (``bare_forward``, timed beside it: alternating, best of
    ``rounds``) and its plots: with the model loaded (index, read, score, report without plots), and a whole
    ``score`` run (loading the model, lock, report with plots); and where it goes (indexing, the first batch, the
    report)."""
    load_s = timed(device, SliceScorer.from_checkpoint, checkpoint, device)[1]
    costs = fixed_costs(scorer, series, workdir)
    plots_s = max(0.0, costs["report_s"] - costs["report_without_plots_s"])

    def study() -> None:
        with locked_output_dir(workdir / "study") as output:
            write_report(output, *score_inputs([series], scorer, output), scorer.window, None, False)

    bare_seconds, study_s = _best_times(bare_forward, study, device, rounds)
    options = {"device": str(device), "batch_size": batch_size, "num_workers": num_workers}
    run_bare_s, run_s = _best_times(
        bare_forward, partial(score_paths, [series], workdir / "run", checkpoint, **options), device, 1
    )
    return {
        "study_s": study_s,
        "study_overhead_s": study_s - bare_seconds,
        "network_s": bare_seconds,
        "run_s": run_s,
        "run_network_s": run_bare_s,
        "plots_s": plots_s,
        "load_s": load_s,
        "run_overhead_s": run_s - run_bare_s - plots_s - load_s,
        "index_s": costs["index_s"],
        "first_batch_s": costs["first_batch_s"],
        "report_s": costs["report_s"],
        "report_without_plots_s": costs["report_without_plots_s"],
    }


def bench_training(
    profile: dict[str, Any], device: torch.device, iterations: int, rounds: int, workdir: Path, amp: Any
) -> dict:
    """A plain PyTorch loop vs the training workflow's SupervisedTrainer, in iterations/s."""
    batch_size, image_size = profile["batch_size"], profile["image_size"]
    n_train, n_val = iterations * batch_size, MIN_VALIDATION
    data = write_timing_slices(workdir / "labelled", n=n_train + n_val, size=image_size, seed=1)
    workflow = ConfigWorkflow(
        str(CONFIG_DIR / "train.json"),
        logging_file=False,
        workflow_type="train",
        dataset_dir=str(data),
        output_dir=str(workdir / "train"),
        ckpt_dir=str(workdir / "models"),
        device=device,
        pretrained=False,
        f_checkpoint=None,
        split=n_val / (n_train + n_val),
        max_epochs=1,
        val_interval=10**6,
        last_state_interval=0,  # the plain loop saves nothing either
        batch_size=batch_size,
        num_workers=0,
        amp=amp,
        image_size=image_size,
        **{k: v for k, v in profile.items() if k in NETWORK_KEYS},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    model = workflow.parser.get_parsed_content("model")

    first = next(iter(workflow.parser.get_parsed_content("train#dataloader")))
    images, labels = first["image"].as_tensor().to(device), first["label"].to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp, device))
    loss_function = torch.nn.MSELoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss = loss_function(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def plain_epoch() -> None:
        for _ in range(iterations):
            step()

    plain_seconds, trainer_seconds = _best_times(plain_epoch, trainer.run, device, rounds)  # an epoch = iterations
    plain_rate, trainer_rate = iterations / plain_seconds, iterations / trainer_seconds
    result = {"plain_it_per_s": plain_rate, "trainer_it_per_s": trainer_rate, "ratio": trainer_rate / plain_rate}
    if device.type == "cuda":  # one more epoch of the trainer, for its peak memory alone
        torch.cuda.reset_peak_memory_stats(device)
        trainer.run()
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


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
    target = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    other_workers = _worker_counts(pipeline_workers)
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
        raise ValueError(f"unknown {what} {unknown or names}; choose from {', '.join(allowed)}")
    return names


def _worker_counts(value: Any) -> tuple[int, ...]:
    """``pipeline_workers`` as reader-process counts (``_comma_list``)."""
    counts = tuple(reader_processes(part) for part in _comma_list(value))
    if not counts:
        raise ValueError(f"pipeline_workers must name at least one count of reader processes, got {value!r}")
    return counts


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
                f"network: indexing {long_run['index_s']:.2f} s, first batch {long_run['first_batch_s']:.2f} s",
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
    counts = list(next(iter(result["pipeline"].values()))["by_processes"])
    lines = [
        f"  pipeline alone (512 px inputs, no network), ms per slice by stage, alone; steady slices/s (and the "
        f"first pass's extra seconds: the readers' start) with num_workers={result['num_workers']} "
        f"({result['reader_processes']} reader processes) and with {', '.join(counts)} processes:",
        "    input         " + " ".join(f"{stage:>11}" for stage in STAGES) + "   "
        + " ".join(f"{heading:>16}" for heading in ["slices/s (start)"] + [f"{count} processes" for count in counts]),
    ]  # fmt: skip
    for kind in INPUT_KINDS:
        entry = result["pipeline"][kind]
        stages = " ".join(f"{entry['ms_per_slice'][stage]:11.2f}" for stage in STAGES)
        rates = [entry["pipeline"]] + [entry["by_processes"][count] for count in counts]
        lines.append(
            f"    {kind:<13} {stages}   "
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
