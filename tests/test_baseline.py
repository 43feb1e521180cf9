"""The no-learning noise baseline: it measures the noise it is given and ranks slices by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scripts.data import ldct_labelled_items
from scripts.metrics import correlations
from scripts.tools.baseline import baseline_scores, flat_region_noise


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.08])
def test_flat_region_noise_measures_white_noise(sigma: float) -> None:
    rng = np.random.default_rng(0)
    tissue = np.full((128, 128), 0.75) + rng.normal(0.0, sigma, (128, 128))
    tissue[:, :40] = 0.0  # air, ignored
    assert flat_region_noise(tissue) == pytest.approx(sigma, rel=0.15)


def test_baseline_follows_the_simulated_scores(ldct_train_dir: Path) -> None:
    items = ldct_labelled_items(ldct_train_dir)
    scores = baseline_scores(item["image"] for item in items)
    assert correlations(scores, [item["label"] for item in items])["srocc"] > 0.5
