"""TFKT networks: the EfficientNetV2 regressor F, the connector C and the SwinV2 scorer S.

TFKT = S(C(F(x))): F reads the whole CT slice and gives pooled features, C maps them to a
one-channel side x side "feature image", S reads that image and a linear head gives one score
(Rifa et al., SPIE Medical Imaging 2024; the serial connector follows the authors' code). The
score ends in a fitted linear calibration, the identity until training saves a best checkpoint
(``scripts.calibration``).

Every module keeps the constructor arguments that decide its shape in ``self.settings``, so a
checkpoint can rebuild it from the file alone (see ``scripts.checkpoints``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from scripts.calibration import ScoreCalibration
from scripts.checkpoints import (
    NETWORK_SETTING_KEYS,
    CheckpointError,
    load_trained_weights,
    read_checkpoint,
    settings_path,
)
from scripts.options import as_bool, optional_size
from scripts.patches import PatchScorer
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_F_NAME = "tf_efficientnetv2_l"
DEFAULT_S_NAME = "swinv2_base_window8_256"
NETWORK_KINDS = ("tfkt", "f_only")

OFFLINE_HINT = (
    "Pretrained ImageNet weights for '{name}' could not be loaded ({error}). Either run once on a "
    "machine with internet so timm caches them (~/.cache/huggingface), or download the weights "
    "file and pass its local path ({path_id}=/path/to/weights.safetensors), or train without "
    "them (pretrained=false)."
)


def create_timm_model(
    model_name: str,
    pretrained: bool = False,
    weights_path: str | None = None,
    path_id: str = "weights_path",
    **kwargs: Any,
) -> Any:
    """Create a timm model; ImageNet weights come from the hub or from a local file.

    Typed ``Any``: the callers use what timm's models have beyond ``nn.Module`` (``num_features``,
    ``forward_features``, ``forward_head``), which timm does not declare in one type.

    A local ``weights_path`` implies ``pretrained``; timm adapts the stem to ``in_chans`` and the
    position tables to ``img_size`` either way. Download failures name both ways out.
    """
    if weights_path:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"{path_id}: weights file {str(weights_path)!r} does not exist.")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_path)}
        pretrained = True
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if not pretrained:
            raise
        message = OFFLINE_HINT.format(name=model_name, error=f"{type(error).__name__}: {error}", path_id=path_id)
        raise RuntimeError(message) from error


class EfficientNetRegressor(nn.Module):
    """F: a timm EfficientNetV2 backbone with global pooling and a one-output linear head."""

    def __init__(
        self,
        model_name: str = DEFAULT_F_NAME,
        in_channels: int = 1,
        pretrained: bool = False,
        weights_path: str | None = None,
        drop_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model_kwargs = dict(model_kwargs or {})
        self.settings: dict[str, Any] = {"f_name": model_name, "in_channels": in_channels, "f_kwargs": model_kwargs}
        self.timm_args = {"in_chans": in_channels, "num_classes": 0, "drop_rate": drop_rate, **model_kwargs}
        self.backbone = create_timm_model(
            model_name, pretrained=pretrained, weights_path=weights_path, path_id="f_weights", **self.timm_args
        )
        self.num_features: int = self.backbone.num_features
        self.head = nn.Linear(self.num_features, 1)
        self.calibration = ScoreCalibration()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (B, num_features)."""
        x = self.backbone(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        features = self.calibration(self.head(features))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Connector(nn.Module):
    """C: a linear map from F's pooled features to a one-channel side x side feature image."""

    def __init__(self, in_features: int = 1280, side: int = 64) -> None:
        super().__init__()
        self.side = side
        self.linear = nn.Linear(in_features, side * side)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.linear(features)
        return features.view(-1, 1, self.side, self.side)


class SwinScorer(nn.Module):
    """S: a timm SwinV2 built for a one-channel side x side input with a one-output head."""

    def __init__(
        self,
        model_name: str = DEFAULT_S_NAME,
        side: int = 64,
        pretrained: bool = False,
        weights_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.timm_args = {"img_size": side, "in_chans": 1, "num_classes": 1, **dict(model_kwargs or {})}
        self.model = create_timm_model(
            model_name, pretrained=pretrained, weights_path=weights_path, path_id="s_weights", **self.timm_args
        )
        check_position_tables(self.model, model_name, side)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_head(features)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_position_tables(model: nn.Module, model_name: str, side: int) -> None:
    """Refuse a SwinV2 whose continuous position tables are not finite.

    timm before 1.0.31 divides by (window - 1), so a stage whose feature map (and window) shrinks to
    one token, as at side 32, gets NaN tables and scores every input as NaN.
    """
    for name, table in model.named_buffers():
        if table.is_meta:  # built without memory (``network_with_weights``); it has a newer timm
            continue
        if name.endswith("relative_coords_table") and not torch.isfinite(table).all():
            raise ValueError(
                f"{model_name} built for a {side} x {side} input has non-finite position tables ({name}): "
                f"timm {timm.__version__} divides by zero for one-token windows; upgrade timm "
                "(pip install 'timm>=1.0.31') or use a larger side"
            )


class TFKT(nn.Module):
    """S(C(F(x))): scores a (B, in_channels, H, W) slice batch as (B, 1).

    ``freeze_f`` keeps F's weights and batch-norm statistics fixed (the paper's "F frozen"
    ablation). F's own regression head (and its calibration) is kept so a phase-1 checkpoint loads
    exactly, but it is unused here and never trained.
    """

    def __init__(
        self,
        f_name: str = DEFAULT_F_NAME,
        s_name: str = DEFAULT_S_NAME,
        in_channels: int = 1,
        side: int = 64,
        f_pretrained: bool = False,
        s_pretrained: bool = False,
        f_weights: str | None = None,
        s_weights: str | None = None,
        freeze_f: bool = False,
        drop_rate: float = 0.0,
        f_kwargs: dict[str, Any] | None = None,
        s_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.f = EfficientNetRegressor(f_name, in_channels, f_pretrained, f_weights, drop_rate, f_kwargs)
        self.connector = Connector(self.f.num_features, side)
        self.s = SwinScorer(s_name, side, s_pretrained, s_weights, s_kwargs)
        self.calibration = ScoreCalibration()
        self.f.head.requires_grad_(False)
        self.settings = {**self.f.settings, "s_name": s_name, "side": side, "s_kwargs": dict(s_kwargs or {})}
        self.freeze_f = False
        self.set_f_frozen(freeze_f)

    def set_f_frozen(self, frozen: bool) -> None:
        self.freeze_f = frozen
        self.f.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TFKT:
        super().train(mode)
        if self.freeze_f:
            self.f.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.s.forward_features(self.connector(self.f.forward_features(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        features = self.calibration(self.s.forward_head(features))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_network(
    network: str = "tfkt",
    f_name: str = DEFAULT_F_NAME,
    s_name: str = DEFAULT_S_NAME,
    in_channels: int = 1,
    side: int = 64,
    pretrained: bool = False,
    f_weights: str | None = None,
    s_weights: str | None = None,
    f_checkpoint: str | None = None,
    freeze_f: bool = False,
    drop_rate: float = 0.0,
    f_kwargs: dict[str, Any] | None = None,
    s_kwargs: dict[str, Any] | None = None,
    patch_size: int | None = None,
) -> nn.Module:
    """Build one of the paper's networks by name (the configs' ``network_def``: the architecture alone).

    - ``network="tfkt"``: S(C(F)).
    - ``network="f_only"``: the EfficientNetV2 regressor alone (phase 1, and the ablation).

    With ``patch_size`` the network is wrapped in ``scripts.patches.PatchScorer``: it reads crops of
    that size at the slice's own pixel grid and scores a slice as the mean over its crops on the body.
    The starting weights (``pretrained``, ``f_weights``, ``s_weights``, ``f_checkpoint``, ``freeze_f``) go
    through ``initialise_network``; the configs call it as a step of its own (``network``).
    """
    if network not in NETWORK_KINDS:
        raise ValueError(f"network must be one of {NETWORK_KINDS}, got {network!r}.")
    model: nn.Module
    if network == "f_only":
        model = EfficientNetRegressor(f_name, in_channels, False, None, drop_rate, f_kwargs)
    else:
        model = TFKT(f_name, s_name, in_channels, side, drop_rate=drop_rate, f_kwargs=f_kwargs, s_kwargs=s_kwargs)
    model.settings = {"network": network, **model.settings}
    patch_size = optional_size(patch_size, "patch_size")
    if patch_size:
        model = PatchScorer(model, patch_size)
    return initialise_network(model, pretrained, f_weights, s_weights, f_checkpoint, freeze_f)


def network_with_weights(
    build: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> nn.Module:
    """The network ``build()`` makes, holding ``state_dict`` (strictly), on ``device``, without first drawing the
    random weights its constructors would: built on PyTorch's meta device, given uninitialised memory on
    ``device``, its computed buffers (SwinV2's position tables, not in checkpoints) recomputed by timm, then
    loaded: 0.22 s instead of 0.31 s for the small profile on a CPU. A network with a computed buffer timm cannot
    recompute is built the usual way; the numbers are the same either way (tested)."""
    with torch.device("meta"):
        network = build()
    stored = set(network.state_dict())
    modules = dict(network.named_modules())
    computed = {name.rpartition(".")[0] for name, _ in network.named_buffers() if name not in stored}
    if any(not hasattr(modules[owner], "init_non_persistent_buffers") for owner in computed):
        network = build().to(device)
    else:
        network.to_empty(device=device)
        reinit_non_persistent_buffers(network)
    network.load_state_dict(state_dict)
    return network


def load_imagenet(
    module: EfficientNetRegressor | SwinScorer,
    timm_module: nn.Module,
    model_name: str,
    weights_path: str | None,
    path_id: str,
) -> None:
    """Copy ImageNet weights (timm's hub, or the local ``weights_path``) into ``timm_module``, a timm model that
    ``module`` built with its ``timm_args``; timm adapts the stem and position tables to those arguments."""
    donor = create_timm_model(model_name, True, weights_path, path_id, **module.timm_args)
    timm_module.load_state_dict(donor.state_dict())


def initialise_network(
    network: nn.Module,
    pretrained: bool = False,
    f_weights: str | None = None,
    s_weights: str | None = None,
    f_checkpoint: str | None = None,
    freeze_f: bool = False,
    init_checkpoint: str | None = None,
) -> nn.Module:
    """The starting weights of training, put into a network that ``build_network`` made (the configs' ``network``).

    Kept apart from ``network_def`` so that building the architecture never downloads anything (MONAI's
    ``monai.bundle.load`` and ``ckpt_export`` build ``network_def`` offline). F starts from ``f_checkpoint``
    (phase 1) when that file exists, else from ImageNet (``pretrained`` or a local ``f_weights``) or stays
    random; S from ImageNet likewise (``s_weights``). ``freeze_f`` gives the "F frozen" ablation.
    ``init_checkpoint`` (fine-tuning) puts a whole trained model in instead, and nothing else is loaded.
    """
    pretrained, freeze_f = as_bool(pretrained, "pretrained"), as_bool(freeze_f, "freeze_f")
    inner = network.network if isinstance(network, PatchScorer) else network
    if init_checkpoint:
        load_init_checkpoint(network, init_checkpoint)
        logger.info("fine-tuning: every weight from %s", init_checkpoint)
    elif f_checkpoint and Path(f_checkpoint).is_file():
        load_f_weights(regressor_of(inner), f_checkpoint)
        logger.info("F initialised from the phase-1 checkpoint %s", f_checkpoint)
    else:
        if pretrained or f_weights:
            f = regressor_of(inner)
            load_imagenet(f, f.backbone, f.settings["f_name"], f_weights, "f_weights")
        if f_checkpoint and isinstance(inner, TFKT):
            source = "ImageNet" if pretrained or f_weights else "random"
            logger.warning("No phase-1 checkpoint at %s: F starts from %s weights.", f_checkpoint, source)
    if isinstance(inner, TFKT):
        if (pretrained or s_weights) and not init_checkpoint:
            load_imagenet(inner.s, inner.s.model, inner.s.model_name, s_weights, "s_weights")
        inner.set_f_frozen(freeze_f)
    return network


def regressor_of(network: nn.Module) -> EfficientNetRegressor:
    """F: the network itself when it is F alone (phase 1), else a TFKT's F."""
    f = network.f if isinstance(network, TFKT) else network
    if not isinstance(f, EfficientNetRegressor):
        raise TypeError(f"{type(network).__name__} is neither TFKT nor F (EfficientNetRegressor): it has no F to load")
    return f


def load_init_checkpoint(network: nn.Module, path: str) -> None:
    """Fine-tuning: every weight of a trained model (``init_checkpoint``) into ``network``, whose settings (the
    config's network ids) must be the model's (``scripts.checkpoints.load_trained_weights``)."""
    load_trained_weights(network, path, "init_checkpoint")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_f_weights(f: EfficientNetRegressor, path: str) -> None:
    """Copy a phase-1 checkpoint into F (the TFKT handover).

    The checkpoint may hold F alone (phase 1) or a whole TFKT; an RGB phase-1 stem is summed to
    F's channel count with timm's ``adapt_input_conv``, and a grey one is spread over F's channels
    (repeated and divided by their number: a grey slice repeated over them gives what it gave before).
    """
    state, settings = read_checkpoint(path)
    if settings.get("patch_size"):  # a PatchScorer holds the network as ``network``
        state = {k[len("network.") :]: v for k, v in state.items() if k.startswith("network.")}
    if settings.get("network") == "tfkt":
        state = {k[len("f.") :]: v for k, v in state.items() if k.startswith("f.")}
    if settings.get("f_name", f.settings["f_name"]) != f.settings["f_name"]:
        raise ValueError(
            f"{path}: phase-1 checkpoint holds F {settings['f_name']!r}, but this network's F is "
            f"{f.settings['f_name']!r}; set f_name to match or point f_checkpoint elsewhere."
        )
    stem_key = next(k for k, v in f.state_dict().items() if v.ndim == 4)
    channels = f.settings["in_channels"]
    if stem_key in state and state[stem_key].shape[1] == 1 and channels > 1:  # timm returns a grey stem unchanged
        state[stem_key] = state[stem_key].repeat(1, channels, 1, 1) / channels
    elif stem_key in state and state[stem_key].shape[1] != channels:
        state[stem_key] = timm.models.adapt_input_conv(channels, state[stem_key])
    f.load_state_dict(state)


def load_network(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network a checkpoint was trained with, from it and the settings file beside it, in eval mode."""
    state, settings = read_checkpoint(path, map_location)
    if not settings:
        raise CheckpointError(
            f"{path}: no network settings beside it ({settings_path(path).name}): rebuild the network from the "
            "bundle's config ids (network_def) and load the state dict into it"
        )
    arguments = {k: v for k, v in settings.items() if k in NETWORK_SETTING_KEYS}
    return network_with_weights(lambda: build_network(**arguments), state, map_location).eval()
