"""Compare two scans of the same anatomy slice by slice: low against full dose, two reconstructions, a scan before
and after denoising (``python -m scripts compare FIRST SECOND --output_dir OUT [--ckpt FILE]``).

Both sides are scored as ``score`` scores them, by one network. Slices are paired by series and position
(``pair_series``, ``position_pairs``): one series on each side are a pair; otherwise series pair by the folder they
lie in under their side's input (``L067/`` with ``L067/``), in name order within a folder, and series left then pair
within a patient by their positions (``QD/L067_QD/`` with ``FD/L067_FD/``); within a pair of series,
each slice of the first with the slice of the second at the same position along the slice axis (within a quarter of
the first's median slice spacing): a DICOM slice's along the normal of its orientation, a volume's slice's
from the volume's affine, so a volume made from a series pairs with it.
``compare.json`` gives each side's slices and mean score, and its series as ``score``'s ``summary.json`` gives them
(with how each was acquired); over the pairs, the mean difference (second - first),
the shares of pairs where the second scores higher, lower or within ``TIE``, and the Wilcoxon signed-rank p-value,
how many slices of each side are in no pair (and the series with no partner series), and warnings (series of
different patients paired);
the Mann-Whitney U p-value over every slice of both sides, paired or not; and what could not be scored, per side.
``pairs.csv`` lists the pairs. Each file is written atomically, into a locked output folder.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from scripts.clinical.score import Series, SliceScorer, model_record, score_inputs, series_summary
from scripts.ct_inputs import VOLUME_SUFFIXES, InputError, read_dicom_ct, slice_normal
from scripts.engines import usable_device
from scripts.output_dir import (
    COMPARE_ENTRIES,
    locked_output_dir,
    printable_tree,
    write_bytes_atomic,
    write_json_atomic,
)
from scripts.transforms import SLICE_SUFFIXES

TIE = 0.05  # scores this close (on the 0..4 scale) count as neither side higher
MIN_TOLERANCE_MM = 0.01


def _tolerance(series: Series) -> float:
    """A quarter of the median distance between neighbouring slices (``MIN_TOLERANCE_MM`` at least): positions
    closer than this are the same slice."""
    positions = np.sort([item["position"] for item in series.items])
    steps = np.diff(positions)
    steps = steps[steps > 0]
    return max(float(np.median(steps)) / 4 if steps.size else MIN_TOLERANCE_MM, MIN_TOLERANCE_MM)


def head_sign(series: Series) -> float:
    """-1 for a DICOM series whose slice normal points towards the feet (ImageOrientationPatient [-1, 0, 0, 0, 1, 0],
    say), whose positions run footwards; else 1. Positions times it run towards the head, as a volume's do."""
    item = series.items[0]
    try:
        normal = slice_normal(item["image"], item.get("frame", 0))
    except (InputError, OSError):  # gone since it was scored: taken as the usual orientation
        normal = None
    return -1.0 if normal is not None and normal[2] < -0.5 else 1.0


def position_pairs(first: Series, second: Series, signs: tuple[float, float] = (1.0, 1.0)) -> list[tuple[int, int]]:
    """``(i, j)``: slice ``i`` of ``first`` and slice ``j`` of ``second`` at the same position (each side's positions
    times its sign, ``head_sign``), each slice in one pair at most."""
    tolerance = _tolerance(first)
    positions = np.array([item["position"] for item in second.items]) * signs[1]
    pairs, taken = [], set()
    for i, item in enumerate(first.items):
        distance = np.abs(positions - item["position"] * signs[0])
        j = int(np.argmin(distance))
        if distance[j] <= tolerance and j not in taken:
            taken.add(j)
            pairs.append((i, j))
    return pairs


def _by_folder(series: Sequence[Series], root: str) -> dict[str, list[Series]]:
    """The series under ``root`` by the folder of their first slice relative to it, each folder's in name order."""
    folders: dict[str, list[Series]] = {}
    root_is_folder = Path(root).is_dir()
    for entry in sorted(series, key=lambda entry: entry.name):
        folder = Path(entry.items[0]["image"]).parent
        key = os.path.relpath(folder, root) if root_is_folder else "."
        folders.setdefault(key, []).append(entry)
    return folders


def _patient_id(entry: Series) -> str | None:
    """The PatientID of a DICOM series' first slice, or None (a volume, a rendered slice, a file gone since)."""
    image = Path(entry.items[0]["image"])
    if image.name.lower().endswith(VOLUME_SUFFIXES) or image.suffix.lower() in SLICE_SUFFIXES:
        return None
    try:
        return str(read_dicom_ct(image, header_only=True).get("PatientID", "")).strip() or None
    except Exception:  # the report never fails for a header
        return None


def _pairs_by_patient(first: Sequence[Series], second: Sequence[Series]) -> list[tuple[Series, Series]]:
    """DICOM series of one patient (PatientID) on both sides, each first series with the other side's series of
    that patient with which it shares the most slice positions (none shared: no pair), each series in one pair."""
    patients = {id(entry): _patient_id(entry) for entry in (*first, *second)}
    signs = {id(entry): head_sign(entry) for entry in (*first, *second) if patients[id(entry)] is not None}
    pairs: list[tuple[Series, Series]] = []
    taken: set[int] = set()
    for a in first:
        if patients[id(a)] is None:
            continue
        shared = [
            (len(position_pairs(a, b, (signs[id(a)], signs[id(b)]))), b)
            for b in second
            if id(b) not in taken and patients[id(b)] == patients[id(a)]
        ]
        count, partner = max(shared, key=lambda found: found[0], default=(0, None))
        if count and partner is not None:
            taken.add(id(partner))
            pairs.append((a, partner))
    return pairs


def pair_series(
    first: Sequence[Series], second: Sequence[Series], roots: tuple[str, str] = (".", ".")
) -> list[tuple[Series, Series]]:
    """The series of two sides that show the same slices: one on each side; else those in the same folder under
    the sides' inputs ``roots``, in name order within a folder (as many as both sides have there), and then, of the
    series left, those of one patient at the same positions (``_pairs_by_patient``: ``QD/L067_QD/`` with
    ``FD/L067_FD/``)."""
    if len(first) == 1 and len(second) == 1:
        return [(first[0], second[0])]
    folders = _by_folder(first, roots[0]), _by_folder(second, roots[1])
    pairs = [pair for key in folders[0] for pair in zip(folders[0][key], folders[1].get(key, []), strict=False)]
    paired = {id(a) for a, _ in pairs}, {id(b) for _, b in pairs}
    rest = [a for a in first if id(a) not in paired[0]], [b for b in second if id(b) not in paired[1]]
    return pairs + _pairs_by_patient(*rest)


def pair_slices(
    first: Sequence[Series], second: Sequence[Series], roots: tuple[str, str] = (".", ".")
) -> list[tuple[Series, int, Series, int]]:
    """The paired slices of two scored sides: ``(series, index, series, index)``."""
    return _slice_pairs(pair_series(first, second, roots))


def _slice_pairs(series_pairs: Sequence[tuple[Series, Series]]) -> list[tuple[Series, int, Series, int]]:
    return [(a, i, b, j) for a, b in series_pairs for i, j in position_pairs(a, b, (head_sign(a), head_sign(b)))]


def _not_paired(side: Sequence[Series], in_pairs: set[tuple[int, int]], partnered: set[int]) -> dict[str, Any]:
    """A side's slices in no pair, and its series with no partner series on the other side."""
    return {
        "slices": sum(len(entry.items) for entry in side) - len(in_pairs),
        "series_without_partner": [entry.name for entry in side if id(entry) not in partnered],
    }


def _other_patients(series_pairs: Sequence[tuple[Series, Series]]) -> list[str]:
    """A warning for each pair of series whose DICOM headers name different patients."""
    warnings = []
    for a, b in series_pairs:
        patients = _patient_id(a), _patient_id(b)
        if None not in patients and patients[0] != patients[1]:
            warnings.append(f"{a.name} and {b.name} are of different patients (PatientID): paired by position alone")
    return warnings


def _side(path: str, series: Sequence[Series], errors: list[dict]) -> dict[str, Any]:
    scores = [score for entry in series for score in entry.scores]
    return {
        "input": path,
        "series": {entry.name: series_summary(entry) for entry in series},
        "n_slices": len(scores),
        "mean": float(np.mean(scores)) if scores else None,
        "errors": errors,
    }


def _unpaired_reason(first: Sequence[Series], second: Sequence[Series], roots: tuple[str, str]) -> str:
    """Why two scored sides have no slice in a pair: no series on a side, none in the same folder, or where the
    first pair of series lies."""
    if not first or not second:
        return f"nothing scored on the {'first' if not first else 'second'} side"
    series = pair_series(first, second, roots)
    if not series:
        folders = [", ".join(_by_folder(side, root)) for side, root in zip((first, second), roots, strict=True)]
        return (
            f"no series in the same folder under both inputs (first: {folders[0]}; second: {folders[1]}), nor of one "
            "patient at the same positions: name one series folder on each side, or give both sides the same folders"
        )
    ranges = [
        f"{entry.name} at {min(item['position'] for item in entry.items):g} to "
        f"{max(item['position'] for item in entry.items):g} mm"
        for entry in series[0]
    ]
    return f"no slice at the same position: {ranges[0]}, {ranges[1]}"


def compare_scores(
    first: Sequence[Series], second: Sequence[Series], roots: tuple[str, str] = (".", ".")
) -> tuple[dict[str, Any], list[tuple[Series, int, Series, int]]]:
    """The statistics of ``compare.json`` (``paired``, ``unpaired``) and the pairs they were drawn from."""
    series_pairs = pair_series(first, second, roots)
    pairs = _slice_pairs(series_pairs)
    differences = np.array([b.scores[j] - a.scores[i] for a, i, b, j in pairs])
    paired: dict[str, Any] = {"n_pairs": len(pairs)}
    if not pairs:
        paired["reason"] = _unpaired_reason(first, second, roots)
    else:
        paired.update(
            mean_difference=float(differences.mean()),
            second_higher=float(np.mean(differences > TIE)),
            first_higher=float(np.mean(differences < -TIE)),
            tied=float(np.mean(np.abs(differences) <= TIE)),
            tie_band=TIE,
            wilcoxon_p=float(stats.wilcoxon(differences).pvalue) if np.any(differences) else 1.0,
            not_paired={
                "first": _not_paired(first, {(id(a), i) for a, i, _, _ in pairs}, {id(a) for a, _ in series_pairs}),
                "second": _not_paired(second, {(id(b), j) for _, _, b, j in pairs}, {id(b) for _, b in series_pairs}),
            },
            warnings=_other_patients(series_pairs),
        )
    all_first = [score for entry in first for score in entry.scores]
    all_second = [score for entry in second for score in entry.scores]
    unpaired: dict[str, Any] = {"mean_difference": None, "mann_whitney_p": None}
    if all_first and all_second:
        unpaired.update(
            mean_difference=float(np.mean(all_second) - np.mean(all_first)),
            mann_whitney_p=float(stats.mannwhitneyu(all_second, all_first).pvalue),
        )
    return {"paired": paired, "unpaired": unpaired}, pairs


def _pairs_csv(pairs: Sequence[tuple[Series, int, Series, int]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["first_source", "second_source", "first_slice", "second_slice", "first_position"]
    writer.writerow([*header, "first_score", "second_score", "difference"])
    for a, i, b, j in pairs:
        where = [a.items[i]["image"], b.items[j]["image"], a.slice_indices()[i], b.slice_indices()[j]]
        values = [a.items[i]["position"], a.scores[i], b.scores[j], b.scores[j] - a.scores[i]]
        writer.writerow(printable_tree([*where, *(f"{value:.4f}" for value in values)]))
    return buffer.getvalue().encode()


def compare_paths(
    first: str,
    second: str,
    output_dir: str | Path,
    ckpt: str | Path,
    window: Any = None,
    device: str | None = None,
    batch_size: int = 16,
    num_workers: Any = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Score both sides with the checkpoint's network (``options``: ``amp``, ``channels_last``, ``compile``,
    ``slice_intercept``, as for ``score``) and write ``pairs.csv`` and ``compare.json`` (returned) in ``output_dir``,
    locked before the network loads (``OutputError``; a device this machine lacks fails before, ``OptionError``)."""
    target = usable_device(device)
    with locked_output_dir(output_dir) as output:
        scorer = SliceScorer.from_checkpoint(ckpt, target, batch_size, num_workers, window, **options)
        first_series, first_errors = score_inputs([first], scorer, output)
        second_series, second_errors = score_inputs([second], scorer, output)
        statistics, pairs = compare_scores(first_series, second_series, (first, second))
        result: dict[str, Any] = printable_tree(
            {
                "first": _side(first, first_series, first_errors),
                "second": _side(second, second_series, second_errors),
                "window": [list(pair) for pair in scorer.window],
                "slice_intercept": scorer.slice_intercept,
                "model": model_record(ckpt, scorer.network),
                **statistics,
            }
        )
        pairs_name, result_name = COMPARE_ENTRIES
        write_bytes_atomic(output / pairs_name, _pairs_csv(pairs))
        write_json_atomic(output / result_name, result)
    return result


def compare_lines(result: dict[str, Any]) -> list[str]:
    """What ``python -m scripts compare`` prints."""
    lines = []
    for side in ("first", "second"):
        entry = result[side]
        mean = f", mean score {entry['mean']:.2f}" if entry["mean"] is not None else ""
        lines.append(
            f"{side}: {entry['n_slices']} slices in {len(entry['series'])} series{mean}; "
            f"{len(entry['errors'])} inputs not scored"
        )
    paired = result["paired"]
    if paired["n_pairs"]:
        lines.append(
            f"{paired['n_pairs']} slices paired by position: second - first = {paired['mean_difference']:+.2f} on "
            f"average; second higher in {paired['second_higher']:.0%}, lower in {paired['first_higher']:.0%}, "
            f"within ±{paired['tie_band']:g} in {paired['tied']:.0%}; "
            f"Wilcoxon signed-rank p = {paired['wilcoxon_p']:.2g}"
        )
        left = paired["not_paired"]
        if left["first"]["slices"] or left["second"]["slices"]:
            sides = ("first", "second")
            counts = [f"{left[side]['slices']} of {result[side]['n_slices']} {side}" for side in sides]
            alone = [
                f"{side}: {', '.join(left[side]['series_without_partner'])}"
                for side in sides
                if left[side]["series_without_partner"]
            ]
            partners = f"; series with no partner on the other side: {'; '.join(alone)}" if alone else ""
            lines.append(f"not paired: {' and '.join(counts)} slices{partners}")
        lines += [f"warning: {warning}" for warning in paired["warnings"]]
    else:
        lines.append(f"no slices paired: {paired['reason']}")
    unpaired = result["unpaired"]
    if unpaired["mann_whitney_p"] is not None:
        lines.append(
            f"all slices: second - first = {unpaired['mean_difference']:+.2f}; "
            f"Mann-Whitney U p = {unpaired['mann_whitney_p']:.2g}"
        )
    return lines
