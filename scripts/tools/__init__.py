"""The repository's tools around the bundle: demo, benchmark, real-data check, baseline, Model Zoo and ONNX export.

None of them is imported by the configs, so none is shipped in an exported bundle."""
