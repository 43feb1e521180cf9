"""Command line of the bundle's tools: ``python -m scripts <command> --help``."""

from __future__ import annotations

import fire

from scripts.bench import run_benchmark
from scripts.data import check_dataset


def bench(
    profiles: str = "paper,small",
    device: str | None = None,
    batches: int = 6,
    iterations: int = 3,
    rounds: int = 3,
    batch_size: int | None = None,
    amp: bool = False,
    output: str | None = None,
) -> None:
    """Bundle workflows against bare PyTorch: slices/s and iterations/s, with their ratios."""
    run_benchmark(profiles, device, batches, iterations, rounds, batch_size, amp, output)


def check_data(dataset_dir: str, layout: str = "ldct") -> None:
    """Check a KADID-10k (layout=kadid) or LDCTIQA (layout=ldct) folder; every problem is listed."""
    check_dataset(dataset_dir, layout)


def main() -> None:
    fire.Fire({"bench": bench, "check_data": check_data})


if __name__ == "__main__":
    main()
