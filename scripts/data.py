"""Datalists for the two dataset layouts, checked before any training starts.

- KADID-10k (phase 1): ``images/*.png`` and ``dmos.csv`` (dist_img, ref_img, dmos, var), MOS 1..5.
- LDCTIQA (phase 2): ``image/*.tif`` + ``train.json``, or ``images/*.tiff`` + ``test.json`` (either folder name is
  taken with either label file when only the other exists);
  a flat map ``{"0000.tif": 2.8, ...}``, scores 0..4 (a name without suffix is the TIFF of that stem); or the
  test ground truth as released in groups, ``test-ground-truth.json`` (``_grouped_labels``).

Every problem found (missing files, bad labels, unreadable images) is collected and raised
together as one ``DatasetError`` that names each file and its reason.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist
from scripts.ct_inputs import VOLUME_SUFFIXES, InputError, index_inputs, read_ct_slice, read_dicom_ct
from scripts.options import LDCT_RANGE, OptionError, optional_intercept
from scripts.output_dir import write_json_atomic
from scripts.transforms import SLICE_SUFFIXES, ImageReadError, read_slice

logger = logging.getLogger(__name__)

LDCT_LAYOUTS = (("image", "train.json"), ("images", "test.json"))
LDCT_GROUPED_LABELS = "test-ground-truth.json"  # the slices of each group in a folder of its own
KADID_RANGE = (1.0, 5.0)
SETTING_A_SEED = 48
SETTING_A_HELD_OUT = 0.2
MAX_LISTED_PROBLEMS = 20
MIN_VALIDATION = 3  # slices: fewer give no correlation (or a meaningless one)


class DatasetError(ValueError):
    """A dataset that cannot be used; ``problems`` lists ``(path, reason)`` pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = [f"  {path}: {reason}" for path, reason in self.problems[:MAX_LISTED_PROBLEMS]]
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__(f"{len(self.problems)} problem(s) in the dataset:\n" + "\n".join(lines))


def _require_dir(dataset_dir: str | Path | None) -> Path:
    if not dataset_dir:
        raise DatasetError([("dataset_dir", "no dataset folder given (set dataset_dir)")])
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DatasetError([(str(root), "dataset folder does not exist (set dataset_dir)")])
    return root


def _found_below(root: Path, label_names: Sequence[str]) -> str:
    """A hint naming the subfolders of ``root`` that hold one of ``label_names`` (an archive unpacked with its top
    folder, ``LDCTIQAG2023_train/``), or ``""``."""
    try:
        found = sorted(sub.name for sub in root.iterdir() if any((sub / name).is_file() for name in label_names))
    except OSError:
        return ""
    if not found:
        return ""
    if len(found) == 1:
        return f"; its subfolder {found[0]}/ holds one: set dataset_dir to that folder"
    return f"; its subfolders {', '.join(name + '/' for name in found)} hold one each: set dataset_dir to one of them"


def _as_number(value: Any) -> Any:
    """A label written as text ("2.8", as some exports write JSON) as its number; anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_label(value: Any, valid_range: tuple[float, float]) -> str | None:
    """The reason a label is unusable, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"label {value!r} is not a number"
    if not math.isfinite(value) or not valid_range[0] <= value <= valid_range[1]:
        return f"label {value} is outside [{valid_range[0]:g}, {valid_range[1]:g}]"
    return None


def _check_name(name: str, folder: Path) -> str | None:
    """The reason an image name in a label file is unusable (absolute, or leading out of its folder by ``..``), or
    None. Judged by the name alone: an image that is a link to a file elsewhere (git-annex, DataLad, DVC, a folder of
    links) is the folder's own."""
    if Path(name).is_absolute():
        return f"image name {name!r} is an absolute path; label files name images inside {folder.name}/"
    if Path(os.path.normpath(name)).parts[:1] == ("..",):
        return f"image name {name!r} leads outside {folder.name}/"
    return None


def _other_case(path: Path) -> str:
    """`` (0000.TIF does: names are case-sensitive)`` when a file of the name in other letter case is there."""
    wanted = path.name.lower()
    try:
        found = next((entry.name for entry in os.scandir(path.parent) if entry.name.lower() == wanted), None)
    except OSError:
        return ""
    return f" ({found} does: names are case-sensitive)" if found else ""


def _named_image(folder: Path, name: str) -> tuple[Path, str]:
    """The image a label file names, and why it cannot be used ("" when it can). A name without an image suffix
    (``L096_402_1_1``, as some copies of LDCTIQA's label files give them) is the TIFF of that stem."""
    path = folder / name
    if path.is_file():
        return path, ""
    if Path(name).suffix.lower() in SLICE_SUFFIXES:
        return path, "the image does not exist" + _other_case(path)
    tiffs = [folder / f"{name}{suffix}" for suffix in (".tif", ".tiff")]
    found = [tiff for tiff in tiffs if tiff.is_file()]
    if len(found) == 1:
        return found[0], ""
    if found:
        return path, f"both {found[0].name} and {found[1].name} exist: name the one labelled"
    return path, f"the image does not exist (nor {tiffs[0].name} or {tiffs[1].name})"


def _grouped_labels(
    labels: dict[str, Any], label_file: Path, image_dir: Path, problems: list[tuple[str, str]]
) -> dict[str, Any]:
    """The flat map ``{"test_0/<fname>": score, ...}`` of grouped labels, ``{"test_0.tif": {"fnames": [...],
    "scores": [...]}, ...}`` (LDCTIQA's test ground truth as released), whose slices lie in one folder per group in
    ``image_dir``, named as the group without its suffix. A group whose folder is missing is one problem, not one
    per slice."""
    flat: dict[str, Any] = {}
    for key, group in labels.items():
        fnames, scores = group.get("fnames"), group.get("scores")
        if not (isinstance(fnames, list) and isinstance(scores, list) and len(fnames) == len(scores)):
            problems.append((f"{label_file} [{key}]", 'expected {"fnames": [...], "scores": [...]} of equal length'))
            continue
        folder = os.path.splitext(key)[0]
        if not (image_dir / folder).is_dir():
            reason = f"folder of group {key!r} does not exist (its {len(fnames)} slices go there, one TIFF each)"
            if (image_dir / key).is_file():
                reason += (
                    f"; {key} is a file: its slices are read from {folder}/, one TIFF per slice named as in fnames"
                )
            problems.append((str(image_dir / folder), reason))
            continue
        for fname, score in zip(fnames, scores, strict=True):
            name = f"{folder}/{fname}"
            if name in flat:
                problems.append((f"{label_file} [{key}]", f"{fname!r} is listed twice"))
            else:
                flat[name] = score
    return flat


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is an error, not "the last one wins"."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{key!r} is labelled twice ({seen[key]!r} and {value!r})")
        seen[key] = value
    return seen


def _check_images(items: list[dict], problems: list[tuple[str, str]]) -> None:
    for item in items:
        try:
            read_slice(item["image"])
        except ImageReadError as error:
            problems.append((error.path, error.reason))


def ldct_labelled_items(dataset_dir: str | Path | None, check_images: bool = True) -> list[dict]:
    """``[{"image": path, "label": score}]`` for an LDCTIQA train or test folder, checked."""
    root = _require_dir(dataset_dir)
    layouts = (*LDCT_LAYOUTS, ("", LDCT_GROUPED_LABELS))
    layout = next(((img, lab) for img, lab in layouts if (root / lab).is_file()), None)
    if layout is None:
        expected = " or ".join(f"{img}/ + {lab}" for img, lab in LDCT_LAYOUTS) + f" or {LDCT_GROUPED_LABELS}"
        hint = _found_below(root, [label for _, label in layouts])
        raise DatasetError([(str(root), f"no LDCTIQA label file found (expected {expected}){hint}")])
    image_dir, label_name = layout
    # a set rearranged by hand: its label file with the other folder name
    if image_dir and not (root / image_dir).is_dir():
        image_dir = next((img for img, _ in LDCT_LAYOUTS if (root / img).is_dir()), image_dir)
    label_file = root / label_name
    try:
        labels = json.loads(label_file.read_text(encoding="utf-8-sig"), object_pairs_hook=_pairs_without_duplicates)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError([(str(label_file), f"not a readable JSON file ({error})")]) from error
    except ValueError as error:  # a duplicate key
        raise DatasetError([(str(label_file), str(error))]) from None
    if not isinstance(labels, dict) or not labels:
        raise DatasetError([(str(label_file), 'expected a non-empty map {"0000.tif": 2.8, ...}')])
    problems: list[tuple[str, str]] = []
    if all(isinstance(group, dict) for group in labels.values()):
        labels = _grouped_labels(labels, label_file, root / image_dir, problems)
    items = []
    named: dict[Path, str] = {}
    for name, value in sorted(labels.items()):
        value = _as_number(value)
        reason = _check_name(name, root / image_dir) or _check_label(value, LDCT_RANGE)
        if reason:
            problems.append((f"{label_file} [{name}]", reason))
            continue
        path, missing = _named_image(root / image_dir, name)
        if missing:
            problems.append((str(path), f"named in {label_name} but {missing}"))
        elif path in named:
            problems.append((f"{label_file} [{name}]", f"{path.name} is labelled twice (as {named[path]!r} too)"))
        else:
            named[path] = name
            items.append({"image": str(path), "label": float(value)})
    if not items and not problems:
        problems.append((str(label_file), "names no slices"))
    if check_images:
        _check_images(items, problems)
    if problems:
        raise DatasetError(problems)
    return items


CSV_DELIMITERS = (",", ";", "\t")


def read_csv_rows(label_file: Path, number_columns: Sequence[str] = ()) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and ``(line, row)`` pairs of a CSV label file as spreadsheets save it.

    The header's names are stripped and in lower case ("Path, Score"); cells are separated by commas, or by the
    semicolons or tabs that Excel uses in locales with a decimal comma (whichever the header holds most of), and
    there ``number_columns`` may hold a decimal comma ("2,8"); rows whose cells are all empty (Excel's trailing
    ",,,," rows) are left out. ``DatasetError`` for a file that cannot be read as text.
    """
    try:
        text = label_file.read_text(encoding="utf-8-sig")  # a byte-order mark, as Excel writes
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError([(str(label_file), f"not a readable CSV file ({error})")]) from None
    header_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = max(CSV_DELIMITERS, key=header_line.count) if any(d in header_line for d in CSV_DELIMITERS) else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
    rows = []
    for row in reader:
        cells = {key: (value.strip() if isinstance(value, str) else value) for key, value in row.items() if key}
        if not any(cells.values()):
            continue
        if delimiter != ",":
            for column in number_columns:
                if re.fullmatch(r"-?\d+,\d+", cells.get(column) or ""):
                    cells[column] = cells[column].replace(",", ".")
        rows.append((reader.line_num, cells))
    return reader.fieldnames, rows


def kadid_labelled_items(dataset_dir: str | Path | None, check_images: bool = True) -> list[dict]:
    """``[{"image": path, "label": mos, "ref": reference}]`` for a KADID-10k folder, checked."""
    root = _require_dir(dataset_dir)
    label_file = root / "dmos.csv"
    if not label_file.is_file():
        hint = _found_below(root, ["dmos.csv"])
        raise DatasetError([(str(label_file), f"KADID-10k label file not found (expected images/ + dmos.csv){hint}")])
    header_names, rows = read_csv_rows(label_file, number_columns=("dmos", "var"))
    missing_columns = {"dist_img", "ref_img", "dmos"} - set(header_names)
    if missing_columns:
        header = ", ".join(header_names) or "none"
        raise DatasetError([(str(label_file), f"missing column(s) {sorted(missing_columns)} (header: {header})")])
    if not rows:
        raise DatasetError([(str(label_file), "no rows below the header")])
    problems: list[tuple[str, str]] = []
    items = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        value = _as_number(row["dmos"])
        name = row["dist_img"]
        duplicate = f"{name!r} is labelled twice (lines {first_line[name]} and {line})" if name in first_line else None
        first_line.setdefault(name, line)
        reason = _check_name(name, root / "images") or duplicate or _check_label(value, KADID_RANGE)
        path = root / "images" / name
        if reason:
            problems.append((f"{label_file}:{line} [{row['dist_img']}]", reason))
        elif not path.is_file():
            problems.append((str(path), "named in dmos.csv but the image does not exist" + _other_case(path)))
        else:
            items.append({"image": str(path), "label": value, "ref": row["ref_img"]})
    if check_images:
        _check_images(items, problems)
    if problems:
        raise DatasetError(problems)
    return items


# --- scored CT: a labels file naming DICOM files or series folders, NIfTI volumes or TIFF/PNG slices ---------------

SCORED_CT_COLUMNS = ("path", "score", "slice", "patient", "sd")
LAYOUTS = ("ldct", "kadid", "scored_ct")


def _label_rows(labels: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a labels file: CSV with a header row, or JSON (a list of objects with the same keys)."""
    if labels.suffix.lower() == ".json":
        try:
            rows = json.loads(labels.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError([(str(labels), f"not a readable labels file ({error})")]) from None
        except json.JSONDecodeError as error:
            raise DatasetError([(str(labels), f"not a readable JSON file ({error})")]) from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise DatasetError([(str(labels), 'expected a list of objects [{"path": ..., "score": ...}, ...]')])
        return [(f"{labels} [item {number}]", row) for number, row in enumerate(rows)]
    header_names, rows = read_csv_rows(labels, number_columns=("score", "sd", "slice"))
    missing = [column for column in ("path", "score") if column not in header_names]
    if missing:
        header = ", ".join(header_names) or "none"
        raise DatasetError([(str(labels), f"no {' and no '.join(missing)} column (header: {header})")])
    return [(f"{labels} [line {line}]", row) for line, row in rows]


def _text(value: Any) -> str:
    """A labels-file cell as text: "" for an empty or absent one (JSON numbers such as slice 0 included)."""
    return "" if value is None else str(value).strip()


def _optional_number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{key} {value!r} is not a number") from None


LEFT_BY_TOOLS = {"thumbs.db", "desktop.ini", "dicomdir"}  # beside the slices of many exports, never slices


def _left_by_tools(path: str) -> bool:
    """A hidden file (``.DS_Store``, macOS's ``._0001.dcm``) or one that file browsers and CD exports leave."""
    name = Path(path).name
    return name.startswith(".") or name.lower() in LEFT_BY_TOOLS


def _slice_index(chosen: str, path: Path) -> int | None:
    """A labels file's ``slice`` as an index (``2``, or ``2.0`` as spreadsheets and pandas write whole numbers), or
    None for a SOPInstanceUID; ``InputError`` for a negative index, or anything else where a volume is named (its
    slices have no UIDs)."""
    if re.fullmatch(r"-?\d+(\.0*)?", chosen):
        index = int(float(chosen))
        if index < 0:
            raise InputError(f"slice {chosen} is not a slice index (0 for the first slice, 1, 2, ...)")
        return index
    if chosen and path.name.lower().endswith(VOLUME_SUFFIXES):
        raise InputError(f"slice {chosen!r} is not a slice index (0, 1, 2, ...): a volume's slices have no UIDs")
    return None


class _Sources:
    """The slices of each path a labels file names, indexed once (headers only), and their SOPInstanceUIDs. Files
    that tools leave beside slices (``_left_by_tools``) are passed over; any other file that is not a slice makes
    the path unusable, as a slice index could then mean another slice."""

    def __init__(self) -> None:
        self.slices: dict[Path, list[dict]] = {}
        self.problems: dict[Path, str] = {}
        self.uids: dict[Path, dict[str, dict]] = {}

    def of(self, path: Path) -> list[dict]:
        if path not in self.slices and path not in self.problems:
            items, errors = index_inputs([path])
            errors = [error for error in errors if not _left_by_tools(error["path"])]
            series = {item["series"] for item in items}
            if errors:
                first = errors[0]
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                self.problems[path] = f"{first['path']}: {first['reason']}{more}"
            elif len(series) > 1:
                self.problems[path] = f"holds {len(series)} series: name one series folder or file per row"
            else:
                self.slices[path] = items
        if path in self.problems:
            raise InputError(self.problems[path])
        return self.slices[path]

    def by_uid(self, path: Path, uid: str) -> dict:
        if path not in self.uids:  # each file's header read once, however many rows name the path
            headers = {item["image"]: read_dicom_ct(Path(item["image"]), header_only=True) for item in self.of(path)}
            self.uids[path] = {str(headers[item["image"]].get("SOPInstanceUID", "")): item for item in self.of(path)}
        if uid not in self.uids[path]:
            raise InputError(f"no slice with SOPInstanceUID {uid}")
        return self.uids[path][uid]


def scored_ct_items(
    labels: str | Path,
    score_range: Sequence[float] = LDCT_RANGE,
    check_images: bool = True,
    slice_intercept: float | None = None,
) -> list[dict]:
    """``[{"image", "frame", "label", "patient", "sd"}]`` for a scored-CT labels file, checked row by row.

    Columns: ``path`` (a DICOM file or series folder, a NIfTI, NRRD or MetaImage volume or a TIFF/PNG slice; relative
    to the labels file or absolute), ``score`` (within ``score_range``), and optionally ``slice`` (the index along
    the series or volume, as scoring orders it, or a SOPInstanceUID; without it every slice of the path has the score),
    ``patient`` (kept on one side of a split; default: the path) and ``sd`` (the raters' spread). Every problem is
    listed as ``(where, reason)`` in one ``DatasetError``. ``slice_intercept``: TIFF/PNG slices hold CT numbers
    (``scripts.ct_inputs.read_ct_slice``).
    """
    labels = Path(labels).expanduser()
    if not labels.is_file():
        raise DatasetError([(str(labels), "labels file does not exist (set labels)")])
    low, high = (float(value) for value in score_range)
    rows = _label_rows(labels)
    if not rows:
        raise DatasetError([(str(labels), "no rows")])
    sources, problems, items = _Sources(), [], []
    seen: dict[tuple[str, int], str] = {}  # (image, frame): the row that scored it first
    for where, row in rows:
        try:
            name = _text(row.get("path"))
            if not name:
                raise InputError("no path")
            score = _optional_number(row, "score")
            if score is None:
                raise InputError("no score")
            reason = _check_label(score, (low, high))
            if reason:
                raise InputError(reason.replace("label", "score", 1))
            sd = _optional_number(row, "sd")
            if sd is not None and not (math.isfinite(sd) and sd >= 0):
                raise InputError(f"sd {sd} is not a spread (a finite number >= 0)")
            path = (labels.parent / name).resolve()
            if not path.exists():
                raise InputError(f"{path} does not exist")
            chosen = _text(row.get("slice"))
            index = _slice_index(chosen, path)
            if not chosen:
                picked = sources.of(path)
            elif index is not None:
                slices = sources.of(path)
                if index >= len(slices):
                    raise InputError(f"slice {index} is outside the {len(slices)} slices of {name}")
                picked = [slices[index]]
            else:
                picked = [sources.by_uid(path, chosen)]
        except (InputError, ValueError) as error:
            problems.append((where, str(error)))
            continue
        patient = _text(row.get("patient")) or str(path)
        for item in picked:
            key = (item["image"], item["frame"])
            if key in seen:
                problems.append((where, f"{Path(key[0]).name} slice {key[1]} is also scored at {seen[key]}"))
                continue
            seen[key] = where
            image = {"image": item["image"], "frame": int(item["frame"]), "label": float(score), "patient": patient}
            items.append({**image, "sd": math.nan if sd is None else float(sd)})
    if check_images and not problems:
        for item in items:
            try:
                read_ct_slice(item["image"], item["frame"], slice_intercept=slice_intercept)
            except InputError as error:
                problems.append((f"{item['image']} [slice {item['frame']}]", str(error)))
    if problems:
        raise DatasetError(problems)
    return items


def split_items(
    items: list[dict], split: str | float, seed: int, group_key: str | None = None, allow_empty: bool = False
) -> tuple[list, list]:
    """Split into (train, validation).

    ``split="A"`` is LDCTIQA Setting A: a fixed 80/20 split (800/200 of the 1000 training
    slices), the permutation of ``numpy.random.default_rng(48)`` over the file names, whatever
    ``seed`` is. A number is the validation fraction, drawn with ``seed``. ``group_key`` keeps
    groups whole (KADID: all distortions of one reference image on one side). With ``allow_empty`` an
    empty training side is left to the caller's check (``check_validation``).
    """
    if str(split).upper() == "A":
        fraction, seed = SETTING_A_HELD_OUT, SETTING_A_SEED
    else:
        try:
            fraction = float(split)
        except (TypeError, ValueError):
            fraction = math.nan
        if not 0.0 < fraction < 1.0:
            raise OptionError(f"split must be 'A' or a validation fraction in (0, 1), got {split!r}")
    groups = sorted({item[group_key] if group_key else item["image"] for item in items})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = max(1, round(fraction * len(groups)))
    val_groups = {groups[i] for i in order[len(groups) - n_val :]}
    train = [it for it in items if (it[group_key] if group_key else it["image"]) not in val_groups]
    val = [it for it in items if (it[group_key] if group_key else it["image"]) in val_groups]
    if not train and not allow_empty:
        raise OptionError(f"split {split!r} leaves no training data ({len(items)} items)")
    return train, val


def check_validation(dataset_dir: str | Path | None, train: list[dict], val: list[dict], split: str | float) -> None:
    """``DatasetError`` unless training has data and the validation slices can give correlations: at least
    ``MIN_VALIDATION`` of them with labels that are not all the same (else every metric is NaN and the
    best checkpoint would be chosen by chance)."""
    where = str(dataset_dir)
    if not train:
        raise DatasetError([(where, f"split {split!r} leaves no training data ({len(val)} items in all)")])
    if len(val) < MIN_VALIDATION:
        reason = (
            f"{len(val)} validation slice(s) with split {split!r}: PLCC/SROCC/KROCC need at least {MIN_VALIDATION}; "
            "use more data or a larger split"
        )
        raise DatasetError([(where, reason)])
    labels = {item["label"] for item in val}
    if len(labels) == 1:
        reason = f"every validation label is {labels.pop():g}: correlations are undefined; use another split or seed"
        raise DatasetError([(where, reason)])


def _relative(items: list[dict], root: Path) -> list[dict]:
    return [{**it, "image": os.path.relpath(it["image"], root)} for it in items]


def training_datalists(
    dataset_dir: str | Path | None = None,
    layout: str = "ldct",
    split: str | float = 0.1,
    seed: int = 48,
    output_dir: str | Path | None = None,
    check_images: bool = True,
    labels: str | Path | None = None,
    score_range: Sequence[float] = LDCT_RANGE,
    slice_intercept: float | None = None,
) -> dict[str, list[dict]]:
    """Checked ``{"training": [...], "validation": [...]}`` for ``layout`` "ldct", "kadid" or "scored_ct".

    "scored_ct" reads the ``labels`` file (``scored_ct_items``) and keeps each patient on one side. The split
    is also written to ``output_dir/datalist.json`` (paths relative to the dataset folder, or to the labels
    file's folder; MONAI's decathlon form) so it can be reproduced and evaluated later.
    """
    items = labelled_items(dataset_dir, layout, labels, score_range, check_images, slice_intercept)
    dataset_dir = _dataset_root(dataset_dir, layout, labels)
    train, val = checked_split(dataset_dir, layout, items, split, seed)
    if output_dir is not None:
        root = _require_dir(dataset_dir)
        record = {
            "dataset_dir": str(root.resolve()),
            "split": str(split),
            "seed": seed,
            "training": _relative(train, root),
            "validation": _relative(val, root),
        }
        write_json_atomic(Path(output_dir) / "datalist.json", record)
    return {"training": train, "validation": val}


def labelled_items(
    dataset_dir: str | Path | None,
    layout: str,
    labels: str | Path | None = None,
    score_range: Sequence[float] = LDCT_RANGE,
    check_images: bool = True,
    slice_intercept: float | None = None,
) -> list[dict]:
    """Every labelled slice of a dataset in ``layout`` ("ldct", "kadid", or "scored_ct" with its ``labels`` file,
    whose TIFF/PNG slices hold CT numbers with ``slice_intercept``)."""
    if layout == "ldct":
        return ldct_labelled_items(dataset_dir, check_images)
    if layout == "kadid":
        return kadid_labelled_items(dataset_dir, check_images)
    if layout == "scored_ct":
        return scored_ct_items(_labels_file(labels), score_range, check_images, optional_intercept(slice_intercept))
    raise OptionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _dataset_root(dataset_dir: str | Path | None, layout: str, labels: str | Path | None) -> str | Path | None:
    """The folder a dataset's paths are relative to: the labels file's for scored CT, else the dataset folder."""
    return Path(str(labels)).expanduser().parent if layout == "scored_ct" else dataset_dir


def checked_split(
    dataset_dir: str | Path | None, layout: str, items: list[dict], split: str | float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Training and validation slices as training splits them (a KADID scene, a scored-CT patient on one side), with
    the validation side checked (``check_validation``)."""
    group_key = {"kadid": "ref", "scored_ct": "patient"}.get(layout)
    train, val = split_items(items, split, seed, group_key=group_key, allow_empty=True)
    check_validation(dataset_dir, train, val, split)
    return train, val


def _labels_file(labels: str | Path | None) -> Path:
    if not labels:
        raise DatasetError([("labels", "layout scored_ct needs a labels file: --labels FILE (CSV or JSON)")])
    return Path(labels)


def evaluation_items(
    dataset_dir: str | Path | None = None,
    datalist: str | Path | None = None,
    key: str = "validation",
    layout: str = "ldct",
    labels: str | Path | None = None,
    score_range: Sequence[float] = LDCT_RANGE,
) -> list[dict]:
    """The labelled slices to evaluate: all of an LDCTIQA folder or of a scored-CT labels file, or one list of a
    datalist file (written by training; its paths are relative to the folder it names as ``dataset_dir``)."""
    if datalist:
        if not Path(datalist).is_file():
            raise DatasetError([(str(datalist), "datalist file does not exist")])
        recorded = json.loads(Path(datalist).read_text()).get("dataset_dir")
        root = _require_dir(recorded if layout == "scored_ct" and recorded else dataset_dir)
        items = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=key, base_dir=root)
        problems = [
            (it["image"], "listed in the datalist but the image does not exist")
            for it in items
            if not Path(it["image"]).is_file()
        ]
        if problems:
            raise DatasetError(problems)
        return items
    if layout == "scored_ct":
        return scored_ct_items(_labels_file(labels), score_range)
    return ldct_labelled_items(dataset_dir)


def check_dataset(
    dataset_dir: str | None = None,
    layout: str = "ldct",
    labels: str | None = None,
    score_range: Sequence[float] = LDCT_RANGE,
    split: str | float = 0.1,
    seed: int = 48,
    slice_intercept: float | None = None,
) -> dict[str, Any]:
    """Check a dataset the way training will, its split included (``split`` and ``seed`` as training takes them;
    ``slice_intercept`` as the configs' id), and summarise it (``python -m scripts check_data``).

    Raises ``DatasetError`` listing every problem; on success returns the slice count, the label range and the
    validation slices of the split (and, for scored CT, the patient count).
    """
    items = labelled_items(dataset_dir, layout, labels, score_range, slice_intercept=slice_intercept)
    _, val = checked_split(_dataset_root(dataset_dir, layout, labels), layout, items, split, seed)
    labels_seen = [item["label"] for item in items]
    summary = {
        "dataset_dir": str(dataset_dir if layout != "scored_ct" else labels),
        "layout": layout,
        "images": len(items),
        "label_min": min(labels_seen),
        "label_max": max(labels_seen),
        "validation": len(val),
    }
    if layout == "scored_ct":
        summary["patients"] = len({item["patient"] for item in items})
    print(json.dumps(summary, indent=2))
    return summary
