"""Dataset checks: every bad input is a clear error naming the file and the reason."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scripts.ct_inputs import LoadCTSliced, inference_items
from scripts.data import (
    DatasetError,
    check_dataset,
    kadid_labelled_items,
    ldct_labelled_items,
    split_items,
    training_datalists,
)
from scripts.transforms import ImageReadError, read_slice

from tests.conftest import NOT_DICOM, REPO_ROOT, decimal_comma


def _names_and_labels(items: list[dict]) -> list[tuple[str, float]]:
    """Each labelled slice as (file name, label), in order: what two readings of one dataset must agree on."""
    return [(Path(item["image"]).name, item["label"]) for item in items]


@pytest.fixture
def ldct_copy(ldct_train_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny LDCTIQA training set that a test may break."""
    return Path(shutil.copytree(ldct_train_dir, tmp_path / "ldct"))


def _rewrite_labels(root: Path, edit, label_file: str = "train.json") -> None:
    labels = json.loads((root / label_file).read_text())
    edit(labels)
    (root / label_file).write_text(json.dumps(labels))


def test_both_ldct_layouts_are_read(ldct_train_dir: Path, ldct_test_dir: Path) -> None:
    train = ldct_labelled_items(ldct_train_dir)
    test = ldct_labelled_items(ldct_test_dir)
    assert len(train) == 32 and Path(train[0]["image"]).name == "0000.tif"
    assert len(test) == 12 and Path(test[0]["image"]).name == "test000.tiff"
    assert all(0.0 <= item["label"] <= 4.0 for item in train + test)


def test_a_rearranged_ldct_set_is_read_with_either_folder_name(ldct_copy: Path) -> None:
    before = _names_and_labels(ldct_labelled_items(ldct_copy))
    (ldct_copy / "image").rename(ldct_copy / "images")  # train.json beside images/, as a hand-made copy may be
    items = ldct_labelled_items(ldct_copy)
    assert _names_and_labels(items) == before and len(before) == 32
    assert all(Path(item["image"]).parent == ldct_copy / "images" for item in items)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere: dataset folder does not exist"):
        ldct_labelled_items(tmp_path / "nowhere")
    for unset in (None, ""):  # --dataset_dir '$None' on the command line: the same kind of error, not a TypeError
        with pytest.raises(DatasetError, match=r"dataset_dir: no dataset folder given \(set dataset_dir\)"):
            ldct_labelled_items(unset)


def test_folder_without_label_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no LDCTIQA label file found \(expected image/ \+ train.json"):
        ldct_labelled_items(tmp_path)


def test_a_folder_one_level_above_the_dataset_is_named(ldct_copy: Path, kadid_dir: Path, tmp_path: Path) -> None:
    """An archive unpacked with its top folder: the error names the subfolder that holds the layout."""
    assert ldct_copy.parent == tmp_path
    with pytest.raises(DatasetError, match=r"its subfolder ldct/ holds one: set dataset_dir to that folder"):
        ldct_labelled_items(tmp_path)
    shutil.copytree(kadid_dir, tmp_path / "kadid10k")
    with pytest.raises(DatasetError, match=r"dmos.csv\); its subfolder kadid10k/ holds one"):
        kadid_labelled_items(tmp_path)
    shutil.copytree(ldct_copy, tmp_path / "ldct_b")
    with pytest.raises(DatasetError, match=r"its subfolders ldct/, ldct_b/ hold one each"):
        ldct_labelled_items(tmp_path)


def test_label_file_naming_missing_images(ldct_copy: Path) -> None:
    _rewrite_labels(ldct_copy, lambda labels: labels.update({"9999.tif": 2.0}))
    with pytest.raises(DatasetError, match=r"image/9999.tif: named in train.json but the image does not exist$"):
        ldct_labelled_items(ldct_copy)
    _rewrite_labels(ldct_copy, lambda labels: labels.pop("9999.tif"))
    (ldct_copy / "image" / "0001.tif").rename(ldct_copy / "image" / "0001.TIF")
    with pytest.raises(DatasetError, match=r"image does not exist \(0001.TIF does: names are case-sensitive\)"):
        ldct_labelled_items(ldct_copy)


def test_label_names_without_suffix_are_the_tiffs_of_that_stem(ldct_copy: Path) -> None:
    """Some copies of LDCTIQA name images without their suffix (``L096_402_1_1`` for ``L096_402_1_1.tif``)."""
    before = _names_and_labels(ldct_labelled_items(ldct_copy))
    _rewrite_labels(ldct_copy, lambda labels: labels.update({name[:-4]: labels.pop(name) for name in list(labels)}))
    assert _names_and_labels(ldct_labelled_items(ldct_copy)) == before
    (ldct_copy / "image" / "0001.tif").rename(ldct_copy / "image" / "0001.tiff")
    assert Path(ldct_labelled_items(ldct_copy)[1]["image"]).name == "0001.tiff"


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda labels: labels.update({"9999": 1.0}),
            r"image/9999: named in train.json but the image does not exist \(nor 9999.tif or 9999.tiff\)",
        ),
        (
            lambda labels: labels.update({"0002": 1.0}),
            r"train.json \[0002.tif\]: 0002.tif is labelled twice \(as '0002' too\)",
        ),
    ],
)
def test_label_names_without_suffix_that_name_no_image_or_one_twice(ldct_copy: Path, edit, reason: str) -> None:
    _rewrite_labels(ldct_copy, edit)
    with pytest.raises(DatasetError, match=reason):
        ldct_labelled_items(ldct_copy)


def test_a_label_name_without_suffix_with_two_tiffs_is_ambiguous(ldct_copy: Path) -> None:
    shutil.copy(ldct_copy / "image" / "0004.tif", ldct_copy / "image" / "0004.tiff")
    _rewrite_labels(ldct_copy, lambda labels: labels.update({"0004": labels.pop("0004.tif")}))
    with pytest.raises(DatasetError, match=r"image/0004: named in train.json but both 0004.tif and 0004.tiff exist"):
        ldct_labelled_items(ldct_copy)


def _grouped(ldct_copy: Path) -> Path:
    """The training copy rearranged as LDCTIQA's test ground truth is released: ``test-ground-truth.json``,
    ``{"test_0.tif": {"fnames": [...], "scores": [...]}, ...}``, each group's slices in its own folder."""
    labels = json.loads((ldct_copy / "train.json").read_text())
    root = ldct_copy.parent / "grouped"
    grouped = {}
    for number, names in enumerate((sorted(labels)[:20], sorted(labels)[20:])):
        (root / f"test_{number}").mkdir(parents=True)
        for name in names:
            shutil.copy(ldct_copy / "image" / name, root / f"test_{number}" / name)
        grouped[f"test_{number}.tif"] = {"fnames": [name[:-4] for name in names], "scores": [labels[n] for n in names]}
    (root / "test-ground-truth.json").write_text(json.dumps(grouped))
    return root


def _edit_groups(root: Path, edit) -> None:
    _rewrite_labels(root, edit, "test-ground-truth.json")


def test_grouped_test_ground_truth_is_read(ldct_copy: Path, tmp_path: Path) -> None:
    """The same 32 slices and scores, read from their group folders; a datalist keeps the folders."""
    flat = _names_and_labels(ldct_labelled_items(ldct_copy))
    grouped = _grouped(ldct_copy)
    items = ldct_labelled_items(grouped)
    assert _names_and_labels(items) == flat and len(flat) == 32
    assert [Path(item["image"]).parent.name for item in items] == ["test_0"] * 20 + ["test_1"] * 12
    assert check_dataset(str(grouped))["images"] == 32
    with pytest.raises(
        DatasetError, match=r"or test-ground-truth.json\); its subfolders grouped/, ldct/ hold one each"
    ):
        ldct_labelled_items(grouped.parent)
    training_datalists(grouped, split=0.25, seed=0, output_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "datalist.json").read_text())
    listed = sorted(item["image"] for item in record["training"] + record["validation"])
    assert listed == sorted(f"{Path(item['image']).parent.name}/{Path(item['image']).name}" for item in items)
    (grouped / "images").mkdir()  # the grouped form in test.json, its group folders in images/
    for folder in ("test_0", "test_1"):
        (grouped / folder).rename(grouped / "images" / folder)
    (grouped / "test-ground-truth.json").rename(grouped / "test.json")
    moved = ldct_labelled_items(grouped)
    assert [(item["image"].replace("/images/", "/"), item["label"]) for item in moved] == [
        (item["image"], item["label"]) for item in items
    ]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda groups: shutil.rmtree(groups / "test_1"),
            r"grouped/test_1: folder of group 'test_1.tif' does not exist \(its 12 slices go there",
        ),
        (
            lambda groups: shutil.rmtree(groups / "test_1") or (groups / "test_1.tif").write_bytes(b"a stack"),
            r"does not exist \(its 12 slices go there, one TIFF each\); test_1.tif is a file: its slices are read from "
            r"test_1/, one TIFF per slice named as in fnames",
        ),
        (
            lambda groups: _edit_groups(groups, lambda labels: labels["test_0.tif"]["scores"].pop()),
            r"test-ground-truth.json \[test_0.tif\]: expected \{\"fnames\": \[...\], \"scores\": \[...\]\} of equal",
        ),
        (
            lambda groups: _edit_groups(groups, lambda labels: labels["test_1.tif"].pop("fnames")),
            r"test-ground-truth.json \[test_1.tif\]: expected",
        ),
        (
            lambda groups: _edit_groups(groups, lambda labels: labels["test_0.tif"]["scores"].__setitem__(3, 4.4)),
            r"test-ground-truth.json \[test_0/0003\]: label 4.4 is outside \[0, 4\]",
        ),
        (
            lambda groups: (groups / "test_0" / "0005.tif").unlink(),
            r"test_0/0005: named in test-ground-truth.json but the image does not exist \(nor 0005.tif",
        ),
        (
            lambda groups: _edit_groups(groups, lambda labels: labels["test_0.tif"]["fnames"].__setitem__(1, "0000")),
            r"test-ground-truth.json \[test_0.tif\]: '0000' is listed twice",
        ),
    ],
)
def test_grouped_test_ground_truth_errors(ldct_copy: Path, edit, reason: str) -> None:
    grouped = _grouped(ldct_copy)
    edit(grouped)
    with pytest.raises(DatasetError, match=reason):
        ldct_labelled_items(grouped)


def test_grouped_labels_naming_no_slices(ldct_copy: Path) -> None:
    grouped = _grouped(ldct_copy)
    (grouped / "test-ground-truth.json").write_text(json.dumps({"test_0.tif": {"fnames": [], "scores": []}}))
    with pytest.raises(DatasetError, match=r"test-ground-truth.json: names no slices"):
        ldct_labelled_items(grouped)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (4.2, r"label 4.2 is outside \[0, 4\]"),
        (-0.2, r"label -0.2 is outside"),
        ("good", r"label 'good' is not a number"),
        (None, r"label None is not a number"),
        (True, r"label True is not a number"),
    ],
)
def test_labels_outside_range_or_not_numbers(ldct_copy: Path, value, reason: str) -> None:
    _rewrite_labels(ldct_copy, lambda labels: labels.update({"0003.tif": value}))
    with pytest.raises(DatasetError, match=r"train.json \[0003.tif\]: " + reason):
        ldct_labelled_items(ldct_copy)


def test_label_file_not_json(ldct_copy: Path) -> None:
    (ldct_copy / "train.json").write_text("{'0000.tif': 2.0")
    with pytest.raises(DatasetError, match=r"train.json: not a readable JSON file"):
        ldct_labelled_items(ldct_copy)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../../outside/x.tif", "leads outside image/"), ("/tmp/x.tif", "is an absolute path")],
)
def test_label_names_stay_inside_the_image_folder(ldct_copy: Path, name: str, reason: str) -> None:
    outside = ldct_copy.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(ldct_copy / "image" / "0000.tif", outside / "x.tif")  # it exists: only the name is wrong
    _rewrite_labels(ldct_copy, lambda labels: labels.update({name: 2.0}))
    with pytest.raises(DatasetError, match=re.escape(f"train.json [{name}]: image name {name!r} {reason}")):
        ldct_labelled_items(ldct_copy)


def test_a_folder_of_links_to_the_images_reads_as_the_images(ldct_train_dir: Path, tmp_path: Path) -> None:
    """git-annex, DataLad and DVC keep each image as a link to a file elsewhere: the links are the folder's images."""
    linked = tmp_path / "linked"
    (linked / "image").mkdir(parents=True)
    shutil.copy(ldct_train_dir / "train.json", linked / "train.json")
    for image in sorted((ldct_train_dir / "image").iterdir()):
        (linked / "image" / image.name).symlink_to(image)
    expected = _names_and_labels(ldct_labelled_items(ldct_train_dir))
    assert _names_and_labels(ldct_labelled_items(linked)) == expected


def test_a_slice_labelled_twice_is_an_error(ldct_copy: Path, kadid_dir: Path, tmp_path: Path) -> None:
    text = (ldct_copy / "train.json").read_text()
    (ldct_copy / "train.json").write_text(text.replace("{", '{"0002.tif": 0.5, ', 1))
    with pytest.raises(DatasetError, match=r"train.json: '0002.tif' is labelled twice \(0.5 and "):
        ldct_labelled_items(ldct_copy)
    kadid = Path(shutil.copytree(kadid_dir, tmp_path / "kadid"))
    lines = (kadid / "dmos.csv").read_text().splitlines()
    (kadid / "dmos.csv").write_text("\n".join([*lines, lines[3]]) + "\n")
    name = lines[3].split(",")[0]
    with pytest.raises(DatasetError, match=re.escape(f"[{name}]: '{name}' is labelled twice (lines 4 and")):
        kadid_labelled_items(kadid)


def test_unreadable_image(ldct_copy: Path) -> None:
    (ldct_copy / "image" / "0005.tif").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"0005.tif: unreadable image"):
        ldct_labelled_items(ldct_copy)


def test_every_problem_is_listed_together(ldct_copy: Path) -> None:
    (ldct_copy / "image" / "0005.tif").write_bytes(b"")
    _rewrite_labels(ldct_copy, lambda labels: labels.update({"0001.tif": 7, "4444.tif": 1.0}))
    with pytest.raises(DatasetError) as caught:
        ldct_labelled_items(ldct_copy)
    assert [Path(path.split(" ")[0]).name for path, _ in caught.value.problems] == [
        "train.json",
        "4444.tif",
        "0005.tif",
    ]
    assert str(caught.value).startswith("3 problem(s) in the dataset:")


def test_kadid_layout_and_its_errors(kadid_dir: Path, tmp_path: Path) -> None:
    items = kadid_labelled_items(kadid_dir)
    assert len(items) == 40 and all(1.0 <= item["label"] <= 5.0 for item in items)
    broken = Path(shutil.copytree(kadid_dir, tmp_path / "kadid"))
    lines = (broken / "dmos.csv").read_text().splitlines()
    line = next(i for i, text in enumerate(lines) if text.startswith("I01_01_02.png,"))
    fields = lines[line].split(",")
    lines[line] = ",".join([*fields[:2], "5.5", *fields[3:]])
    (broken / "dmos.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"dmos.csv:{line + 1} \[I01_01_02.png\]: label 5.5 is outside \[1, 5\]"):
        kadid_labelled_items(broken)
    (broken / "dmos.csv").write_text("image,score\nI01_01_01.png,3\n")
    with pytest.raises(
        DatasetError, match=r"missing column\(s\) \['dist_img', 'dmos', 'ref_img'\] \(header: image, sc"
    ):
        kadid_labelled_items(broken)
    (broken / "dmos.csv").write_text("dist_img,ref_img,dmos,var\n")
    with pytest.raises(DatasetError, match=r"dmos.csv: no rows below the header"):
        kadid_labelled_items(broken)


def test_label_files_saved_by_excel_read_as_the_originals(ldct_copy: Path, kadid_dir: Path, tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (Excel's "CSV UTF-8", some editors' JSON), scores written as text, spaces after the
    commas of a header, and a CSV saved where the decimal mark is a comma: semicolons between cells, "4,57"."""
    expected = _names_and_labels(ldct_labelled_items(ldct_copy))
    labels = json.loads((ldct_copy / "train.json").read_text())
    (ldct_copy / "train.json").write_text("\ufeff" + json.dumps({k: str(v) for k, v in labels.items()}), "utf-8")
    assert _names_and_labels(ldct_labelled_items(ldct_copy)) == expected
    kadid = Path(shutil.copytree(kadid_dir, tmp_path / "kadid"))
    expected = _names_and_labels(kadid_labelled_items(kadid))
    lines = (kadid / "dmos.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    (kadid / "dmos.csv").write_text("\ufeff" + "\r\n".join([", ".join(header), *lines[1:]]) + "\r\n", "utf-8")
    assert _names_and_labels(kadid_labelled_items(kadid)) == expected
    semicolons = [";".join(name.title() for name in header)] + [";".join(map(decimal_comma, row)) for row in rows]
    assert semicolons[0].startswith("Dist_Img;") and re.search(r";\d,\d+;", semicolons[1])
    (kadid / "dmos.csv").write_text("\r\n".join([*semicolons, ";;;", ";;;"]) + "\r\n")
    assert _names_and_labels(kadid_labelled_items(kadid)) == expected


def test_setting_a_is_a_fixed_800_200_split() -> None:
    items = [{"image": f"image/{i:04d}.tif", "label": 0.0} for i in range(1000)]
    train, held_out = split_items(items, "A", seed=1)
    assert (len(train), len(held_out)) == (800, 200)
    assert split_items(items, "A", seed=12345)[1] == held_out  # the seed id does not move Setting A
    assert {it["image"] for it in train}.isdisjoint(it["image"] for it in held_out)
    other_train, other_val = split_items(items, 0.1, seed=48)
    assert (len(other_train), len(other_val)) == (900, 100)
    assert split_items(items, 0.1, seed=49)[1] != other_val


def test_invalid_split(ldct_train_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be 'A' or a validation fraction"):
        training_datalists(ldct_train_dir, split=1.5)


def test_read_slice_rejects_bad_pixels(tmp_path: Path) -> None:
    cases = {
        "volume.tif": (np.zeros((4, 32, 32), np.float32), r"expected a 2-D grey or RGB slice"),
        "nan.tif": (np.full((32, 32), np.nan, np.float32), r"pixels contain NaN or Inf"),
        "tiny.tif": (np.zeros((4, 4), np.float32), r"image too small"),
    }
    for name, (pixels, reason) in cases.items():
        tifffile.imwrite(tmp_path / name, pixels)
        with pytest.raises(ImageReadError, match=rf"{name}: {reason}"):
            read_slice(tmp_path / name)
    with pytest.raises(ImageReadError, match=r"missing.png: file does not exist"):
        read_slice(tmp_path / "missing.png")


def test_integer_slices_are_scaled_by_their_type(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "u16.tif", np.array([[0, 65535] * 8] * 16, dtype=np.uint16))
    pixels = read_slice(tmp_path / "u16.tif")
    assert pixels.dtype == np.float32 and pixels.min() == 0.0 and pixels.max() == 1.0
    image = LoadCTSliced("image", channels=3, error_key=None)({"image": str(tmp_path / "u16.tif")})["image"]
    assert tuple(image.shape) == (3, 16, 16) and image.meta["filename_or_obj"].endswith("u16.tif")


def test_inference_items_carry_bad_files_as_errors(ldct_test_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(ldct_test_dir / "images", tmp_path / "slices"))
    (folder / "notes.txt").write_text("not an image")
    items = inference_items(folder)
    assert len(items) == 13 and sum(1 for item in items if not item["error"]) == 12
    assert [(Path(item["image"]).name, item["error"]) for item in items if item["error"]] == [
        (
            "notes.txt",
            NOT_DICOM,
        )
    ]
    (tmp_path / "empty").mkdir()  # an item with the reason: the run lists it in errors.json and fails with it
    assert [(item["image"], item["error"]) for item in inference_items(tmp_path / "empty")] == [
        (str(tmp_path / "empty"), "no scorable CT or slice files found")
    ]


def test_check_data_command(ldct_train_dir: Path, ldct_copy: Path) -> None:
    summary = check_dataset(str(ldct_train_dir))
    assert (summary["images"], summary["validation"]) == (32, 3)
    with pytest.raises(DatasetError, match=r"2 validation slice\(s\) with split 0.05: PLCC/SROCC/KROCC need at least"):
        check_dataset(str(ldct_train_dir), split=0.05)  # what training would stop on, before its first epoch
    (ldct_copy / "image" / "0002.tif").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "scripts", "check_data", str(ldct_copy)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "0002.tif: named in train.json but the image does not exist" in result.stderr


def _tiny_layout(root: Path, source: Path, labels: list[float]) -> Path:
    (root / "image").mkdir(parents=True)
    names = sorted(p.name for p in (source / "image").glob("*.tif"))[: len(labels)]
    for name in names:
        (root / "image" / name).write_bytes((source / "image" / name).read_bytes())
    (root / "train.json").write_text(json.dumps(dict(zip(names, labels, strict=True))))
    return root


@pytest.mark.parametrize(
    ("labels", "split", "reason"),
    [
        ([1.0] * 11 + [2.0], 0.1, "1 validation slice(s) with split 0.1: PLCC/SROCC/KROCC need at least 3"),
        ([2.0], 0.1, "split 0.1 leaves no training data"),
        (
            [1.0, 2.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
            0.3,
            "every validation label is 2: correlations are undefined",
        ),
    ],
)
def test_validation_that_cannot_decide_stops_before_training(
    ldct_train_dir: Path, tmp_path: Path, labels: list[float], split: float, reason: str
) -> None:
    root = _tiny_layout(tmp_path / "ds", ldct_train_dir, labels)
    if len(labels) == 10:  # the 3 drawn for validation: make them the constant ones
        val = {Path(it["image"]).name for it in split_items(ldct_labelled_items(root), split, 48)[1]}
        relabelled = {
            name: (2.0 if name in val else float(i % 5))
            for i, name in enumerate(sorted(json.loads((root / "train.json").read_text())))
        }
        (root / "train.json").write_text(json.dumps(relabelled))
    with pytest.raises(DatasetError, match=re.escape(reason)):
        training_datalists(root, split=split, seed=48)


def test_nan_metrics_never_beat_a_real_one() -> None:
    from scripts.metrics import _finite_sum

    assert _finite_sum(0.5, 0.4, 0.3) == pytest.approx(1.2)
    assert _finite_sum(float("nan"), 0.4, 0.3) == float("-inf") < -100
