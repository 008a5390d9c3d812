"""The PatchGAN discriminator of pix2pix, as taming-transformers' ``NLayerDiscriminator`` (what LDM's and StableSR's
``LPIPSWithDiscriminator`` train against): parameter names ``main.<i>`` as there, so its checkpoints load.

Layers (``n_layers=3``, ``ndf=64``): conv 4x4/2 (bias) + LeakyReLU(0.2); two conv 4x4/2 (no bias) + BatchNorm +
LeakyReLU with 128 and 256 channels; conv 4x4/1 (no bias) + BatchNorm + LeakyReLU with 512; conv 4x4/1 to one
logit per patch (a 512^2 input gives 62x62 logits). Init as taming's ``weights_init``: convolutions N(0, 0.02),
BatchNorm weights N(1, 0.02) and biases 0. Reference: Isola et al., CVPR 2017; CompVis/taming-transformers
``taming/modules/discriminator/model.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PatchDiscriminator", "hinge_discriminator_loss"]


class PatchDiscriminator(nn.Module):
    """Patch logits of ``[B, in_channels, H, W]`` images in [-1, 1] (see the module doc)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * previous, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, image: Tensor) -> Tensor:
        return self.main(image)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2`` (taming's ``hinge_d_loss``)."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
