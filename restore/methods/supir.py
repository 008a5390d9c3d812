"""SUPIR: a GLVControl adaptor with ZeroSFT connectors on a frozen SDXL, restoration-guided EDM sampling.

SUPIR (Yu et al., CVPR 2024); official (inference only): ``Fanghua-Yu/SUPIR: SUPIR/models/SUPIR_model.py``
(``batchify_denoise``, ``batchify_sample``), ``test.py`` and ``options/SUPIR_v0*.yaml``; networks in
:mod:`restore.models.supir`, the sampler in :class:`restore.sampling.steppers.EDMStepper`.

Inference (:meth:`SUPIR.restore`, ``test.py``): the LR is resized (PIL bicubic) to LR x upscale, raised so that
its short side is at least ``min_size`` (1024) and rounded to multiples of 64 (``SUPIR/util.py: PIL2Tensor``);
the degradation-robust encoder gives the control latent ``0.13025 mode(E_dr(x))``, its decode is the *stage-1
restoration* ``x_stage1``, and ``0.13025 sample(E(x_stage1))`` (the frozen encoder) the restoration-guidance
target; the prompt is the image's caption (a side-file record, or the captioner's caption of the stage-1
restoration of the LR at short side 512, ``fix_resize=512``) followed by the quality suffix with no separator,
the negative prompt the uncond; sampling: pure noise, Euler-EDM with churn on SD's discrete sigmas, CFG (linear
ramp), control scale (optional linear ramp) and restoration guidance; decode; wavelet colour fix against
``x_stage1``; resize back to LR x upscale. The VAE, E_dr and the decoder are tiled with merged GroupNorm
statistics, the latent in 128 tiles with stride 64 (``TiledRestoreEDMSampler``).

Training (ours: the authors released none; every choice the paper leaves open is a config value, see
docs/supir.md): stage ``encoder`` trains E_dr with the paper's ``||D(E_dr(LQ)) - D(E_dr(GT))||^2`` (D frozen);
stage ``adaptor`` trains GLVControl (initialised from the SDXL encoder) and the connectors with SDXL's epsilon
loss, E_dr frozen (from a stage-``encoder`` checkpoint or the released weights), captions dropped to SDXL's null
condition with ``null_prompt_prob``, negative-quality images captioned with the negative prompt in the data mix
(:class:`restore.data.hr_datasets.FixedPrompt`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from restore.diffusion.edm import SUPIR_SIGMA_MAX
from restore.methods.captions import CaptionFallback
from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.controlnet_sr import sampling_settings
from restore.methods.latent_diffusion import LatentDiffusionSR, build
from restore.models.priors import LatentPrior, TextCondition
from restore.models.supir import (
    DegradationRobustEncoder,
    GLVControl,
    add_connectors,
    checkpoint_diffusers_blocks,
    control_features,
    hold_control_features,
    split_supir_checkpoint,
)
from restore.sampling.lre import encode_lr_latent
from restore.sampling.sampler import (
    SamplingInputs,
    SamplingSettings,
    decode_latents,
    resize_bicubic,
)
from restore.sampling.tiled_vae import TiledAutoencoderKL
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = [
    "CAPTION_RECORD",
    "DTYPES",
    "GT_BRANCHES",
    "STAGES",
    "SUPIR",
    "load_official_supir",
    "prompt_truncation",
    "supir_output_size",
]

#: Where the released weights are listed (Google Drive / Baidu links only).
OFFICIAL_MODELS_URL = "https://github.com/Fanghua-Yu/SUPIR#-models"
#: The prompt side-file field read at inference (``restore(lq, prompts=[record])``).
CAPTION_RECORD = "caption"
#: ``stage``: what trains (the inference path follows: ``encoder`` restores with the stage-1 output only).
STAGES = ("encoder", "adaptor")
#: Stage ``encoder``: the GT branch of the loss. ``detached``: ``D(E_dr(GT))`` without gradient (default);
#: ``trained``: with gradient (the formula as written; it admits the constant encoder as a minimum);
#: ``vae``: ``D(E(GT))`` with the frozen original encoder.
GT_BRANCHES = ("detached", "trained", "vae")
#: Per-part inference dtypes (``test.py --ae_dtype`` / ``--diff_dtype``).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def supir_output_size(
    lq_size: Sequence[int],
    upscale: float,
    min_size: int = 1024,
    multiple: int = 64,
    fix_resize: int | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``PIL2Tensor``'s sizes: ``((H, W) to sample at, (H0, W0) to return)``.

    ``H, W = h x upscale, w x upscale``, scaled up so that the short side reaches ``min_size``, each rounded to
    the nearest multiple of ``multiple`` (``np.round``: halves to even); ``(H0, W0)`` is LR x upscale, rounded.
    ``fix_resize`` scales the short side to exactly that (the captioner's 512 view) and ``(H0, W0)`` with it.
    E.g. 128x96 at x4 -> sample at 1344x1024, return 512x384.
    """
    h, w = float(lq_size[0]) * upscale, float(lq_size[1]) * upscale
    final = (round(h), round(w))
    if min(h, w) < min_size:
        ratio = min_size / min(h, w)
        h, w = h * ratio, w * ratio
    if fix_resize is not None:
        ratio = fix_resize / min(h, w)
        h, w = h * ratio, w * ratio
        final = (round(h), round(w))
    snapped = (max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple))
    return snapped, final


def prompt_truncation(tokenizer: Any, prompt: str, suffix: str) -> int:
    """How many tokens of ``suffix`` the CLIP tokenizer cuts from ``prompt + suffix`` (0 = all kept).

    Both SDXL text encoders read at most ``model_max_length`` (77) positions, start and end tokens included;
    SUPIR appends its quality suffix to a LLaVA caption that is often longer than that by itself.
    """
    limit = int(tokenizer.model_max_length)
    total = len(tokenizer(prompt + suffix, truncation=False, verbose=False).input_ids)
    if total <= limit:
        return 0
    suffix_tokens = len(tokenizer(suffix, truncation=False, verbose=False).input_ids) - 2
    return min(suffix_tokens, total - limit)


class SUPIR(LatentDiffusionSR):
    """SUPIR (Yu et al., CVPR 2024) as a :class:`~restore.methods.latent_diffusion.LatentDiffusionSR`.

    Args:
        prior: the frozen SDXL prior (or a factory); the connectors are attached to its UNet.
        stage: ``adaptor`` (GLVControl + connectors train; the full method) or ``encoder`` (E_dr trains; restores
            with the stage-1 output).
        scale: upscaling factor (``--upscale``).
        min_size / size_multiple: the resize rule (``--min_size 1024``, multiples of 64).
        control_scale / control_scale_start: ``s_stage2`` and, for the linear ramp (``--linear_s_stage2``), its
            value at sigma_max (``spt_linear_s_stage2``); ``None`` = constant.
        positive_suffix / negative_prompt: ``a_prompt`` (appended to every caption) / ``n_prompt``.
        default_prompt: the caption when neither a side-file record nor a captioner gives one.
        captioner: an MLLM captioner (or a factory, built on first use) captioning the stage-1 restoration.
        captioner_device: where the captioner runs (``None``: the method's device; e.g. ``cuda:1`` as
            ``test.py`` with two GPUs). An 8-bit captioner stays where it was loaded.
        caption_size: the short side of the captioner's view (``fix_resize=512``).
        inference_dtypes: ``{"diffusion": fp16|bf16|fp32, "autoencoder": bf16|fp32}`` applied when the module
            restores outside training (``--diff_dtype fp16``, ``--ae_dtype bf16``); ``None`` = as loaded.
        gt_branch: stage ``encoder``'s GT branch (:data:`GT_BRANCHES`).
        encoder_checkpoint: a stage-``encoder`` checkpoint of this method whose E_dr the ``adaptor`` stage uses.
        sampling: :class:`~restore.sampling.sampler.SamplingSettings` fields (``upscale`` = ``scale``).
        pretrained: a released ``SUPIR-v0Q.ckpt`` / ``SUPIR-v0F.ckpt`` (official layout) to load.
        **kwargs: :class:`~restore.methods.latent_diffusion.LatentDiffusionSR` arguments.
    """

    takes_prompts = True
    hparams_ignore = ("captioner",)

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        stage: str = "adaptor",
        scale: int = 4,
        min_size: int = 1024,
        size_multiple: int = 64,
        control_scale: float = 1.0,
        control_scale_start: float | None = None,
        positive_suffix: str = "",
        negative_prompt: str = "",
        default_prompt: str = "",
        captioner: Any = None,
        captioner_device: str | None = None,
        caption_size: int = 512,
        inference_dtypes: Mapping[str, str | None] | None = None,
        gt_branch: str = "detached",
        encoder_checkpoint: str | os.PathLike | None = None,
        sampling: SamplingSettings | Mapping[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} is not one of: {', '.join(STAGES)}")
        if gt_branch not in GT_BRANCHES:
            raise ValueError(f"gt_branch={gt_branch!r} is not one of: {', '.join(GT_BRANCHES)}")
        for part, name in dict(inference_dtypes or {}).items():
            if part not in ("diffusion", "autoencoder"):
                raise ValueError(f"inference_dtypes: unknown part {part!r} (diffusion | autoencoder)")
            if name is not None and name not in DTYPES:
                raise ValueError(f"inference_dtypes.{part}={name!r} is not one of: {', '.join(DTYPES)}")
            if part == "autoencoder" and name == "fp16":
                raise ValueError(
                    "inference_dtypes.autoencoder=fp16: SDXL's VAE overflows to NaN in float16 (SUPIR refuses it "
                    "too: 'fp16 cause NaN in AE'); use bf16, or fp32 on GPUs without bf16"
                )
        prior_module = build(prior)
        trainable = nn.ModuleDict({"denoise_encoder": DegradationRobustEncoder(prior_module.vae)})
        prior_modules: tuple[str, ...] = ()
        if stage == "adaptor":
            add_connectors(prior_module.unet)
            trainable["control"] = GLVControl(prior_module.unet)
            prior_modules = ("project_modules",)
        super().__init__(prior_module, trainable, trainable_prior_modules=prior_modules, **kwargs)
        if stage == "adaptor":  # E_dr is a stage-encoder result here: kept in checkpoints, not optimised
            self.denoise_encoder.requires_grad_(False)
        elif kwargs.get("gradient_checkpointing"):  # stage A back-propagates through the frozen decoder
            checkpoint_diffusers_blocks(self.prior.vae.decoder)
        self.sampling = sampling_settings(sampling, scale)
        self._captions = CaptionFallback(captioner, default_prompt, CAPTION_RECORD, captioner_device)
        self._control_scale_now = float(control_scale)
        self._dtypes_applied = False
        self._truncation_warned = False
        if encoder_checkpoint is not None:
            load_encoder_checkpoint(self, encoder_checkpoint)
        if pretrained is not None:
            load_official_supir(self, pretrained)

    @property
    def denoise_encoder(self) -> DegradationRobustEncoder:
        return self.trainable["denoise_encoder"]

    @property
    def control(self) -> GLVControl:
        return self.trainable["control"]

    @property
    def scale(self) -> int:
        return int(self.hparams.scale)

    @property
    def stage(self) -> str:
        return str(self.hparams.stage)

    # ------------------------------------------------------------------ the stage-1 restoration
    def _tiled(self, vae: nn.Module) -> TiledAutoencoderKL:
        s = self.sampling
        return TiledAutoencoderKL(vae, encoder_tile=s.vae_encoder_tile, decoder_tile=s.vae_decoder_tile)

    def control_latent(self, images: Tensor, mode: bool = True) -> Tensor:
        """``0.13025 mode(E_dr(x))`` of images in [0, 1] (the adaptor's input), tiled; float32."""
        return encode_lr_latent(self._tiled(self.denoise_encoder), images, sample=not mode).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1] with the frozen decoder, tiled; float32."""
        return decode_latents(self._tiled(self.prior.vae), latents)

    @torch.no_grad()
    def stage1(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(control latent, stage-1 restoration in [0, 1])`` of (upscaled) LQ images (``batchify_denoise``)."""
        latent = self.control_latent(images)
        return latent, self.decode(latent)

    # ------------------------------------------------------------------ training
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.stage != "adaptor" or "gt" not in batch or "lq" not in batch:
            return batch
        lq_up = resize_bicubic(batch["lq"].float(), tuple(batch["gt"].shape[-2:]))
        with torch.no_grad():
            return {**batch, "control_latent": self.control_latent(lq_up)}

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor:
        self._control_scale_now = 1.0
        return self.denoise(noisy_latents, timesteps, text, {"control_latent": batch["control_latent"]})

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.stage == "adaptor":
            hold_control_features(self.prior.unet, None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if self.stage == "adaptor":
            return super().training_step(batch, batch_idx)
        return self._encoder_step(batch, batch_idx)

    def _encoder_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        from restore.methods.nonfinite_loss import skip_nonfinite_loss

        gt, lq = batch["gt"], batch["lq"]
        lq_up = resize_bicubic(lq.float(), tuple(gt.shape[-2:]))
        vae = self.prior.vae
        restored = self._decode_moments(self.denoise_encoder(2 * lq_up - 1))
        branch = self.hparams.gt_branch
        with torch.set_grad_enabled(branch == "trained"):
            encoder = self.denoise_encoder if branch != "vae" else _VAEMoments(vae)
            target = self._decode_moments(encoder(2 * gt.float() - 1))
        loss = F.mse_loss(restored.float(), target.float())
        self.log("train/encoder_loss", loss.detach(), batch_size=len(gt))
        if skip_nonfinite_loss(self, loss, batch_idx, self.hparams.skip_nonfinite_loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(gt))
        return loss

    def _decode_moments(self, moments: Tensor) -> Tensor:
        # the posterior mode (SUPIR encodes with use_sample=False) through the frozen decoder, in [-1, 1]
        vae = self.prior.vae
        mean = moments.chunk(2, dim=1)[0]
        z = vae.post_quant_conv(mean.to(vae.dtype)) if vae.post_quant_conv is not None else mean.to(vae.dtype)
        return vae.decoder(z)

    # ------------------------------------------------------------------ the network
    def denoise(
        self, latents: Tensor, t: Tensor, condition: TextCondition, spatial: Mapping[str, Tensor]
    ) -> Tensor:
        """GLVControl on the tile's control latent -> the connectors -> the frozen SDXL UNet (epsilon)."""
        unet = self.prior.unet
        dtype = unet.dtype
        kwargs = self.prior.denoiser_kwargs(condition)
        context = kwargs["encoder_hidden_states"].to(dtype)
        added = {k: v.to(dtype) for k, v in kwargs["added_cond_kwargs"].items()}
        timesteps = torch.as_tensor(t, device=latents.device).reshape(-1).expand(latents.shape[0])
        x = latents.to(dtype)
        hidden = self.control(spatial["control_latent"], timesteps, x, context, added)
        if unet.is_gradient_checkpointing and torch.is_grad_enabled():
            # diffusers recomputes checkpointed blocks during backward, after this call has returned: the hidden
            # states stay set until the batch ends (autograd keeps them alive until then anyway)
            hold_control_features(unet, hidden, self._control_scale_now)
            return unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        with control_features(unet, hidden, self._control_scale_now):
            return unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def control_scale_at(self, sigma: float) -> float:
        """``s_stage2`` at noise level ``sigma``: constant, or ramped linearly from ``control_scale_start`` at
        sigma_max (``RestoreEDMSampler``: ``(sigma / 14.6146) (start - s) + s``, the pre-churn sigma)."""
        hp = self.hparams
        if hp.control_scale_start is None:
            return float(hp.control_scale)
        return sigma / SUPIR_SIGMA_MAX * (hp.control_scale_start - hp.control_scale) + hp.control_scale

    def _set_control_scale(self, step: int, sigma: float) -> None:
        self._control_scale_now = self.control_scale_at(sigma)

    # ------------------------------------------------------------------ inference
    def _apply_inference_dtypes(self) -> None:
        if self._dtypes_applied or not self.hparams.inference_dtypes:
            return
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":  # validation inside training: leave weights be
            return
        dtypes = self.hparams.inference_dtypes
        if dtypes.get("diffusion"):
            dtype = DTYPES[dtypes["diffusion"]]
            self.prior.unet.to(dtype)
            if self.stage == "adaptor":
                self.control.to(dtype)
        if dtypes.get("autoencoder"):
            dtype = DTYPES[dtypes["autoencoder"]]
            self.prior.vae.to(dtype)
            self.denoise_encoder.to(dtype)
        self._dtypes_applied = True

    def caption_views(self, lq: Tensor) -> list[Tensor]:
        """The captioner's input per image: the stage-1 restoration of the LR at short side ``caption_size``
        (``test.py``: ``PIL2Tensor(..., fix_resize=512)`` -> ``batchify_denoise`` -> resize to the unsnapped
        size)."""
        hp = self.hparams
        views = []
        for image in lq:
            size, final = supir_output_size(
                image.shape[-2:], self.scale, hp.min_size, hp.size_multiple, fix_resize=hp.caption_size
            )
            _, restored = self.stage1(resize_bicubic(image[None].float(), size))
            views.append(resize_bicubic(restored, final)[0])
        return views

    @torch.no_grad()
    def captions(self, lq: Tensor, prompts: Sequence[Mapping[str, str]] | None = None) -> list[str]:
        """Per image: the record's ``caption``, else the captioner's caption of the stage-1 restoration
        (:meth:`caption_views`), else ``default_prompt``; only the images without a record are captioned."""
        return self._captions(len(lq), prompts, lambda missing: self.caption_views(lq[missing]), self.device)

    def caption_source(self) -> Callable[[list[Tensor]], list[str]]:
        """A prompt source for :func:`restore.data.prompt_extraction.extract_prompts` (LR images -> captions), so
        the captions of a test set are computed ahead into a side-file (``scripts/supir_captions.py``)."""

        def source(images: list[Tensor]) -> list[str]:
            return [self.captions(image[None].to(self.device))[0] for image in images]

        return source

    def text_conditions(self, captions: Sequence[str]) -> tuple[TextCondition, TextCondition]:
        """``(cond, uncond)``: ``caption + positive_suffix`` (no separator, ``''.join``) and the negative prompt;
        warns when the CLIP tokenizers cut the suffix (77 positions)."""
        suffix, negative = self.hparams.positive_suffix, self.hparams.negative_prompt
        tokenizer = getattr(self.prior, "tokenizer", None)
        if tokenizer is not None and suffix:
            cuts = [prompt_truncation(tokenizer, caption, suffix) for caption in captions]
            if any(cuts) and not self._truncation_warned:
                self._truncation_warned = True  # once per module: a test set would repeat it for every image
                rank_zero_warn(
                    f"{sum(c > 0 for c in cuts)} of {len(cuts)} prompt(s) exceed the CLIP encoders' "
                    f"{tokenizer.model_max_length} tokens: the last {max(cuts)} token(s) of the quality suffix are "
                    "cut (as in SUPIR, whose LLaVA captions are often longer than 77 tokens by themselves). Shorten "
                    "the captions (captioner.max_new_tokens) or the suffix to keep it whole"
                )
        cond = self.prior.encode_text([f"{caption}{suffix}" for caption in captions])
        return cond, self.prior.encode_text([negative] * len(captions))

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        prompts: Sequence[Mapping[str, str]] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, round(scale h), round(scale w)]``."""
        self._apply_inference_dtypes()
        hp = self.hparams
        size, final = supir_output_size(lq.shape[-2:], self.scale, hp.min_size, hp.size_multiple)
        control, stage1 = self.stage1(resize_bicubic(lq.float(), size))
        if self.stage == "encoder":
            return resize_bicubic(stage1, final)
        settings = self.sampling
        if generator is None and settings.seed is not None:
            generator = torch.Generator(device=lq.device).manual_seed(int(settings.seed))
        # the restoration-guidance target: the stage-1 image re-encoded by the frozen encoder (a posterior draw)
        target = encode_lr_latent(self._tiled(self.prior.vae), stage1, generator, sample=True).float()
        cond, uncond = self.text_conditions(self.captions(lq, prompts))
        inputs = SamplingInputs(
            cond,
            uncond,
            spatial={"control_latent": control},
            color_reference=stage1,
            guidance_reference=target,
            decode=self.decode,
            before_step=self._set_control_scale,
        )
        image = self.sample(inputs, settings, generator)
        return resize_bicubic(image, final)


class _VAEMoments(nn.Module):
    """The frozen VAE's posterior moments (``gt_branch="vae"``)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.__dict__["vae"] = vae

    def forward(self, images: Tensor) -> Tensor:
        vae = self.vae
        h = vae.encoder(images.to(vae.dtype))
        return vae.quant_conv(h) if vae.quant_conv is not None else h


def load_encoder_checkpoint(module: SUPIR, path: str | os.PathLike) -> None:
    """E_dr from a checkpoint of this method (a stage-``encoder`` run's ``last.ckpt``), strict."""
    ckpt = load_checkpoint_file(
        path,
        written_by="train.py experiment=supir_encoder (a Lightning checkpoint)",
        fix="give that run's checkpoints/last.ckpt",
    )
    state = ckpt.get("state_dict", ckpt)
    prefix = "trainable.denoise_encoder."
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise CheckpointMismatchError(
            f"{path} holds no {prefix}* weights: give the checkpoint of a SUPIR stage-encoder run "
            "(python train.py experiment=supir_encoder), or the released weights with method.pretrained="
        )
    module.denoise_encoder.load_state_dict(encoder, strict=True)


def load_official_supir(module: SUPIR, path: str | os.PathLike) -> None:
    """Load a released ``SUPIR-v0Q.ckpt`` / ``SUPIR-v0F.ckpt`` (official layout) into ``module``: the adaptor,
    the connectors and E_dr with zero missing / unexpected keys (a stage-``encoder`` module takes E_dr only);
    the SDXL parts in the file are left to the prior."""
    from restore.weights import WeightFileNotFoundError

    if not os.path.isfile(path):
        raise WeightFileNotFoundError(
            f"weights file '{path}' does not exist. SUPIR-v0Q.ckpt (the paper's setting) and SUPIR-v0F.ckpt (light "
            f"degradations) are published through the Google Drive / Baidu links of {OFFICIAL_MODELS_URL} (no "
            "direct download url): fetch one on a machine with internet, copy it to that path, or pass another "
            "(method.pretrained)"
        )
    # a Lightning checkpoint of the sgm code: pickled beyond tensors, so weights_only=False (trusted file)
    ckpt = load_checkpoint_file(
        path,
        written_by="SUPIR (SUPIR-v0Q.ckpt / SUPIR-v0F.ckpt)",
        fix="download the release again (method.pretrained)",
        weights_only=False,
        mmap=True,
    )
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    vae = module.prior.vae
    if module.stage == "encoder":
        from restore.models.supir import denoise_encoder_official_to_ours

        encoder = denoise_encoder_official_to_ours(state, vae)
        module.denoise_encoder.encoder.load_state_dict(encoder, strict=True)
        return
    try:
        glv, connectors, encoder = split_supir_checkpoint(
            state, module.control, module.prior.unet, module.denoise_encoder.encoder, vae
        )
    except KeyError as err:
        raise CheckpointMismatchError(
            f"{path}: {err.args[0]}: is it a SUPIR-v0 checkpoint for SDXL?"
        ) from err
    module.control.load_state_dict(glv, strict=True)
    module.prior.unet.project_modules.load_state_dict(
        {k[len("project_modules.") :]: v for k, v in connectors.items()}, strict=True
    )
    module.denoise_encoder.encoder.load_state_dict(encoder, strict=True)
