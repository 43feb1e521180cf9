"""A MONAI Label app that serves the bundle's CT quality score as ``ct_iqa``
(``scripts.integrations.monailabel_task.CTQualityTask``).

    python monailabel_app/main.py start_server --app monailabel_app --studies DIR [--conf bundle_dir BUNDLE] \
        [--conf checkpoint FILE] [--host 127.0.0.1 --port 8000]
    curl -X POST "http://127.0.0.1:8000/infer/ct_iqa?image=IMAGE_ID"

``python monailabel_app/main.py ARGS`` is ``monailabel ARGS`` (MONAI Label's command line) with one fix first:
MONAI Label 0.8.5's server imports pydicom-seg 0.4.1, which imports ``pydicom._storage_sopclass_uids``, a module
pydicom 3 (which this bundle needs) no longer has (Project-MONAI/MONAILabel#1841); the same names are in
``pydicom.uid``. Plain ``monailabel start_server --app monailabel_app ...`` works where that import does
(pydicom < 3 or a fixed pydicom-seg), and stops with ``No module named 'pydicom._storage_sopclass_uids'`` otherwise.

Options (``--conf KEY VALUE``; relative paths are taken from the folder the server was started in):

    bundle_dir      the bundle folder (``configs/inference.json``): default this repository's ``bundle/``;
                    an exported Model Zoo bundle (``python -m scripts export``) works too, with its own ``scripts/``
    checkpoint      the checkpoint scored with: default ``<bundle_dir>/models/model.pt``
    device          default ``cuda:0`` where CUDA is available, else ``cpu``
    batch_size      slices per forward pass, default 16
    num_workers     DataLoader workers reading slices, default 0 (in the server process)
    preload         ``true`` (default): build the network at start, so a bad checkpoint stops the server at once
    series_folders  ``true`` (default): every sub-folder of the studies folder is one image too (a DICOM series or
                    study), its id the folder name; ``false``: MONAI Label's own local datastore, files only

Images in the studies folder: files matching MONAI Label's extensions (``MONAI_LABEL_DATASTORE_FILE_EXT``:
NIfTI, NRRD, PNG, TIFF, ...) plus ``*.dcm`` and ``*.tiff``, their id the name without the extension
(``chest.nii.gz`` -> ``chest``); with ``series_folders``, sub-folders (not ``labels/`` nor hidden ones), scored
as a whole: one score over all their CT slices, per-series results under ``series``. A ``--studies`` URL
(DICOMweb, e.g. Orthanc) is MONAI Label's DICOMweb datastore, image ids being SeriesInstanceUIDs: it fetches the
series into a folder and by default converts it to NIfTI first; with ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false``
the task reads the DICOM folder itself (its checks, slice order and per-file errors).
The response is the task's JSON (``score``, ``min``, ``max``, ``n_slices``, ``slice_scores``, ``series``,
``errors``); no label is written. An id the datastore does not hold is answered 404.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings


def allow_pydicom3() -> None:
    """Let pydicom-seg 0.4.1 (imported by MONAI Label's server and app modules) import under pydicom 3:
    ``pydicom._storage_sopclass_uids`` is ``pydicom.uid`` there. Nothing changes where the module exists."""
    import importlib.util

    import pydicom.uid

    name = "pydicom._storage_sopclass_uids"
    if name not in sys.modules and importlib.util.find_spec(name) is None:
        sys.modules[name] = pydicom.uid


allow_pydicom3()

from monailabel.datastore.local import LocalDatastore  # noqa: E402  (after allow_pydicom3)
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "ct_iqa"
EXTRA_EXTENSIONS = ("*.dcm", "*.tiff")


def _flag(conf: dict[str, str], key: str, default: bool) -> bool:
    value = str(conf.get(key, default)).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"--conf {key} {value}: expected true or false")
    return value in ("true", "1", "yes")


def use_bundle_code(bundle_dir: Path) -> Path:
    """Put the ``scripts`` package the bundle's configs import first on ``sys.path``: the bundle's own
    (an exported bundle holds one) or this repository's. Returns the folder added."""
    root = bundle_dir if (bundle_dir / "scripts" / "monailabel_task.py").is_file() else REPO_ROOT
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("scripts")
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent.parent != root:
        logger.warning("the scripts package was already imported from %s, not %s", loaded.__file__, root)
    return root


class CTStudiesDatastore(LocalDatastore):
    """MONAI Label's local datastore, plus (``series_folders``) each sub-folder of the studies folder as one image.

    MONAI Label's local datastore lists only files matching its extensions in the studies folder itself; a DICOM
    series is a folder of files, so here a folder is an image whose id is its name, and the task scores it whole.
    ``labels/`` (MONAI Label's own) and hidden folders are left out. Folders cannot be downloaded through
    ``/datastore/image`` (MONAI Label serves files only there); they are scored through ``/infer``.
    """

    def __init__(self, *args: Any, series_folders: bool = True, **kwargs: Any) -> None:
        self._series_folders = series_folders  # read while the base class reconciles the folder
        super().__init__(*args, **kwargs)

    def _is_series_folder(self, name: str) -> bool:
        path = os.path.join(self._datastore.image_path(), name)
        if name.startswith(".") or not os.path.isdir(path):
            return False
        return os.path.realpath(path) != os.path.realpath(self._datastore.label_path(None))

    def _list_files(self, path: str, patterns: Any) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        if self._series_folders and os.path.realpath(path) == os.path.realpath(self._datastore.image_path()):
            files.update({name: name for name in sorted(os.listdir(path)) if self._is_series_folder(name)})
        return files

    def _to_id(self, file: str) -> tuple[str, str]:
        if self._series_folders and self._is_series_folder(file):
            return file, ""
        return super()._to_id(file)

    def _remove_non_existing(self) -> int:
        removed = super()._remove_non_existing()
        if not self._series_folders:  # folders listed while series_folders was on
            image_path = self._datastore.image_path()
            objects = self._datastore.objects
            folders = [i for i, obj in objects.items() if os.path.isdir(os.path.join(image_path, i + obj.image.ext))]
            for image_id in folders:
                del objects[image_id]
            removed += len(folders)
        return removed


class CTQualityApp(MONAILabelApp):
    """Serves ``CTQualityTask`` as ``ct_iqa`` on the bundle named by ``--conf bundle_dir`` (default ``bundle/``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        self.bundle_dir = Path(conf.get("bundle_dir") or REPO_ROOT / "bundle").resolve()
        checkpoint = conf.get("checkpoint")
        self.checkpoint = Path(checkpoint).resolve() if checkpoint else self.bundle_dir / "models" / "model.pt"
        for path, what in (
            (self.bundle_dir / "configs" / "inference.json", "bundle config"),
            (self.checkpoint, "checkpoint"),
        ):
            if not path.is_file():
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"no {what} at {path}: pass --conf bundle_dir BUNDLE (a folder with configs/ and models/model.pt)"
                    " or --conf checkpoint FILE",
                )
        self.code_root = use_bundle_code(self.bundle_dir)
        try:
            version = json.loads((self.bundle_dir / "configs" / "metadata.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            version = "unknown"
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CT image quality (TFKT)",
            description="No-reference CT image quality: a score from 0 (bad) to 4 (excellent) per slice and image",
            version=str(version),
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = [*settings.MONAI_LABEL_DATASTORE_FILE_EXT]
        extensions += [ext for ext in EXTRA_EXTENSIONS if ext not in extensions]
        return CTStudiesDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            series_folders=_flag(self.conf, "series_folders", True),
        )

    def init_infers(self) -> dict[str, InferTask]:
        from scripts.integrations.monailabel_task import CTQualityTask

        task = CTQualityTask(
            self.bundle_dir,
            device=self.conf.get("device") or None,
            batch_size=int(self.conf.get("batch_size", 16)),
            num_workers=int(self.conf.get("num_workers", 0)),
            checkpoint=self.checkpoint,
        )
        if _flag(self.conf, "preload", True):
            scorer = task.scorer()
            logger.info("%s: %s scored on %s (bundle %s)", MODEL_NAME, self.checkpoint, scorer.device, self.bundle_dir)
        return {MODEL_NAME: task}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """An image id of the studies folder is looked up there first (MONAI Label would take an existing path
        relative to the server's folder first), after a refresh for images added since; an unknown id is a 404.
        Uploaded files and server paths (absolute) and DICOMweb series go to MONAI Label as they are."""
        store = datastore or self.datastore()
        image = request.get("image")
        if isinstance(image, str) and image and isinstance(store, CTStudiesDatastore):
            uri = store.get_image_uri(image)
            if not uri and not os.path.isabs(image):
                store.refresh()
                uri = store.get_image_uri(image)
            if uri:
                request = {**request, "image": uri}
            elif not os.path.exists(image):
                raise HTTPException(status_code=404, detail=f"no image '{image}' in the datastore {self.studies}")
        return super().infer(request, datastore)


if __name__ == "__main__":  # MONAI Label's command line, after allow_pydicom3 (the server loads this file as `main`)
    from monailabel.main import Main

    Main().run()
