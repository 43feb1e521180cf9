"""Batch preparation shared by the bundle's trainers and evaluators."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import PrepareBatch


class PlainTensorBatch(PrepareBatch):
    """``(image, label)`` of a dictionary batch as plain tensors on ``device``.

    The data pipeline keeps ``MetaTensor`` images so handlers can name each file (they read
    ``engine.state.batch``), but the network gains nothing from metadata and every operation on
    a ``MetaTensor`` pays for tracking it; stripping it here makes the workflows run as fast as a
    bare PyTorch loop.
    """

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = batchdata["image"]
        if isinstance(image, MetaTensor):
            image = image.as_tensor()
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get("label")
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            label = None
        return image, label
