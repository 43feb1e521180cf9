"""A MONAI Deploy application that scores the CT series of a DICOM study with the bundle.

Needs ``pip install monai-deploy-app-sdk highdicom`` (not dependencies of the bundle; without
highdicom, ``import monai`` itself fails once the SDK is installed). Three operators::

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (CT only) -> CTQualityOperator

``CTQualityOperator`` scores every slice of each selected series with the bundle's inference
config (network, preprocessing, window; ``models/model.pt``), writes ``ct_quality.json`` (per
series: slices, mean/min/max, worst slices; ``errors``) to the output folder, and emits the
same report. Run it on a folder of DICOM files::

    python -m scripts.integrations.deploy --input DICOM_DIR --output OUT [--bundle bundle]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator
from scripts import bundle_root
from scripts.clinical.score import SliceScorer, score_inputs, series_summary
from scripts.output_dir import write_json_atomic

CT_RULES = json.dumps({"selections": [{"name": "CT series", "conditions": {"Modality": "(?i)CT"}}]})
REPORT_NAME = "ct_quality.json"


class CTQualityOperator(Operator):
    """Scores the selected CT series slice by slice with a bundle; writes and emits the quality report.

    Input ``study_selected_series_list`` (from ``DICOMSeriesSelectorOperator``); output
    ``quality_report`` (a dict, optional receiver).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        bundle_dir: str | Path,
        output_folder: str | Path,
        device: str | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.output_folder = Path(output_folder)
        self.device = device
        self.num_workers = num_workers
        self._scorer: SliceScorer | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("quality_report").condition(ConditionType.NONE)

    def scorer(self) -> SliceScorer:
        """The bundle's network and preprocessing, loaded on first use and kept."""
        if self._scorer is None:
            self._scorer = SliceScorer.from_bundle(self.bundle_dir, self.device, num_workers=self.num_workers)
        return self._scorer

    def score_selection(self, study_selected_series: list) -> dict[str, Any]:
        """The report for the series a ``DICOMSeriesSelectorOperator`` selected (their files, scored)."""
        paths = [
            instance.get_native_sop_instance().filename
            for study in study_selected_series or []
            for selected in study.selected_series
            for instance in selected.series.get_sop_instances()
        ]
        series, errors = score_inputs(paths, self.scorer()) if paths else ([], [])
        return {"series": {entry.name: series_summary(entry) for entry in series}, "errors": errors}

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        report = self.score_selection(op_input.receive("study_selected_series_list"))
        write_json_atomic(self.output_folder / REPORT_NAME, report)
        op_output.emit(report, "quality_report")


class CTQualityApp(Application):
    """DICOM folder in, ``ct_quality.json`` out: load the study, select CT series, score them."""

    def __init__(
        self, input_folder: str | Path, output_folder: str | Path, bundle_dir: str | Path | None = None, **kwargs: Any
    ) -> None:
        self.input_folder = Path(input_folder)
        self.output_folder = Path(output_folder)
        self.bundle_dir = Path(bundle_dir) if bundle_dir else bundle_root()
        super().__init__(**kwargs)

    def compose(self) -> None:
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=self.input_folder, name="loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_RULES, all_matched=True, name="ct_series")
        quality = CTQualityOperator(self, bundle_dir=self.bundle_dir, output_folder=self.output_folder, name="quality")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, quality, {("study_selected_series_list", "study_selected_series_list")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder of DICOM files")
    parser.add_argument("--output", required=True, help="folder for ct_quality.json")
    parser.add_argument("--bundle", default=None, help="bundle folder (configs/, models/model.pt)")
    arguments = parser.parse_args()
    CTQualityApp(arguments.input, arguments.output, arguments.bundle).run()
    print(Path(arguments.output) / REPORT_NAME)


if __name__ == "__main__":
    main()
