"""The Model Zoo's CI (``ci/verify_bundle.py`` of Project-MONAI/model-zoo, full mode) on an export, on CPU and offline.

Its steps, in its order: the directory and ``large_files.yml``; version and changelog; ``verify_metadata``
against the official schema; ``verify_net_in_out`` and ``ckpt_export`` with the Zoo's arguments
(``network_def`` of ``configs/inference.json``, no ``key_in_ckpt``, scripting as its default); loading the
shipped ``models/model.ts``; and the workflows' required properties for training and inference.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from scripts.checkpoints import save_checkpoint
from scripts.networks import build_network
from scripts.tools.export import export_bundle

from tests.conftest import REPO_ROOT, TINY_NETWORKS

OFFICIAL_SCHEMA = REPO_ROOT.parent / "shared" / "zoo" / "meta_schema_20240725.json"
WEIGHTS_URL = "https://example.org/ct_iqa_tfkt"


@pytest.fixture(scope="module", params=["whole_slice", "crops"])
def zoo_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of a tiny whole-slice model (64 px) or crop model (32-px crops), as the Zoo's ``models/<name>``."""
    root = tmp_path_factory.mktemp(f"zoo_{request.param}")
    crops = request.param == "crops"
    network = build_network(**TINY_NETWORKS, patch_size=32 if crops else None)
    checkpoint = save_checkpoint(root / "trained" / "model.pt", network, None if crops else 64)
    export_bundle(root / "models" / "ct_iqa_tfkt", checkpoint, weights_url=WEIGHTS_URL, torchscript=True)
    return root / "models" / "ct_iqa_tfkt"


def test_directory_and_large_files(zoo_bundle: Path) -> None:
    assert (zoo_bundle / "configs" / "metadata.json").is_file()
    text = (zoo_bundle / "large_files.yml").read_text()
    entries = [line.strip() for line in text.splitlines() if line.strip().startswith(("url:", "hash_val:"))]
    assert f'url: "{WEIGHTS_URL}/model.pt"' in entries
    assert all(entry.split(":", 1)[1].strip() not in ('""', "") for entry in entries)  # every url and hash filled


def test_version_and_changelog(zoo_bundle: Path) -> None:
    metadata = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]


def test_metadata_against_the_official_schema(zoo_bundle: Path) -> None:
    shipped = zoo_bundle / "docs" / "metadata_schema.json"
    if OFFICIAL_SCHEMA.is_file():  # beside the checkout here; CI's clean clone has only the shipped copy
        assert json.loads(shipped.read_text()) == json.loads(OFFICIAL_SCHEMA.read_text())
    verify_metadata(meta_file=str(zoo_bundle / "configs" / "metadata.json"), filepath=str(shipped))


def test_net_in_out_and_ckpt_export_with_the_zoo_arguments(zoo_bundle: Path, tmp_path: Path) -> None:
    """From another working directory, as the Zoo's CI calls them; then the shipped TorchScript loads and agrees."""
    os.chdir(tmp_path)
    sys.path.insert(0, str(zoo_bundle))  # what MONAI does for a bundle's own scripts when it runs one
    try:
        meta, config = str(zoo_bundle / "configs" / "metadata.json"), str(zoo_bundle / "configs" / "inference.json")
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(zoo_bundle))
        verified = zoo_bundle / "models" / "verify_model.ts"
        ckpt_export(
            net_id="network_def", filepath=str(verified), ckpt_file=str(zoo_bundle / "models" / "model.pt"),
            meta_file=meta, config_file=config, bundle_root=str(zoo_bundle),
        )  # fmt: skip
        shipped = torch.jit.load(str(zoo_bundle / "models" / "model.ts"), map_location="cpu").eval()
        exported = torch.jit.load(str(verified), map_location="cpu").eval()
    finally:
        sys.path.remove(str(zoo_bundle))
    batch = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(exported(batch), shipped(batch), rtol=0, atol=1e-4)


@pytest.mark.parametrize(("config", "workflow_type"), [("train.json", "train"), ("inference.json", "infer")])
def test_workflow_properties(
    zoo_bundle: Path, ldct_train_dir: Path, tmp_path: Path, config: str, workflow_type: str
) -> None:
    """The required properties of MONAI's train and infer workflows, run from inside the bundle folder."""
    os.chdir(zoo_bundle)
    training = workflow_type == "train"
    settings = {"dataset_dir": str(ldct_train_dir), "ckpt_dir": str(tmp_path / "ckpt"), "pretrained": False}
    workflow = ConfigWorkflow(
        config_file=f"configs/{config}", meta_file="configs/metadata.json", logging_file="configs/logging.conf",
        workflow_type=workflow_type, output_dir=str(tmp_path / "out"), device=torch.device("cpu"), num_workers=0,
        **(settings if training else {"dataset_dir": str(ldct_train_dir / "image")}),  # inference: models/model.pt
    )  # fmt: skip
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


# The Zoo's code-format check (runtests.sh --codeformat) as it runs: from the Zoo's root, over all of it, with the
# isort, flake8, mypy and pytype sections of its setup.cfg and the black settings of its pyproject.toml.
ZOO_SETUP_CFG = """[flake8]
select = B,C,E,F,N,P,T4,W,B9
max_line_length = 120
ignore = E203,E501,E741,W503,W504,C408,N812,B023
per_file_ignores = __init__.py: F401, __main__.py: F401

[isort]
known_first_party = models
profile = black
line_length = 120

[mypy]
ignore_missing_imports = True
no_implicit_optional = True
warn_redundant_casts = True
warn_unused_ignores = False
warn_return_any = True
strict_equality = True
show_column_numbers = True
show_error_codes = True

[pytype]
keep_going = True
output = .pytype
pythonpath = .
check_attribute_types = True
check_container_types = True
check_parameter_types = True
check_variable_types = True
disable = pyi-error
report_errors = True
precise_return = True
protocols = True
strict_import = False
"""
ZOO_FORMAT_CHECKS = {
    "isort": ["isort", "--check-only", "--diff", "."],
    "black": ["black", "--line-length", "120", "--skip-magic-trailing-comma", "--check", "--diff", "."],
    "flake8": ["flake8", "."],
}


@pytest.mark.parametrize("tool", sorted(ZOO_FORMAT_CHECKS))
def test_exported_scripts_pass_the_zoo_code_format(zoo_bundle: Path, tool: str) -> None:
    """Only the runtime the configs import is shipped, and it passes the Zoo's isort, black and flake8."""
    shipped = sorted(path.relative_to(zoo_bundle).as_posix() for path in (zoo_bundle / "scripts").rglob("*"))
    configs = " ".join(path.read_text() for path in (zoo_bundle / "configs").glob("*.json"))
    imported = {name for name in shipped if f"scripts.{Path(name).stem}." in configs}
    assert imported and imported <= set(shipped)
    assert all("/" not in name[len("scripts/") :] for name in shipped)  # flat: no tools, no subpackages
    assert not {"scripts/__main__.py", "scripts/demo.py", "scripts/bench.py"} & set(shipped)
    result = run_from_the_zoo_root(zoo_bundle, ZOO_FORMAT_CHECKS[tool])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


ZOO_TYPE_CHECKS = {
    "mypy": ["mypy", "."],  # with MYPYPATH set to the Zoo's root, as runtests.sh --mypy
    "pytype": ["pytype", "models", "-j", "2", f"--python-version={sys.version_info.major}.{sys.version_info.minor}"],
}


@pytest.mark.parametrize("zoo_bundle", ["whole_slice"], indirect=True)  # the same scripts are shipped either way
@pytest.mark.parametrize("tool", sorted(ZOO_TYPE_CHECKS))
def test_exported_scripts_pass_the_zoo_type_checks(zoo_bundle: Path, tool: str) -> None:
    """The Zoo's static type checks (runtests.sh --mypy and --pytype) from its root, with its setup.cfg."""
    if tool == "pytype":
        pytest.importorskip("pytype", reason="pytype supports Python 3.8 to 3.12 only")
    result = run_from_the_zoo_root(zoo_bundle, ZOO_TYPE_CHECKS[tool])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def run_from_the_zoo_root(zoo_bundle: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m <command>`` from the Zoo's root, with its setup.cfg and ``MYPYPATH`` as runtests.sh sets them;
    the type checkers' caches are removed after, as ``runtests.sh --clean`` does (black would read pytype's .pyi)."""
    zoo_root = zoo_bundle.parent.parent
    (zoo_root / "setup.cfg").write_text(ZOO_SETUP_CFG)
    environment = {**os.environ, "MYPYPATH": str(zoo_root)}
    try:
        return subprocess.run(
            [sys.executable, "-m", *command], cwd=zoo_root, capture_output=True, text=True, env=environment
        )
    finally:
        for cache in (".pytype", ".mypy_cache"):
            shutil.rmtree(zoo_root / cache, ignore_errors=True)


def test_the_whole_package_passes_mypy_with_the_zoo_settings(tmp_path: Path) -> None:
    """Not only the shipped scripts: every module of ``scripts`` type-checks with the Zoo's mypy settings (the
    project's ``[tool.mypy]``), so a tool module that later ships does not bring errors with it."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "scripts", "--cache-dir", str(tmp_path / "mypy_cache")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Success: no issues found" in result.stdout


def test_the_project_mypy_settings_are_the_zoos() -> None:
    """``[tool.mypy]`` of pyproject.toml, which ``mypy scripts`` reads, says what the Zoo's setup.cfg says."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    zoo = configparser.ConfigParser()
    zoo.read_string(ZOO_SETUP_CFG)
    ours = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    ours.pop("overrides")
    assert {key: str(value) for key, value in ours.items()} == dict(zoo["mypy"])
