"""Scoring clinical scans (DICOM, NIfTI, TIFF/PNG) with a trained bundle, and the reports it writes."""
