"""The TFKT networks: shapes, sizes, ablations, the phase-1 handover and checkpoints."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from scripts.checkpoints import read_checkpoint, save_checkpoint
from scripts.networks import (
    TFKT,
    EfficientNetRegressor,
    build_network,
    count_parameters,
    load_network,
    network_with_weights,
)

from tests.conftest import TINY_NETWORKS


def tiny(**kwargs) -> torch.nn.Module:
    return build_network(**{**TINY_NETWORKS, **kwargs})


def test_default_tfkt_has_209m_parameters_and_scores_a_batch() -> None:
    model = build_network().eval()  # tf_efficientnetv2_l + swinv2_base_window8_256, random weights
    assert count_parameters(model) == pytest.approx(209e6, abs=1e6)
    assert model.connector.linear.in_features == 1280 and model.connector.linear.out_features == 64 * 64
    with torch.inference_mode():
        scores = model(torch.rand(2, 1, 96, 96))
    assert scores.shape == (2, 1)


def test_tiny_tfkt_forward_features_and_head() -> None:
    model = tiny().eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        features = model.forward_features(x)
        assert torch.allclose(model.forward_head(features), model(x))
        assert model.connector(model.f.forward_features(x)).shape == (3, 1, 32, 32)
    assert model(x).shape == (3, 1)


def test_f_only_ablation_is_the_efficientnet_regressor() -> None:
    model = build_network(network="f_only", f_name="test_efficientnet", in_channels=3)
    assert isinstance(model, EfficientNetRegressor)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1)
    assert model.settings == {"network": "f_only", "f_name": "test_efficientnet", "in_channels": 3, "f_kwargs": {}}
    with pytest.raises(ValueError, match=r"network must be one of \('tfkt', 'f_only'\)"):
        build_network(network="resnet")


def test_frozen_f_ablation_trains_only_c_and_s() -> None:
    model = tiny(freeze_f=True)
    model.train()
    assert not any(p.requires_grad for p in model.f.parameters())
    assert all(p.requires_grad for p in model.s.parameters()) and model.connector.linear.weight.requires_grad
    assert not model.f.training and model.s.training  # frozen F keeps its batch-norm statistics
    before = {k: v.clone() for k, v in model.f.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.nn.functional.mse_loss(model(torch.rand(4, 1, 64, 64)), torch.full((4, 1), 2.0)).backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.f.state_dict().items())


def test_no_phase1_ablation_warns_and_starts_from_random(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny(f_checkpoint=str(tmp_path / "pretrain.pt"))
    assert isinstance(model, TFKT)
    assert "No phase-1 checkpoint" in caplog.text and "random weights" in caplog.text


def test_rgb_phase1_checkpoint_feeds_a_grey_tfkt(tmp_path: Path) -> None:
    phase1 = build_network(network="f_only", f_name="test_efficientnet", in_channels=3)
    checkpoint = save_checkpoint(tmp_path / "pretrain.pt", phase1, image_size=64)
    model = tiny(f_checkpoint=str(checkpoint))
    stem = next(k for k, v in phase1.state_dict().items() if v.ndim == 4)
    assert torch.allclose(model.f.state_dict()[stem], phase1.state_dict()[stem].sum(dim=1, keepdim=True))
    mismatched = build_network(network="f_only", f_name="test_efficientnet")
    mismatched.settings["f_name"] = "tf_efficientnetv2_s"
    save_checkpoint(tmp_path / "other.pt", mismatched, 64)
    with pytest.raises(ValueError, match=r"other.pt: phase-1 checkpoint holds F 'tf_efficientnetv2_s'"):
        tiny(f_checkpoint=str(tmp_path / "other.pt"))


def test_grey_phase1_checkpoint_feeds_a_multi_window_tfkt(tmp_path: Path) -> None:
    """A grey F (phase 1 on LDCTIQA-style slices) into a three-window TFKT (``multi_window.json``): a grey slice
    repeated over the three channels gives the grey F's output."""
    phase1 = build_network(network="f_only", f_name="test_efficientnet", in_channels=1).eval()
    checkpoint = save_checkpoint(tmp_path / "pretrain.pt", phase1, image_size=64)
    model = tiny(f_checkpoint=str(checkpoint), in_channels=3).eval()
    grey = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model.f(grey.repeat(1, 3, 1, 1)), phase1(grey), atol=1e-5)


def test_checkpoint_rebuilds_its_network(tmp_path: Path) -> None:
    model = tiny().eval()
    path = save_checkpoint(tmp_path / "model.pt", model, image_size=64)
    rebuilt = load_network(str(path))
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), model(x))
    assert read_checkpoint(path)[1]["image_size"] == 64


def test_bad_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing.pt' does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pt: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign.pt: not a state dict of tensors; it was not written by this bundle"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_local_imagenet_weights_file_is_used(tmp_path: Path) -> None:
    source = timm.create_model("test_efficientnet", num_classes=0)
    weights = tmp_path / "test_efficientnet.pth"
    torch.save(source.state_dict(), weights)
    f = EfficientNetRegressor("test_efficientnet", in_channels=1, weights_path=str(weights))
    stem = next(k for k, v in source.state_dict().items() if v.ndim == 4)
    assert torch.allclose(f.backbone.state_dict()[stem], source.state_dict()[stem].sum(dim=1, keepdim=True))
    with pytest.raises(FileNotFoundError, match=r"f_weights: weights file '.*absent.pth' does not exist"):
        EfficientNetRegressor("test_efficientnet", weights_path=str(tmp_path / "absent.pth"))


def test_offline_pretrained_request_says_how_to_provide_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError,
        match=r"Pretrained ImageNet weights for 'test_efficientnet' could not be loaded"
        r".*machine with internet.*f_weights=/path/to/weights.safetensors.*pretrained=false",
    ):
        build_network(network="f_only", f_name="test_efficientnet", pretrained=True)


def test_swinv2_with_non_finite_position_tables_is_refused() -> None:
    """timm < 1.0.31 builds NaN position tables for one-token windows (side 32): refused with the fix."""
    from scripts.networks import SwinScorer, check_position_tables

    scorer = SwinScorer("swinv2_tiny_window8_256", side=32, model_kwargs=TINY_NETWORKS["s_kwargs"])
    check_position_tables(scorer.model, "swinv2_tiny_window8_256", 32)  # this timm: finite
    table = next(b for n, b in scorer.model.named_buffers() if n.endswith("relative_coords_table"))
    table[0, 0, 0, 0] = float("nan")  # what an older timm computes
    with pytest.raises(ValueError, match="upgrade timm"):
        check_position_tables(scorer.model, "swinv2_tiny_window8_256", 32)


class WithComputedBuffer(torch.nn.Module):
    """A module whose non-persistent buffer timm cannot recompute: must be built the usual way."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.register_buffer("offset", torch.full((1,), 3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


@pytest.mark.parametrize("settings", [{}, {"network": "f_only"}, {"patch_size": 48}], ids=["tfkt", "f_only", "crops"])
def test_a_network_with_weights_skips_random_init_and_scores_the_same(settings: dict) -> None:
    """Built on the meta device, its SwinV2 position tables recomputed by timm: outputs and buffers to the bit."""
    reference = tiny(**settings).eval()
    state = reference.state_dict()
    network = network_with_weights(lambda: tiny(**settings), state).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(network(images), reference(images))
    buffers = dict(reference.named_buffers())
    assert {name: buffer.device.type for name, buffer in network.named_buffers()} == dict.fromkeys(buffers, "cpu")
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in network.named_buffers())
    odd = WithComputedBuffer()
    rebuilt = network_with_weights(WithComputedBuffer, odd.state_dict())
    assert torch.equal(rebuilt(torch.ones(1, 4)), odd(torch.ones(1, 4)))
    with pytest.raises(RuntimeError, match="Missing key"):
        network_with_weights(lambda: tiny(**settings), {})
