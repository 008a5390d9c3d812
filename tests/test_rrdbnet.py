"""RRDBNet matches BasicSR's reference (keys, shapes, outputs) so official checkpoints load unchanged."""

from __future__ import annotations

import pytest
import torch

from restore.models.basicsr_weights import load_basicsr_state_dict
from restore.models.rrdbnet import RRDBNet

rrdbnet_arch = pytest.importorskip(
    "basicsr.archs.rrdbnet_arch", reason="basicsr-fixed (dev extra) not installed"
)

SMALL = {"num_feat": 8, "num_block": 2, "num_grow_ch": 4}


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_x4plus_keys_and_shapes_match_basicsr() -> None:
    """The full RealESRGAN_x4plus configuration: 702 tensors, 16.7M parameters, same names and shapes."""
    ours = RRDBNet()  # defaults = official x4plus sizes
    ref = rrdbnet_arch.RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32)
    assert _shapes(ours) == _shapes(ref)
    assert len(ours.state_dict()) == 702
    assert sum(p.numel() for p in ours.parameters()) == 16_697_987
    assert "body.22.rdb3.conv5.weight" in ours.state_dict()


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_outputs_identical_to_basicsr_after_loading_its_weights(scale: int) -> None:
    torch.manual_seed(0)
    ref = rrdbnet_arch.RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **SMALL).eval()
    ours = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **SMALL).eval()
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 12)
    with torch.no_grad():
        expected, actual = ref(x), ours(x)
    assert actual.shape == (2, 3, 16 * scale, 12 * scale)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_basicsr_checkpoint_params_ema_loads(tmp_path) -> None:
    """A file laid out like the official releases ({"params_ema": ..., "params": ...}) loads strictly."""
    torch.manual_seed(1)
    src = RRDBNet(**SMALL)
    other = RRDBNet(**SMALL)
    path = tmp_path / "net_g.pth"
    torch.save({"params_ema": src.state_dict(), "params": other.state_dict()}, path)

    net = RRDBNet(**SMALL)
    net.load_state_dict(load_basicsr_state_dict(path), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), src.state_dict().values()))
    net.load_state_dict(load_basicsr_state_dict(path, "params"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def test_weight_loading_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_basicsr_state_dict(tmp_path / "missing.pth")
    bare = tmp_path / "bare.pth"
    torch.save(RRDBNet(**SMALL).state_dict(), bare)
    assert "conv_first.weight" in load_basicsr_state_dict(bare)  # bare state dict: used as is
    both = tmp_path / "both.pth"
    torch.save({"params_ema": {}, "params": {}}, both)
    with pytest.raises(KeyError, match="no 'nope' entry"):
        load_basicsr_state_dict(both, "nope")


def test_unsupported_scale_is_rejected() -> None:
    with pytest.raises(ValueError, match="scale 1, 2 or 4"):
        RRDBNet(scale=3)
