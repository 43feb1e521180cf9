"""Every input accounted for, and the output folder of ``score`` handled safely: links and odd files, the output
folder inside an input, concurrent runs, reruns, names that are not UTF-8, unusable output folders, a full disk."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scripts.checkpoints import config_overrides
from scripts.clinical.score import PARALLEL_PLOTS, Series, score_paths, series_png, write_report
from scripts.ct_inputs import index_inputs
from scripts.ct_io import write_dicom_slice
from scripts.output_dir import locked_output_dir

from tests.conftest import REPO_ROOT


def ct_series(folder: Path, uid: str, n: int = 2, seed: int = 0) -> Path:
    """``n`` CT slices of one series in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for z in range(n):
        write_dicom_slice(folder / f"{z}.dcm", rng.normal(40, 20, (32, 32)), uid, float(z))
    return folder


def run_score(*inputs: Path, out: Path, ckpt: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m scripts score`` as a person runs it; ``file_size_limit`` makes larger writes fail (a full disk)."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-m", "scripts", "score", *map(str, inputs), "--output_dir", str(out)]
    command += ["--ckpt", str(ckpt), "--device", "cpu", "--num_workers", "0"]
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, preexec_fn=limit_writes if file_size_limit else None
    )


def scored_series(folder: Path, name: str, scores: list[float]) -> Series:
    """The slices ``0.dcm``, ``1.dcm``, ... of ``folder`` (``ct_series``) with their scores, as ``write_report``
    takes them."""
    items = [{"image": str(folder / f"{z}.dcm"), "frame": 0} for z in range(len(scores))]
    return Series(name, items, scores, [0.0] * len(scores))


def report_entries(out: Path) -> set[str]:
    return {path.name for path in out.iterdir()}


def test_linked_folders_are_scanned_and_the_same_file_is_read_once(tmp_path: Path) -> None:
    inputs = ct_series(tmp_path / "inputs" / "series_a", "1.1").parent
    (inputs / "linked_b").symlink_to(ct_series(tmp_path / "elsewhere" / "series_b", "2.2"), target_is_directory=True)
    (inputs / "z_again_a").symlink_to(inputs / "series_a", target_is_directory=True)  # the same folder twice
    items, errors = index_inputs([inputs, inputs / "series_a" / "0.dcm"])  # and one of its files named again
    assert errors == []
    assert sorted((Path(item["image"]).relative_to(inputs).as_posix(), item["series"]) for item in items) == [
        ("linked_b/0.dcm", "2.2"),
        ("linked_b/1.dcm", "2.2"),
        ("series_a/0.dcm", "1.1"),
        ("series_a/1.dcm", "1.1"),
    ]


def test_broken_links_loops_special_files_and_missing_paths_are_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = ct_series(tmp_path / "inputs", "3.3", n=1)
    (inputs / "broken").symlink_to(inputs / "nowhere")
    (inputs / "self").symlink_to(inputs / "self")
    (inputs / "sub").mkdir()
    (inputs / "sub" / "up").symlink_to("..", target_is_directory=True)
    os.mkfifo(inputs / "pipe")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(inputs / "sock"))
        items, errors = index_inputs([inputs, tmp_path / "missing.dcm"])
    assert [Path(item["image"]).name for item in items] == ["0.dcm"]
    reasons = {Path(error["path"]).name: error["reason"] for error in errors}
    assert reasons == {
        "broken": "broken link: its target does not exist",
        "self": "symbolic link loop: the link leads back to itself",
        "up": f"symbolic link loop: leads back to {inputs}",
        "pipe": "not a regular file (a FIFO)",
        "sock": "not a regular file (a socket)",
        "missing.dcm": "does not exist",
    }
    logged = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [f"not scored: {error['path']}: {error['reason']}" for error in errors] == logged  # said, not only listed


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder and file")
def test_unreadable_folders_and_files_are_errors(tmp_path: Path) -> None:
    inputs = ct_series(tmp_path / "inputs", "3.3", n=2)
    ct_series(inputs / "locked", "4.4", n=1)
    (inputs / "locked").chmod(0)
    (inputs / "1.dcm").chmod(0)
    try:
        items, errors = index_inputs([inputs])
    finally:
        (inputs / "locked").chmod(0o755)
    assert [Path(item["image"]).name for item in items] == ["0.dcm"]
    assert errors == [
        {"path": str(inputs / "1.dcm"), "reason": "permission denied: the file cannot be read"},
        {"path": str(inputs / "locked"), "reason": "folder: permission denied: cannot be read"},
    ]


def test_the_output_folder_is_never_read_as_input(tiny_checkpoint: Path, tmp_path: Path) -> None:
    for inputs, out in ((tmp_path / "a", tmp_path / "a" / "report"), (tmp_path / "b", tmp_path / "b")):
        ct_series(inputs, "5.5")  # the output folder inside the input folder, and the input folder itself
        for _ in range(2):  # the second run finds the first one's report, plots included
            summary = score_paths([inputs], out, tiny_checkpoint, device="cpu", num_workers=0)
            assert summary["errors"] == [] and list(summary["series"]) == ["5.5"]
            assert summary["series"]["5.5"]["n_slices"] == 2


def test_an_earlier_report_inside_an_input_is_not_read_but_what_lies_beside_it_is(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    inputs = ct_series(tmp_path / "inputs", "5.5")
    score_paths([inputs], inputs / "old", tiny_checkpoint, device="cpu", num_workers=0)  # its plot is an RGBA PNG
    (inputs / "old" / "pairs.csv").write_text("first_source,second_source\n")  # and compare's files beside it
    (inputs / "old" / "compare.json").write_text("{}")
    shutil.copytree(inputs / "old", inputs / "copied", ignore=shutil.ignore_patterns(".lock"))  # a copy, lock left
    ct_series(inputs / "old", "7.7", n=1)  # a slice saved into the report's folder is still an input
    summary = score_paths([inputs], tmp_path / "new", tiny_checkpoint, device="cpu", num_workers=0)
    assert summary["errors"] == []
    assert {name: entry["n_slices"] for name, entry in summary["series"].items()} == {"5.5": 2, "7.7": 1}


def test_ctrl_c_is_one_line_and_leaves_the_earlier_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Ctrl-C once the run holds its output folder: exit 130, one line instead of a traceback, and the report of
    the run before it untouched."""
    inputs = ct_series(tmp_path / "inputs", "8.8", n=80)
    out = tmp_path / "out"
    assert run_score(inputs, out=out, ckpt=tiny_checkpoint).returncode == 0
    before = (out / "summary.json").read_bytes()
    (out / ".lock").unlink()
    command = [sys.executable, "-m", "scripts", "score", str(inputs), "--output_dir", str(out)]
    running = subprocess.Popen(
        [*command, "--ckpt", str(tiny_checkpoint), "--device", "cpu", "--batch_size", "1"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started in the background (``cmd &``) ignores SIGINT, and its children with it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    while not (out / ".lock").exists() and running.poll() is None:  # the run has its folder: inside main
        time.sleep(0.01)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in stderr
    assert (out / "summary.json").read_bytes() == before


def test_a_second_run_into_a_locked_output_folder_stops_at_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    inputs = ct_series(tmp_path / "inputs", "6.6")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        result = run_score(inputs, out=out, ckpt=tiny_checkpoint)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"output folder {out} is in use by another run (pid {os.getpid()}): "
        "wait for it to finish or choose another --output_dir"
    ]
    assert "scored" not in result.stdout and report_entries(out) == {".lock"}


def test_a_rerun_replaces_the_whole_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    inputs = ct_series(tmp_path / "inputs" / "a", "7.1").parent
    ct_series(inputs / "b", "7.2", seed=1)
    out = tmp_path / "out"
    first = score_paths([inputs], out, tiny_checkpoint, device="cpu", num_workers=0)
    assert len(list((out / "series").iterdir())) == 2 == len(first["series"])
    (out / ".report.tmp-999999999").mkdir()  # left by a run that was killed
    (out / ".report.tmp-999999999" / "scores.csv").write_text("stale")
    second = score_paths([inputs / "a"], out, tiny_checkpoint, device="cpu", num_workers=0)
    assert [path.name for path in (out / "series").iterdir()] == [Path(second["series"]["7.1"]["plot"]).name]
    with open(out / "scores.csv", newline="") as stream:
        assert {row["series"] for row in csv.DictReader(stream)} == {"7.1"}
    assert json.loads((out / "summary.json").read_text()) == second
    assert report_entries(out) == {".lock", "scores.csv", "summary.json", "series"}


def test_long_series_names_keep_their_start_and_end_in_the_plot_names(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = "1.2.840.113619.2.55.3.604688119.868.1234567890.123.4567890123"  # one scanner's UIDs share a long root
    for last in ("1", "2"):
        ct_series(tmp_path / "inputs" / last, f"{root}.{last}")
    summary = score_paths([tmp_path / "inputs"], tmp_path / "out", tiny_checkpoint, device="cpu", num_workers=0)
    plots = [Path(summary["series"][f"{root}.{last}"]["plot"]).name for last in ("1", "2")]
    assert plots == [  # 64 characters: the first 28 and the last 29 (the series' own numbers) kept
        "000_1.2.840.113619.2.55.3.604688...8.1234567890.123.4567890123.1.png",
        "001_1.2.840.113619.2.55.3.604688...8.1234567890.123.4567890123.2.png",
    ]


def test_a_slice_gone_before_the_plots_costs_its_thumbnail_not_the_report(tmp_path: Path) -> None:
    """A file deleted (or rewritten) between scoring and the report: its series' plot is drawn without that
    thumbnail, and every score is written."""
    folder = ct_series(tmp_path / "series", "1.1", n=3)
    series = scored_series(folder, "1.1", [1.5, 2.5, 3.5])
    (folder / "2.dcm").unlink()  # the best slice
    with locked_output_dir(tmp_path / "out") as out:  # as score_paths writes it
        summary = write_report(out, [series], [])
    plot = tmp_path / "out" / summary["series"]["1.1"]["plot"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / "out" / "scores.csv", newline="") as stream:
        assert [row["score"] for row in csv.DictReader(stream)] == ["1.5000", "2.5000", "3.5000"]


def test_the_plots_of_many_series_are_drawn_by_processes_as_this_process_draws_them(tmp_path: Path) -> None:
    """An archive's plots drawn by 2 forked processes: the same PNG bytes, in the same order, as drawn here."""
    series = [
        scored_series(ct_series(tmp_path / f"s{n}", f"1.{n}", n=2, seed=n), f"1.{n}", [1.0 + n / 4, 3.0 - n / 4])
        for n in range(PARALLEL_PLOTS + 1)
    ]
    with locked_output_dir(tmp_path / "out") as out:
        summary = write_report(out, series, [], plot_processes=2)
    drawn = [(out / summary["series"][entry.name]["plot"]).read_bytes() for entry in series]
    assert drawn == [series_png(entry) for entry in series]
    assert len(set(drawn)) == len(series)  # each series its own plot


def test_names_that_are_not_utf8_are_scored_and_written(
    tiny_checkpoint: Path, ldct_test_dir: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_dicom_slice(inputs / os.fsdecode(b"scan_\xff.dcm"), np.full((32, 32), 40.0), "8.8", 0.0)
    tiff = sorted((ldct_test_dir / "images").glob("*.tiff"))[0]
    shutil.copyfile(tiff, inputs / os.fsdecode(b"slice_\xe9\xfe.tif"))
    (inputs / os.fsdecode(b"bad_\xff.dcm")).write_bytes(b"\x00" * 50 + b"garbage")
    out = tmp_path / "out"
    summary = score_paths([inputs], out, tiny_checkpoint, device="cpu", num_workers=0)
    assert json.loads((out / "summary.json").read_bytes().decode("utf-8")) == summary  # strict UTF-8, valid JSON
    with open(out / "scores.csv", newline="", encoding="utf-8") as stream:
        sources = sorted(Path(row["source"]).name for row in csv.DictReader(stream))
    assert sources == ["scan_\\xff.dcm", "slice_\\xe9\\xfe.tif"]
    assert [Path(error["path"]).name for error in summary["errors"]] == ["bad_\\xff.dcm"]
    plots = sorted(path.name for path in (out / "series").iterdir())
    assert len(plots) == 2 and all(name.isascii() for name in plots)
    assert sorted(Path(entry["plot"]).name for entry in summary["series"].values()) == plots


def _make_read_only(folder: Path) -> bool:
    """Make ``folder`` unwritable, for root too (immutable); False when that is not possible here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(folder)]).returncode == 0


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o755)


@pytest.mark.parametrize("problem", ["file", "read-only"])
def test_an_unusable_output_folder_is_one_line_before_scoring(
    problem: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    inputs = ct_series(tmp_path / "inputs", "9.9")
    out = tmp_path / "out"
    if problem == "file":
        out.write_text("not a folder")
        expected = f"output folder {out} is a file, not a folder: choose another --output_dir"
    else:
        out.mkdir()
        if not _make_read_only(out):
            pytest.skip("cannot make a folder read-only for root here (no chattr)")
        expected = f"output folder {out} is not writable"
    try:
        result = run_score(inputs, out=out, ckpt=tiny_checkpoint)
    finally:
        if problem != "file":
            _make_writable(out)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-2000:]
    assert "scored" not in result.stdout


@pytest.mark.parametrize("problem", ["name too long", "parent is a file", "broken link"])
def test_output_folder_problems_are_found_before_scoring(problem: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from scripts.output_dir import OutputError

    out = {
        "name too long": tmp_path / ("x" * 300),
        "parent is a file": tmp_path / "file" / "out",
        "broken link": tmp_path / "link",
    }[problem]
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    expected = {
        "name too long": "its name is too long: choose a shorter --output_dir",
        "parent is a file": "part of its path is a file: choose another --output_dir",
        "broken link": "is a link to a missing folder: choose another --output_dir",
    }[problem]
    with pytest.raises(OutputError, match=expected):
        score_paths([tmp_path / "not read"], out, tiny_checkpoint, device="cpu")


def test_a_full_disk_leaves_the_previous_report_and_no_temporary_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    inputs = ct_series(tmp_path / "inputs", "10.10", n=3)
    out = tmp_path / "out"
    score_paths([inputs], out, tiny_checkpoint, device="cpu", num_workers=0)
    before = {name: (out / name).read_bytes() for name in ("scores.csv", "summary.json")}
    (inputs / "2.dcm").unlink()
    result = run_score(inputs, out=out, ckpt=tiny_checkpoint, file_size_limit=4000)  # each plot is larger
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the report could not be written (File too large)" in lines[0], result.stderr[-2000:]
    assert report_entries(out) == {".lock", "scores.csv", "summary.json", "series"}
    assert {name: (out / name).read_bytes() for name in before} == before


def test_the_inference_workflow_writes_odd_names_and_skips_its_own_output(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """``monai.bundle run inference`` with its output folder inside the input folder, twice, and a name that is not
    UTF-8: the second run does not read the first run's outputs, and every file is written."""
    from monai.bundle import ConfigWorkflow

    from tests.conftest import INFERENCE_CONFIG

    inputs = ct_series(tmp_path / "inputs", "4.4")
    write_dicom_slice(inputs / os.fsdecode(b"odd_\xff.dcm"), np.full((32, 32), 40.0), "4.4", 5.0)
    (inputs / os.fsdecode(b"bad_\xfe.dcm")).write_bytes(b"\x00" * 50 + b"garbage")
    out = inputs / "report"
    for _ in range(2):
        workflow = ConfigWorkflow(
            INFERENCE_CONFIG, workflow_type="inference", logging_file=False, **config_overrides(tiny_checkpoint),
            dataset_dir=str(inputs), output_dir=str(out), device="cpu", num_workers=0,
        )  # fmt: skip
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    with open(out / "predictions.csv", newline="", encoding="utf-8") as stream:
        files = sorted(Path(row["file"]).name for row in csv.DictReader(stream))
    assert files == ["0.dcm", "1.dcm", "odd_\\xff.dcm"]
    errors = json.loads((out / "errors.json").read_bytes().decode("utf-8"))
    assert [Path(error["path"]).name for error in errors] == ["bad_\\xfe.dcm"]
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]
