"""``compare``: two scans of the same slices scored side by side, paired by position, with scipy's statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pydicom
import pytest
from scipy import stats
from scripts.__main__ import compare
from scripts.clinical.compare import TIE, compare_scores, pair_series, pair_slices
from scripts.clinical.score import Series, score_paths
from scripts.ct_inputs import index_inputs, read_ct_slice
from scripts.ct_io import write_dicom_slice

POSITIONS = [-12.5, -10.0, -7.5, -5.0, -2.5, 0.0]


def _series(name: str, positions: list[float], scores: list[float] | None = None, folder: str = "") -> Series:
    items = [{"image": f"{folder or name}/{k}.dcm", "position": position} for k, position in enumerate(positions)]
    return Series(name, items, scores or [2.0] * len(items), [0.0] * len(items))


def _phantom(seed: int, noise_hu: float) -> np.ndarray:
    """A water disc in air with ``noise_hu`` of noise, 64 px."""
    rows, columns = np.mgrid[:64, :64]
    hu = np.where((rows - 32) ** 2 + (columns - 32) ** 2 < 26**2, 40.0, -1000.0)
    return hu + np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape)


@pytest.fixture(scope="module")
def dose_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A full-dose series and a noisier one at the same positions, with one slice more (at 2.5 mm) and a file that
    is not DICOM."""
    root = tmp_path_factory.mktemp("dose_pair")
    for k, position in enumerate(POSITIONS):
        write_dicom_slice(root / "full" / f"{k:03d}.dcm", _phantom(k, 5.0), "1.2.3.1", position)
        write_dicom_slice(root / "low" / f"{k:03d}.dcm", _phantom(k, 60.0), "1.2.3.2", position)
    write_dicom_slice(root / "low" / "extra.dcm", _phantom(9, 60.0), "1.2.3.2", 2.5)
    (root / "low" / "notes.txt").write_text("not an image")
    return root / "full", root / "low"


def test_slices_are_paired_by_position_within_a_quarter_of_their_spacing() -> None:
    first = _series("a", [0.0, 2.5, 5.0, 7.5])
    second = _series("b", [0.3, 2.5, 5.2, 10.0, 2.6])
    assert [(i, j) for _, i, _, j in pair_slices([first], [second])] == [(0, 0), (1, 1), (2, 2)]
    volume_slices = _series("v", [0.0, 1.0, 2.0])
    assert [(i, j) for _, i, _, j in pair_slices([volume_slices], [_series("w", [2.0, 1.0])])] == [(1, 1), (2, 0)]


def test_series_are_paired_by_their_folder_under_each_input(tmp_path: Path) -> None:
    """One series a side: a pair wherever they lie. Several: by folder (their UIDs, the names, are unrelated), in
    name order within a folder; a folder on one side only pairs nothing."""
    for folder in ("low/p1", "low/p2", "low/p3", "full/p1", "full/p2", "t", "u"):
        (tmp_path / folder).mkdir(parents=True)
    low = [_series(f"uid{k}", [0.0], folder=str(tmp_path / "low" / f"p{k}")) for k in (1, 2, 3)]
    full = [_series(f"uid{10 - k}", [0.0], folder=str(tmp_path / "full" / f"p{k}")) for k in (2, 1)]
    assert pair_series(low[:1], full[:1]) == [(low[0], full[0])]
    roots = str(tmp_path / "low"), str(tmp_path / "full")
    assert [(a.name, b.name) for a, b in pair_series(low, full, roots)] == [("uid1", "uid9"), ("uid2", "uid8")]
    slices = [_series(f"{tmp_path}/t/test{k}.tiff", [0.0], folder=str(tmp_path / "t")) for k in (1, 0)]
    again = [_series(f"{tmp_path}/u/test{k}.tiff", [0.0], folder=str(tmp_path / "u")) for k in (0, 1)]
    pairs = pair_series(slices, again, (str(tmp_path / "t"), str(tmp_path / "u")))
    assert [(Path(a.name).name, Path(b.name).name) for a, b in pairs] == [("test0.tiff",) * 2, ("test1.tiff",) * 2]


def test_statistics_are_scipy_on_the_same_numbers() -> None:
    rng = np.random.default_rng(0)
    low = list(rng.uniform(0, 3, 20))
    full = [value + shift for value, shift in zip(low, rng.normal(0.5, 0.4, 20), strict=True)]
    full[3] = low[3] + TIE / 2  # a tie
    statistics, pairs = compare_scores([_series("low", list(range(20)), low)], [_series("full", list(range(20)), full)])
    differences = np.array(full) - np.array(low)
    paired = statistics["paired"]
    assert len(pairs) == paired["n_pairs"] == 20
    assert paired["mean_difference"] == pytest.approx(differences.mean(), abs=1e-12)
    assert paired["wilcoxon_p"] == pytest.approx(stats.wilcoxon(differences).pvalue, rel=1e-12)
    assert paired["tied"] == pytest.approx(np.mean(np.abs(differences) <= TIE)) and paired["tied"] >= 0.05
    assert paired["second_higher"] + paired["first_higher"] + paired["tied"] == pytest.approx(1.0)
    assert paired["second_higher"] == pytest.approx(np.mean(differences > TIE))
    unpaired = statistics["unpaired"]
    assert unpaired["mann_whitney_p"] == pytest.approx(stats.mannwhitneyu(full, low).pvalue, rel=1e-12)
    assert unpaired["mean_difference"] == pytest.approx(np.mean(full) - np.mean(low))
    same, _ = compare_scores([_series("a", [0.0, 1.0], [2.0, 3.0])], [_series("b", [0.0, 1.0], [2.0, 3.0])])
    assert same["paired"]["wilcoxon_p"] == 1.0 and same["paired"]["tied"] == 1.0


def test_compare_scores_both_sides_as_score_does(
    tiny_checkpoint: Path, dose_pair: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    full, low = dose_pair
    compare(str(low), str(full), output_dir=str(tmp_path / "cmp"), ckpt=str(tiny_checkpoint), device="cpu")
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["first"]["n_slices"] == 7 and result["second"]["n_slices"] == 6
    assert [Path(error["path"]).name for error in result["first"]["errors"]] == ["notes.txt"]
    assert result["paired"]["n_pairs"] == 6
    assert [entry["n_slices"] for entry in result["first"]["series"].values()] == [7]
    with open(tmp_path / "cmp" / "pairs.csv", newline="") as stream:
        pairs = list(csv.DictReader(stream))
    assert [float(row["first_position"]) for row in pairs] == POSITIONS
    assert [Path(row["first_source"]).name for row in pairs] == [Path(row["second_source"]).name for row in pairs]
    scored = {}
    for side in (low, full):
        score_paths([side], tmp_path / side.name, ckpt=tiny_checkpoint, device="cpu")
        with open(tmp_path / side.name / "scores.csv", newline="") as stream:
            scored.update({row["source"]: float(row["score"]) for row in csv.DictReader(stream)})
    for row in pairs:
        assert float(row["first_score"]) == scored[row["first_source"]]
        assert float(row["second_score"]) == scored[row["second_source"]]
    differences = [scored[row["second_source"]] - scored[row["first_source"]] for row in pairs]
    assert result["paired"]["mean_difference"] == pytest.approx(np.mean(differences), abs=1e-4)
    assert "6 slices paired by position: second - first = " in printed and "compare.json" in printed
    assert "within ±0.05 in " in printed and result["paired"]["tie_band"] == 0.05
    assert result["paired"]["not_paired"] == {  # the low side's slice at 2.5 mm has no partner
        "first": {"slices": 1, "series_without_partner": []},
        "second": {"slices": 0, "series_without_partner": []},
    }
    assert "not paired: 1 of 7 first and 0 of 6 second slices\n" in printed
    assert result["paired"]["warnings"] == [] and "warning" not in printed


def _copy_series(source: Path, target: Path, series_uid: str, patient: str) -> None:
    """The DICOM series in ``source`` as another series of ``patient``, in ``target``."""
    target.mkdir(parents=True)
    for k, path in enumerate(sorted(source.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.PatientID = series_uid, f"{series_uid}.{k}", patient
        ds.save_as(target / path.name, enforce_file_format=True)


def test_series_of_other_patients_or_without_a_partner_are_named(
    tiny_checkpoint: Path, dose_pair: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """Slices paired by position alone across two patients get a warning; a series with no partner series on the
    other side is named, not silently left out."""
    full, low = dose_pair
    first, second = tmp_path / "first", tmp_path / "second"
    _copy_series(full, first / "p1", "1.2.3.11", "A")
    _copy_series(full, second / "p1", "1.2.3.21", "B")  # another patient, at the same positions
    _copy_series(low, first / "p2", "1.2.3.12", "C")  # its slice at 2.5 mm has no partner
    _copy_series(full, second / "p2", "1.2.3.22", "C")
    _copy_series(full, first / "only_here", "1.2.3.13", "D")
    compare(str(first), str(second), output_dir=str(tmp_path / "cmp"), ckpt=str(tiny_checkpoint))
    printed = capsys.readouterr().out
    paired = json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"]
    assert paired["n_pairs"] == 12
    assert paired["not_paired"] == {
        "first": {"slices": 7, "series_without_partner": ["1.2.3.13"]},
        "second": {"slices": 0, "series_without_partner": []},
    }
    assert (
        "not paired: 7 of 19 first and 0 of 12 second slices; series with no partner on the other side: first: "
        "1.2.3.13\n" in printed
    )
    assert paired["warnings"] == [
        "1.2.3.11 and 1.2.3.21 are of different patients (PatientID): paired by position alone"
    ]
    assert "warning: 1.2.3.11 and 1.2.3.21 are of different patients" in printed


def test_series_in_folders_named_by_dose_pair_within_their_patient(
    tiny_checkpoint: Path, dose_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Folders named as the Mayo low-dose challenge names them (``QD/L067_QD``, ``FD/L067_FD``) do not match by name:
    each series pairs with the other side's series of its patient (PatientID) at the same positions."""
    full, low = dose_pair
    quarter, whole = tmp_path / "QD", tmp_path / "FD"
    for number, patient in enumerate(("L067", "L096")):
        _copy_series(low, quarter / f"{patient}_QD", f"1.2.3.3{number}", patient)
        _copy_series(full, whole / f"{patient}_FD", f"1.2.3.4{number}", patient)
    _copy_series(full, whole / "L109_FD", "1.2.3.49", "L109")  # no quarter dose of this patient
    compare(str(quarter), str(whole), output_dir=str(tmp_path / "cmp"), ckpt=str(tiny_checkpoint))
    with open(tmp_path / "cmp" / "pairs.csv", newline="") as stream:
        pairs = {
            (Path(row["first_source"]).parent.name, Path(row["second_source"]).parent.name)
            for row in csv.DictReader(stream)
        }
    assert pairs == {("L067_QD", "L067_FD"), ("L096_QD", "L096_FD")}
    paired = json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"]
    assert paired["n_pairs"] == 12 and paired["warnings"] == []
    assert paired["not_paired"]["second"] == {"slices": 6, "series_without_partner": ["1.2.3.49"]}


def test_volumes_made_from_a_series_read_as_its_slices_and_pair_with_them(
    tiny_checkpoint: Path, dose_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A NIfTI as dcm2niix writes a series (voxel (i, j, k): column i, row j of slice k; DICOM's LPS mm negated in x
    and y) and an NRRD in LPS as 3D Slicer writes one: each slice is the DICOM slice, pixel for pixel, at its
    position, so compare pairs every slice with itself and finds them tied."""
    full = dose_pair[0]
    files = sorted(full.glob("*.dcm"))
    hu = [read_ct_slice(path)[0][0] for path in files]
    volume = np.stack([pixels.T for pixels in hu], axis=2)
    to_ras = np.diag([-1.0, -1.0, 2.5, 1.0])
    to_ras[2, 3] = POSITIONS[0]
    nibabel.save(nibabel.Nifti1Image(volume, to_ras), tmp_path / "full.nii.gz")
    lps = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 2.5])}
    nrrd.write(str(tmp_path / "full.nrrd"), volume, {**lps, "space origin": np.array([0.0, 0.0, POSITIONS[0]])})
    for made in (tmp_path / "full.nii.gz", tmp_path / "full.nrrd"):
        items, errors = index_inputs([made])
        assert errors == [] and [item["position"] for item in items] == pytest.approx(POSITIONS)
        for k, path in enumerate(files):
            assert np.array_equal(read_ct_slice(made, k)[0], read_ct_slice(path)[0])
    compare(str(tmp_path / "full.nii.gz"), str(full), output_dir=str(tmp_path / "cmp"), ckpt=str(tiny_checkpoint))
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["paired"]["n_pairs"] == 6 and result["paired"]["tied"] == 1.0
    assert result["window"] == [[-1000.0, 400.0]]  # the tiny model's own, from its model.json
    identity = {"scale": 1.0, "shift": 0.0}
    assert result["model"] == {"checkpoint": str(tiny_checkpoint.resolve()), "calibration": identity}
    with open(tmp_path / "cmp" / "pairs.csv", newline="") as stream:
        pairs = list(csv.DictReader(stream))
    assert [int(row["first_slice"]) for row in pairs] == [int(row["second_slice"]) for row in pairs] == list(range(6))
    assert [Path(row["second_source"]) for row in pairs] == files


def test_a_series_whose_normal_points_to_the_feet_pairs_by_where_its_slices_lie(
    dose_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """ImageOrientationPatient [-1, 0, 0, 0, 1, 0] (its normal -z): positions along it are -z, yet each slice pairs
    with the slice at its own height in a series of the usual orientation, not with its mirror image."""
    full = dose_pair[0]
    for path in sorted(full.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
    sides = [index_inputs([folder])[0] for folder in (full, tmp_path)]
    assert [item["position"] for item in sides[1]] == [-z for z in reversed(POSITIONS)]
    usual, feet_first = (Series("s", items, [2.0] * len(items), [0.0] * len(items)) for items in sides)
    pairs = pair_slices([usual], [feet_first])
    assert [(Path(a.items[i]["image"]).name, Path(b.items[j]["image"]).name) for a, i, b, j in pairs] == [
        (path.name, path.name) for path in sorted(full.glob("*.dcm"))
    ]


def test_unpaired_sides_say_why() -> None:
    first, shifted = _series("a", [0.0, 2.5]), _series("b", [100.0, 102.5])
    assert compare_scores([first], [shifted])[0]["paired"] == {
        "n_pairs": 0,
        "reason": "no slice at the same position: a at 0 to 2.5 mm, b at 100 to 102.5 mm",
    }
    apart = [_series("c", [0.0], folder="p1"), _series("d", [0.0], folder="p1")]
    assert compare_scores(apart, [_series("e", [0.0], folder="p2")])[0]["paired"]["reason"] == (
        "no series in the same folder under both inputs (first: p1; second: p2), nor of one patient at the same "
        "positions: name one series folder on each side, or give both sides the same folders"
    )


def test_a_side_with_nothing_scored_exits_non_zero_and_still_reports(
    tiny_checkpoint: Path, dose_pair: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as stopped:
        compare(str(empty), str(dose_pair[0]), output_dir=str(tmp_path / "cmp"), ckpt=str(tiny_checkpoint))
    assert stopped.value.code == 1
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["first"]["n_slices"] == 0 and result["first"]["mean"] is None
    assert result["second"]["n_slices"] == 6
    assert result["paired"] == {"n_pairs": 0, "reason": "nothing scored on the first side"}
    printed = capsys.readouterr().out
    assert "first: 0 slices in 0 series; 1 inputs not scored" in printed
    assert "no slices paired: nothing scored on the first side" in printed


def test_patients_in_parallel_folders_are_paired_by_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Two patients a side at the same table positions, each series with its own UID (in name order the other
    patient's on the other side): each patient's slices pair with the same patient's."""
    for side, noise in (("low", 60.0), ("full", 5.0)):
        for patient in ("p1", "p2"):
            number = int(patient[1]) if side == "low" else 3 - int(patient[1])
            uid = f"1.2.3.{len(side)}.{number}"
            for k, position in enumerate(POSITIONS[:2]):
                write_dicom_slice(tmp_path / side / patient / f"{k}.dcm", _phantom(k, noise), uid, position)
    compare(str(tmp_path / "low"), str(tmp_path / "full"), output_dir=str(tmp_path / "cmp"), ckpt=str(tiny_checkpoint))
    with open(tmp_path / "cmp" / "pairs.csv", newline="") as stream:
        pairs = [(Path(row["first_source"]), Path(row["second_source"])) for row in csv.DictReader(stream)]
    assert len(pairs) == 4
    assert all(a.parent.name == b.parent.name and a.name == b.name for a, b in pairs)


def test_two_folders_of_slice_images_pair_in_their_numbers_order(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Each folder is one series (``index_inputs``): the slices pair by their order in it, whatever their names."""
    from PIL import Image
    from scripts.clinical.compare import compare_paths

    for side, names, noise in (("clean", ("1", "2", "10"), 2.0), ("noisy", ("001", "002", "003"), 40.0)):
        (tmp_path / side).mkdir()
        for k, name in enumerate(names):
            grey = np.clip((_phantom(k, noise) + 1000.0) / 1400.0 * 255.0, 0, 255).astype(np.uint8)
            Image.fromarray(grey).save(tmp_path / side / f"{name}.png")
    result = compare_paths(str(tmp_path / "clean"), str(tmp_path / "noisy"), tmp_path / "out", tiny_checkpoint,
                           device="cpu", num_workers=0)  # fmt: skip
    assert result["paired"]["n_pairs"] == 3 and result["first"]["n_slices"] == result["second"]["n_slices"] == 3
    with open(tmp_path / "out" / "pairs.csv", newline="") as stream:
        pairs = [(Path(row["first_source"]).stem, Path(row["second_source"]).stem) for row in csv.DictReader(stream)]
    assert pairs == [("1", "001"), ("2", "002"), ("10", "003")]
