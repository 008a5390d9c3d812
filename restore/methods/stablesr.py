"""StableSR: a time-aware encoder + SFT layers on a frozen SD-2.1, sampled with progressive patch aggregation.

StableSR (Wang et al., IJCV 2024); official: ``IceClear/StableSR: ldm/models/diffusion/ddpm.py``
(``LatentDiffusionSRTextWT``: ``get_input``, ``forward``/``p_losses``, ``p_sample_loop_canvas``), the stage-1
config ``configs/stableSRNew/v2-finetune_text_T_512.yaml`` and the test scripts ``scripts/
sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`` (any size) / ``..._old.py`` (512 centre crops); networks in
:mod:`restore.models.stablesr`, the stage-2 CFW decoder in :mod:`restore.models.cfw`.

Training (stage 1, :meth:`on_after_batch_transfer` + the base step): the LR from the degradation (the
``stablesr_mild`` preset, USM-sharpened GT) is bicubic-upsampled to the GT size; with probability
``no_degradation_prob`` (0.01, one draw per batch as the official ``random.random()``) the whole batch's input is
the GT itself; Real-ESRGAN's 180-pair pool shuffles pairs across batches; the upsampled LR and the GT are encoded
(posterior samples x 0.18215); the encoder reads the clean LR latent at the original timestep, the SFT layers
modulate the frozen UNet, the prompt is always ``""``; loss: epsilon MSE. Only the encoder and the SFT layers
train (``trainable_prior_modules=("spade",)``).

Inference (the canvas script): the LR is bicubic-upsampled by ``max(input_size / short side, scale)`` and
reflect-padded to multiples of 32; images larger than ``pixel_tile`` (1280) are cut into Gaussian-blended pixel
tiles (stride ``pixel_tile_stride`` 1000), each restored alone; per image (tile): the upsampled LR's latent (one
posterior sample) is both the encoder's input and the start (noised to t=999 on the 1000-step schedule);
DDPM ancestral on 200 respaced steps with the posterior variance, the networks given the original timestep; at
every step the latent is cut into 64-latent tiles overlapping by 32, each tile with its own encoder features and
epsilon, blended with Gaussian weights; decode (the CFW decoder with fusion weight 0.5 when given, the SD VAE
otherwise); AdaIN colour fix against the upsampled LR; crop the padding; resize to LR x scale.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restore.methods.controlnet_sr import sampling_settings
from restore.methods.latent_diffusion import LatentDiffusionSR, build
from restore.methods.training_pairs import PairPool, add_synthesised_pairs
from restore.models.priors import LatentPrior, TextCondition
from restore.models.stablesr import (
    TimeAwareEncoder,
    add_sft,
    hold_structure_features,
    split_stablesr_checkpoint,
    structure_features,
)
from restore.sampling.sampler import SamplingInputs, SamplingSettings
from restore.sampling.tiling import side_exceeds_tile, tiled_apply
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = ["StableSR", "load_official_stablesr", "stablesr_input_size", "upsample_bicubic"]


def upsample_bicubic(image: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate`` bicubic (a=-0.75, no antialias) to ``size``, clamped to [0, 1]: how the official code
    upsamples the LR, in training (``resize_lq``) and in the test scripts."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image.float()
    return F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def stablesr_input_size(lq_size: Sequence[int], scale: int, input_size: int) -> tuple[tuple[int, int], float]:
    """The canvas script's upsampled size and factor: ``s = max(input_size / short side, scale)``,
    ``(int(h s), int(w s))``. E.g. 128x128 at x4 -> 512x512 (s=4); 64x96 -> 512x768 (s=8)."""
    h, w = int(lq_size[0]), int(lq_size[1])
    factor = max(input_size / min(h, w), float(scale))
    return (int(h * factor), int(w * factor)), factor


class StableSR(LatentDiffusionSR):
    """StableSR stage 1 (Wang et al., IJCV 2024) as a :class:`~restore.methods.latent_diffusion.LatentDiffusionSR`.

    Args:
        prior: the frozen SD-2.1-base prior (or a factory); SFT layers are attached to its UNet.
        encoder: :class:`~restore.models.stablesr.TimeAwareEncoder` keyword arguments (its config).
        sft_hidden: width of SPADE's shared convolution (official: fixed at 128).
        scale: upscaling factor (4).
        input_size: the short side the LR is upsampled to at least (``--input_size 512``).
        pad_multiple: the upsampled LR is reflect-padded to multiples of this (32).
        pixel_tile / pixel_tile_stride: pixel tiles for large inputs (``--vqgantile_size 1280``,
            ``--vqgantile_stride 1000``); ``None`` = never.
        no_degradation_prob: probability that a training batch's input is its GT (0.01).
        pair_pool: Real-ESRGAN pair-pool size (``queue_size`` 180); 0 = off.
        prompt / negative_prompt: the text condition (always ``""`` in training and in the DDPM scripts) and, for
            guided sampling (the DDIM script, ``guidance_scale`` > 1), the negative prompt.
        decoder: the stage-2 CFW autoencoder (:mod:`restore.models.cfw`) or a factory; ``None`` = the SD VAE.
        fusion_weight: the CFW fusion weight ``w`` at inference (``--dec_w 0.5``).
        sampling: :class:`~restore.sampling.sampler.SamplingSettings` fields (``upscale`` = ``scale``).
        pretrained: an official stage-1 checkpoint (``stablesr_000117.ckpt``) whose encoder and SFT layers to load.
        **kwargs: :class:`~restore.methods.latent_diffusion.LatentDiffusionSR` arguments.
    """

    hparams_ignore = ("decoder",)

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        encoder: Mapping[str, Any] | None = None,
        sft_hidden: int = 128,
        scale: int = 4,
        input_size: int = 512,
        pad_multiple: int = 32,
        pixel_tile: int | None = 1280,
        pixel_tile_stride: int = 1000,
        no_degradation_prob: float = 0.01,
        pair_pool: int = 180,
        prompt: str = "",
        negative_prompt: str = "",
        decoder: nn.Module | Callable[[], nn.Module] | None = None,
        fusion_weight: float = 0.5,
        sampling: SamplingSettings | Mapping[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= no_degradation_prob <= 1.0:
            raise ValueError(f"no_degradation_prob must be in [0, 1], got {no_degradation_prob}")
        if pixel_tile is not None and not 0 < pixel_tile_stride <= pixel_tile:
            raise ValueError(f"pixel_tile_stride must be in (0, pixel_tile], got {pixel_tile_stride}")
        prior_module = build(prior)
        encoder_module = TimeAwareEncoder(**dict(encoder or {}))
        add_sft(prior_module.unet, cond_channels=int(encoder_module.config.out_channels), hidden=sft_hidden)
        if decoder is not None and not isinstance(decoder, nn.Module):
            # a factory; trained CFW layers join the stage-1 prior's own VAE (shared, frozen)
            decoder = decoder(vae=prior_module.vae) if _takes_vae(decoder) else decoder()
        frozen = {"decoder": decoder} if decoder is not None else {}
        kwargs.setdefault("null_prompt_prob", 0.0)  # the prompt is "" anyway
        super().__init__(
            prior_module,
            nn.ModuleDict({"encoder": encoder_module}),
            trainable_prior_modules=("spade",),
            frozen=frozen,
            **kwargs,
        )
        self.sampling = sampling_settings(sampling, scale)
        self.pair_pool = PairPool(pair_pool) if pair_pool else None
        if pretrained is not None:
            load_official_stablesr(self, pretrained)

    @property
    def encoder(self) -> TimeAwareEncoder:
        return self.trainable["encoder"]

    @property
    def scale(self) -> int:
        return int(self.hparams.scale)

    # ------------------------------------------------------------------ training
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = add_synthesised_pairs(self, batch)
        if "gt" not in batch or "lq" not in batch:
            return batch
        gt = batch["gt"].float()
        lq_up = upsample_bicubic(batch["lq"], gt.shape[-2:])
        if self._trainer is not None and self._trainer.training:
            gen = self.generator.get(self, gt.device)
            identity = torch.rand((), generator=gen, device=gen.device) < self.hparams.no_degradation_prob
            if identity or not torch.isfinite(lq_up).all():
                lq_up = gt
            if self.pair_pool is not None:
                lq_up, gt = self.pair_pool(lq_up, gt, gen)
        latent = self.prior.encode_images(lq_up, self.generator.get(self, gt.device))
        return {**batch, "gt": gt, "lq_up": lq_up, "lq_latent": latent}

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor:
        """Encoder features of the clean LR latent at the (original) timesteps -> SFT -> the frozen UNet."""
        features = self.encoder(batch["lq_latent"].to(noisy_latents.dtype), timesteps)
        unet = self.prior.unet
        if unet.is_gradient_checkpointing and torch.is_grad_enabled():
            # diffusers recomputes checkpointed ResBlocks during backward, after this call has returned: the
            # features stay set until the batch ends (autograd keeps them alive until then anyway)
            hold_structure_features(unet, features)
            return self.prior.predict(noisy_latents, timesteps, text)
        with structure_features(unet, features):
            return self.prior.predict(noisy_latents, timesteps, text)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        hold_structure_features(self.prior.unet, None)

    # ------------------------------------------------------------------ inference
    def denoise(self, latents: Tensor, t: Tensor, condition: Any, spatial: Mapping[str, Tensor]) -> Tensor:
        """Encoder features of the tile's LR latent at ``t`` (recomputed every step and per tile) -> UNet."""
        timesteps = t.reshape(-1).expand(latents.shape[0])
        features = self.encoder(spatial["lq_latent"].to(latents.dtype), timesteps)
        with structure_features(self.prior.unet, features):
            return self.prior.predict(latents, timesteps, condition)

    def text_conditions(self, n: int) -> tuple[TextCondition, TextCondition | None]:
        """The prompt's condition and, when the settings guide, the negative prompt's."""
        hp = self.hparams
        cond = self.prior.encode_text([hp.prompt] * n)
        if self.sampling.guidance_scale == 1.0:
            return cond, None
        return cond, self.prior.encode_text([hp.negative_prompt] * n)

    def _sampling_inputs(self, image: Tensor, generator: torch.Generator | None) -> SamplingInputs:
        """The loop's inputs for upsampled (and padded) LR images ``[B, 3, H, W]`` in [0, 1]: one posterior draw
        of their latent is both the encoder's input (``spatial``) and the start (noised to t=999)."""
        latent = self.prior.encode_images(image, generator)
        cond, uncond = self.text_conditions(len(image))
        return SamplingInputs(
            cond, uncond, spatial={"lq_latent": latent}, start_reference=image, start_latent=latent
        )

    def final_latents(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The sampler's last latent (scaled) for upsampled LR images: what the CFW data step stores."""
        inputs = self._sampling_inputs(image, generator)
        inputs.decode = lambda z: z
        return self.sample(inputs, self.sampling, generator)

    def _restore_padded(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        """One upsampled-and-padded LR image (tile) ``[B, 3, H, W]`` in [0, 1] -> its restoration."""
        inputs = self._sampling_inputs(image, generator)
        inputs.color_reference = image
        decoder = getattr(self, "decoder", None)
        if decoder is not None:  # CFW: the decoder fuses features of this LR image (official vq_model.encode)
            dtype = next(decoder.parameters()).dtype
            _, features = decoder.encode_with_features(image.to(dtype) * 2 - 1)
            weight = float(self.hparams.fusion_weight)

            def decode(z: Tensor) -> Tensor:
                unscaled = (z / self.prior.scaling_factor).to(dtype)
                return ((decoder.decode(unscaled, features, weight).float() + 1) / 2).clamp(0, 1)

            inputs.decode = decode
        return self.sample(inputs, self.sampling, generator)

    @torch.no_grad()
    def restore(
        self, lq: Tensor, *args: Any, generator: torch.Generator | None = None, **kwargs: Any
    ) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, scale*h, scale*w]`` (the canvas script)."""
        hp = self.hparams
        if generator is None and self.sampling.seed is not None:
            generator = torch.Generator(device=lq.device).manual_seed(int(self.sampling.seed))
        size, factor = stablesr_input_size(lq.shape[-2:], self.scale, hp.input_size)
        image = upsample_bicubic(lq, size)
        multiple = int(hp.pad_multiple)
        pad_h, pad_w = (-size[0]) % multiple, (-size[1]) % multiple
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
        if hp.pixel_tile is not None and side_exceeds_tile(*image.shape[-2:], hp.pixel_tile):
            tile = int(hp.pixel_tile)
            restored = tiled_apply(
                lambda x: self._restore_padded(x, generator),
                image,
                tile,
                tile - int(hp.pixel_tile_stride),
                needs_tiling=side_exceeds_tile,
            )
        else:
            restored = self._restore_padded(image, generator)
        restored = restored[..., : size[0], : size[1]].clamp(0, 1)
        target = (lq.shape[-2] * self.scale, lq.shape[-1] * self.scale)
        if factor > self.scale:
            restored = upsample_bicubic(restored, target)  # F.interpolate bicubic down, as the script
        return restored


def _takes_vae(factory: Callable[..., Any]) -> bool:
    try:
        return "vae" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


#: The released variants' differences from the default model (IceClear/StableSR README): same key layout, other
#: prior, parametrisation and input size; a file named so is refused on a module that does not match.
_VARIANTS = {
    "768v": (
        "stablesr_768v_*.ckpt is StableSR on SD-2.1 768-v: it needs a v-prediction SD-2.1 (768) prior "
        "(method/prior with stabilityai/stable-diffusion-2-1, method.prediction_type=v_prediction), "
        "method.input_size=768, and no CFW decoder (the authors did not fine-tune one: fusion weight 0)",
        lambda m: m.prediction_type == "v_prediction" and m.hparams.input_size == 768,
    ),
    "turbo": (
        "stablesr_turbo.ckpt is StableSR on SD-Turbo: it needs the stabilityai/sd-turbo prior and a 4-step "
        "sampler (method.sampling.num_steps=4)",
        lambda m: "turbo" in str(m.prior.source or "").lower(),
    ),
}


def _check_variant(module: StableSR, file_name: str) -> None:
    from restore.models.stablesr import StableSRCheckpointError

    for tag, (needs, fits) in _VARIANTS.items():
        if tag in file_name.lower() and not fits(module):
            raise StableSRCheckpointError(f"{file_name}: {needs}")


def load_official_stablesr(module: StableSR, path: str | os.PathLike) -> None:
    """Load the encoder and SFT layers of an official stage-1 checkpoint (``stablesr_000117.ckpt``, a Lightning
    ``state_dict``; also ``stablesr_768v_000139.ckpt`` / ``stablesr_turbo.ckpt`` on their priors) into ``module``,
    with zero missing / unexpected trained keys; the frozen SD-2.1 in the file is left to the prior's weights."""
    from restore.models.stablesr import StableSRCheckpointError
    from restore.weights import missing_weight_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise missing_weight_file(path, "method.pretrained")
    _check_variant(module, os.path.basename(path))
    # the official Lightning checkpoint pickles more than tensors (hyper-parameters): weights_only=False
    ckpt = load_checkpoint_file(
        path,
        written_by="StableSR (stablesr_000117.ckpt, a Lightning checkpoint of the official code)",
        fix="pass the released stage-1 file (method.pretrained)",
        weights_only=False,
        mmap=True,
    )
    try:
        encoder_state, sft_state = split_stablesr_checkpoint(ckpt, module.encoder, module.prior.unet)
    except StableSRCheckpointError as err:
        raise StableSRCheckpointError(f"{path}: {err}") from None
    module.encoder.load_state_dict(encoder_state, strict=True)
    missing, unexpected = module.prior.unet.load_state_dict(sft_state, strict=False)
    assert not unexpected and not any(".spade." in k for k in missing)
