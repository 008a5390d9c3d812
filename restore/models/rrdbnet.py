"""RRDBNet, the ESRGAN / Real-ESRGAN generator, with BasicSR's exact parameter names.

Why our own copy rather than a library:
- ``basicsr`` (the reference, ``basicsr/archs/rrdbnet_arch.py``) drags in torchvision-era imports and
  registries; it is only a test dependency here (``tests/test_rrdbnet.py`` checks we match it bit for bit).
- ``spandrel`` 0.4.2 (``spandrel/architectures/ESRGAN``) implements the *old* ESRGAN layout
  (``model.0.weight``, ``model.1.sub.0.RDB1.conv1.0.weight``) and converts new-style checkpoints on load,
  and it hard-codes the growth channels to 32. Official BasicSR checkpoints (``params_ema``) would load
  only through its converter, and our tiny test configs (``num_grow_ch=4``) could not be built.

So the state-dict keys here (``conv_first``, ``body.N.rdbK.convM``, ``conv_body``, ``conv_up1``, ``conv_up2``,
``conv_hr``, ``conv_last``) are exactly those of the official ``RealESRGAN_x4plus.pth`` and
``ESRGAN_SRx4_DF2KOST_official-ff704c30.pth`` files; load them with
:func:`restore.models.basicsr_weights.load_basicsr_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RRDB", "RRDBNet", "ResidualDenseBlock"]

#: ESRGAN scales its residual branches by 0.2 (Wang et al. 2018, "residual scaling"; BasicSR rrdbnet_arch.py).
_RESIDUAL_SCALE = 0.2
#: BasicSR ``default_init_weights(..., scale=0.1)`` for the dense-block convolutions.
_DENSE_INIT_SCALE = 0.1
_LRELU_SLOPE = 0.2


def _scaled_kaiming_(convs: list[nn.Conv2d], scale: float) -> None:
    """Kaiming-normal weights times ``scale``, zero bias: BasicSR's init, which keeps the deep residual
    stack close to the identity at the start of training."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight)
        conv.weight.data.mul_(scale)
        if conv.bias is not None:
            conv.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions with a scaled residual connection."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=_LRELU_SLOPE, inplace=True)
        _scaled_kaiming_([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], _DENSE_INIT_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * _RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks inside one more scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * _RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN generator: conv -> ``num_block`` RRDBs -> two nearest x2 upsamplings -> conv.

    The trunk always upsamples x4; for ``scale`` 2 and 1 the input is first pixel-unshuffled by 2 and 4
    (Real-ESRGAN x2plus), so those scales need input sides divisible by :attr:`input_multiple`.
    Defaults are the official RealESRGAN_x4plus sizes (Real-ESRGAN ``options/train_realesrnet_x4plus.yml``,
    ``network_g``).
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4 (BasicSR's variants), got {scale}")
        self.scale = scale
        in_ch = num_in_ch * {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=_LRELU_SLOPE, inplace=True)

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (pixel-unshuffle factor; 1 for x4)."""
        return 4 // self.scale

    def forward(self, x: Tensor) -> Tensor:
        feat = F.pixel_unshuffle(x, self.input_multiple) if self.scale != 4 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))
