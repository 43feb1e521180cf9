"""Native-resolution crops: where a slice's quality is read.

CT quantum noise lives at the scanner's own pixel grid: shrinking a 512-px slice to 128 px
averages most of it away (a quarter-dose/full-dose noise ratio of 2.0 becomes 1.2), so a model
that looks at shrunken slices cannot see dose. A profile with ``patch_size`` therefore trains on
random crops taken at the image's own pixel grid, placed on the body rather than in air
(``RandBodyCropd``), and scores a whole slice as the mean over a fixed grid of crops that cover
the body (``PatchScorer``); the spread over those crops is reported beside the score.

The body is every pixel above ``BODY_THRESHOLD`` in the network's input scale (the LDCTIQA
window [-1000, 400] HU maps -300 HU to 0.5: air and lung lie below, fat and soft tissue above);
a crop is "on the body" when at least ``MIN_BODY_FRACTION`` of its pixels are. A slice with no
such crop (a thin limb, a phantom) uses its crops with the largest body fraction.

``PatchScorer`` lives inside the network, so training's validation, evaluation, inference,
``score``, the exported TorchScript and the deployment wrappers all score the same way, and the
checkpoint records ``patch_size`` (one place for the setting).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor, pad_list_data_collate
from monai.inferers import Inferer
from monai.transforms import MapTransform, Randomizable
from scripts.engines import autocast
from scripts.options import optional_size
from torch import nn

BODY_THRESHOLD = 0.5
MIN_BODY_FRACTION = 0.5
TILES_PER_CALL = 256  # the network sees at most this many tiles at once: memory stays bounded for large slices


def pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (..., H, W) with zeros (air) to at least ``size`` each way, centred."""
    pad_h, pad_w = max(size - image.shape[-2], 0), max(size - image.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return image
    return F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def body_fraction(image: torch.Tensor, patch_size: int, threshold: float = BODY_THRESHOLD) -> torch.Tensor:
    """Fraction of body pixels (first channel above ``threshold``) in the ``patch_size`` window at every
    top-left corner of a (C, H, W) slice: (H - p + 1, W - p + 1), from an integral image (cheap at 512 px)."""
    mask = (image[0] > threshold).int()
    integral = F.pad(mask.cumsum(0).cumsum(1), (1, 0, 1, 0))  # exact: integer sums
    p = patch_size
    sums = integral[p:, p:] - integral[:-p, p:] - integral[p:, :-p] + integral[:-p, :-p]
    return sums.float() / (p * p)


def on_body(fraction: torch.Tensor, min_fraction: float = MIN_BODY_FRACTION) -> torch.Tensor:
    """Which windows (B, n) count as on the body: at least ``min_fraction`` body, or the slice's best ones."""
    best = fraction.amax(dim=1, keepdim=True)
    return fraction >= torch.clamp(best, max=min_fraction)


class RandBodyCropd(Randomizable, MapTransform):
    """``num_samples`` random ``patch_size`` crops of each slice, centred on the body, at the slice's pixel grid.

    Crop positions are drawn uniformly among the pixel positions whose window is on the body (see
    the module docstring). Other keys (the label) are copied to every crop. With ``patch_size`` None
    the slice passes through whole (the paper's profile), so one config serves both.
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | None,
        num_samples: int = 4,
        min_fraction: float = MIN_BODY_FRACTION,
        threshold: float = BODY_THRESHOLD,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.patch_size = optional_size(patch_size, "patch_size")
        if self.patch_size is not None and self.patch_size < 8:
            raise ValueError(f"patch_size must be at least 8 pixels (or None for whole slices), got {patch_size}")
        if int(num_samples) < 1:
            raise ValueError(f"patches_per_slice must be at least 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.min_fraction = min_fraction
        self.threshold = threshold

    def randomize(self, data: Any = None) -> None:
        pass

    def _corners(self, image: torch.Tensor, size: int) -> list[tuple[int, int]]:
        fraction = body_fraction(image.float(), size, self.threshold)
        columns = fraction.shape[1]
        allowed = on_body(fraction.reshape(1, -1), self.min_fraction)[0].nonzero().flatten()
        picks = torch.as_tensor(self.R.randint(len(allowed), size=self.num_samples), device=allowed.device)
        chosen = allowed[picks].tolist()
        return [(index // columns, index % columns) for index in chosen]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        d = dict(data)
        size = self.patch_size
        if size is None:
            return d
        keys = list(self.key_iterator(d))
        for key in keys:
            d[key] = pad_to(d[key], size)
        first = d[keys[0]]
        corners = self._corners(first.as_tensor() if isinstance(first, MetaTensor) else torch.as_tensor(first), size)
        crops = []
        for top, left in corners:
            crop = dict(d)
            for key in keys:
                crop[key] = d[key][..., top : top + size, left : left + size]
            crops.append(crop)
        return crops


class PatchScorer(nn.Module):
    """Scores whole slices (B, C, H, W) as the mean of ``network`` over a fixed grid of crops on the body.

    The grid covers the slice with ``patch_size`` tiles from its top-left corner (the last row and
    column padded with air); tiles on the body (see the module docstring) are scored, the others
    skipped. A tile-sized input is one crop, so training on crops and scoring
    slices use the same module. ``score_with_spread`` also returns the standard deviation over the
    crops. Scriptable for TorchScript at any input size (``__prepare_scriptable__`` traces the inner
    network at the tile size).
    """

    def __init__(
        self,
        network: nn.Module,
        patch_size: int,
        min_fraction: float = MIN_BODY_FRACTION,
        threshold: float = BODY_THRESHOLD,
    ) -> None:
        super().__init__()
        self.network = network
        self.patch_size = int(patch_size)
        self.min_fraction = float(min_fraction)
        self.threshold = float(threshold)
        self.chunk = TILES_PER_CALL
        self.settings: dict[str, Any] = {**getattr(network, "settings", {}), "patch_size": self.patch_size}

    def tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid's tiles (B, n, C, p, p) and which of them are on the body (B, n).

        The grid starts at the top-left corner; the bottom and right edges are padded with air to
        whole tiles. Air added at the end (``pad_collate`` batching slices of different sizes) only
        adds air tiles, so a slice scores the same in any batch.
        """
        p = self.patch_size
        height, width = x.shape[-2], x.shape[-1]
        x = F.pad(x, (0, (p - width % p) % p, 0, (p - height % p) % p))
        batch, channels, height, width = x.shape
        rows, cols = height // p, width // p
        patches = (
            x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, channels, p, p)
        )
        fraction = (patches[:, :, 0] > self.threshold).float().mean(dim=(-1, -2))
        return patches, on_body(fraction, self.min_fraction)

    def _tile_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The body tiles' scores (K,), the slice each belongs to (K,) and each slice's mean score (B,)."""
        patches, keep = self.tiles(x)
        batch = patches.shape[0]
        owner = torch.arange(batch, device=x.device).unsqueeze(1).expand_as(keep)[keep]
        body = patches[keep]
        parts = [self.network(body[start : start + self.chunk]) for start in range(0, body.shape[0], self.chunk)]
        scores = torch.cat(parts).reshape(-1).float()  # float32 means under autocast too
        counts = keep.sum(dim=1).to(scores.dtype)
        mean = torch.zeros(batch, dtype=scores.dtype, device=x.device).index_add(0, owner, scores) / counts
        return scores, owner, mean

    def score_with_spread(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2): the mean score over the slice's crops on the body, and their standard deviation."""
        scores, owner, mean = self._tile_scores(x)
        squares = torch.zeros_like(mean).index_add(0, owner, (scores - mean[owner]) ** 2)
        counts = torch.zeros_like(mean).index_add(0, owner, torch.ones_like(scores))
        return torch.stack([mean, torch.sqrt(squares / counts)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1): the mean score over the slice's crops on the body (no spread: its square root has no
        gradient at zero, which a single crop would hit in training)."""
        return self._tile_scores(x)[2].unsqueeze(1)

    def __prepare_scriptable__(self) -> PatchScorer:
        """A copy for ``torch.jit.script`` whose inner network is traced at the tile size (timm models
        trace, they do not script); the tiling stays scripted, so any slice size works."""
        parameter = next(self.network.parameters())
        example = torch.zeros(2, self.settings.get("in_channels", 1), self.patch_size, self.patch_size)
        with torch.no_grad():
            traced = torch.jit.trace(self.network.eval(), example.to(parameter.device, parameter.dtype))
        return self.around(traced)

    def around(self, network: nn.Module) -> PatchScorer:
        """A PatchScorer with this one's tiling around ``network`` (this one's network traced or compiled)."""
        return PatchScorer(network, self.patch_size, self.min_fraction, self.threshold)


def pad_collate(batch: Sequence[Any]) -> Any:
    """Collate slices of different sizes (no resizing with crops; slices as read; placeholders of unreadable inputs)
    by padding each with air at its bottom and right to the largest in the batch (MONAI's
    ``pad_list_data_collate``); ``PatchScorer`` scores a padded slice exactly as the slice alone. Each slice's own
    (H, W) is kept as ``spatial_shape``, for ``scripts.transforms.BatchPreprocess``. A batch mixing int16 HU
    (``LoadCTSliced(compact_hu=True)``) with float32 slices is collated as float32."""
    sized = [{**item, "spatial_shape": torch.tensor(item["image"].shape[-2:])} for item in batch]
    if len({item["image"].dtype for item in sized}) > 1:  # int16 HU beside float32 slices: all as float32
        sized = [{**item, "image": item["image"].float()} for item in sized]
    return pad_list_data_collate(sized, method="end", mode="constant")


class SpreadInferer(Inferer):
    """(B, 2) predictions: the score and its spread over the crops (0 for networks that read whole slices).

    Evaluation and inference use it so that ``predictions.csv`` can report ``score_sd``; metrics and
    writers read column 0 as the score. ``dtype`` runs the network under autocast (the config's ``amp``);
    the predictions come back as float32. A compiled network that reads whole slices (``torch.compile``'s module) is
    handed batches of ``batch_size`` only, the last one padded with blank images whose predictions are dropped: a
    smaller batch would compile it a second time, which takes as long as the first (a minute or two for the paper
    network).
    """

    def __init__(self, dtype: torch.dtype | None = None, batch_size: int = 0) -> None:
        self.dtype = dtype
        self.batch_size = batch_size

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if isinstance(inputs, MetaTensor):
            inputs = inputs.as_tensor()
        scorer = getattr(network, "module", network)  # DistributedDataParallel
        scorer = getattr(scorer, "_orig_mod", scorer)  # torch.compile's module (the engines' compile)
        with autocast(inputs.device, self.dtype):
            if isinstance(scorer, PatchScorer):  # crops: how many there are varies from batch to batch anyway
                return scorer.score_with_spread(inputs).float()
            count = len(inputs)
            if getattr(network, "_orig_mod", None) is not None:  # torch.compile's module
                inputs = padded_batch(inputs, self.batch_size)
            scores = network(inputs, *args, **kwargs)[:count].reshape(count, 1).float()
        return torch.cat([scores, torch.zeros_like(scores)], dim=1)


def padded_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` with blank (zero) images appended up to ``size`` images, in their memory format."""
    if len(images) >= size:
        return images
    blank = images.new_zeros((size - len(images), *images.shape[1:]))
    channels_last = images.ndim == 4 and images.is_contiguous(memory_format=torch.channels_last)
    return torch.cat([images, blank]).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
