"""MONAI Deploy and MONAI Label: the bundle's scorer inside other MONAI tools."""
