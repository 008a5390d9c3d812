"""XPSR: ControlNet with Semantic-Fusion Attention + Conditional Attention on a frozen SD-1.5, prompted by MLLMs,
trained with the Degradation-Free Constraint.

Spec: ``../shared/specs/seesr_xpsr.md`` §2.2-§2.3 (modules: :mod:`restore.models.xpsr`), §2.4 (MLLM prompts:
``scripts/extract_prompts.py``), §2.5 (training), §2.6 (inference), §0 (recipe table).

Training step (§2.5): the ControlNet reads the bicubic-x4 LR in [0, 1] with the high-level prompt as its text and
the low-level (quality) prompt in its SFA blocks; the UNet reads the same text and, in its ``pixel_attentions``,
the raw ControlNet residuals. Loss = epsilon MSE + 0.05 x each DFC term (3 RGB heads to the resized GT, 13 latent
heads to the resized GT latent). Trainable: the ControlNet (with its SFA and DFC heads) and the UNet's
``pixel_attentions``.

Prompts come with the batch, from a side-file written by ``scripts/extract_prompts.py`` (fields ``prompt`` =
the high-level caption and ``lowlevel_prompt``, mapped by the data config's ``prompt_key``). Which text the
networks see is a switch, because the paper and the released trainer disagree (§2.5): ``training_prompt=paper``
(default) uses the high-level caption; ``official`` trains with an empty high-level prompt, as the released
``train.py`` does (it never reads the caption), so only the low-level prompt is informative.

The ablations of the paper are constructor options (configs: ``configs/model/xpsr.yaml``): ``fusion`` (Tab. 3),
``dfc`` (Tab. 4), ``negative_prompt`` on/off (Tab. 5), ``inference_prompts`` (Tab. 2), the prior (Tab. 6).

Inference (§2.6): prompts per image from the benchmark's side-file (``restore(lq, prompts=[record])``), or made on
the fly from the LR by the configured captioners; then ``"{caption} " + added_prompt`` against the negative
prompt, the low-level description against the low-level negative, sampled by
:func:`restore.sampling.sampler.sample` with the preset's settings (``paper``: DDPM 50, CFG 5.5, LRE start;
``official``: the released test config, DDPM 20 leading steps, CFG 4.5, the start latent noised to t=951 and
again to 800, latent tiles 320/8).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from restore.methods.checkpoints import load_controlnet_release
from restore.methods.latent_diffusion import LatentDiffusionSR, plain_dict
from restore.methods.training_pairs import upsampled_lr
from restore.models.priors import FrozenPrior
from restore.models.xpsr import (
    DFC_MODES,
    FUSIONS,
    PIXEL_ATTR,
    add_pixel_attention,
    build_xpsr_controlnet,
    degradation_free_loss,
    degradation_free_predictions,
    has_pixel_attention,
    lowlevel_prompt,
)
from restore.sampling.sampler import SamplingSettings

__all__ = ["INFERENCE_PROMPTS", "TRAINING_PROMPTS", "MissingPromptsError", "XPSR", "load_official_xpsr"]

log = logging.getLogger(__name__)

#: Text during training (see the module docstring): the paper's high-level caption, or the released trainer's "".
TRAINING_PROMPTS = ("paper", "official")
#: Which MLLM prompts reach the model at inference (XPSR Tab. 2); the others are replaced by "".
INFERENCE_PROMPTS = ("both", "high", "low", "null")
#: Batch fields of the two prompts (mapped from the side-file by the data config's ``prompt_key``).
HIGH_FIELD, LOW_FIELD = "prompt", "lowlevel_prompt"
#: Side-file fields written by scripts/extract_prompts.py, read at inference from ``restore(prompts=...)``.
HIGH_RECORD, LOW_RECORD = "highlevel", "lowlevel"
_CAPTIONERS = ("highlevel", "lowlevel")
_PRESET_KEYS = ("sampling", "added_prompt", "negative_prompt", "lowlevel_negative_prompt")


class MissingPromptsError(ValueError):
    """XPSR got an image without its high-/low-level prompts and has no captioner to make them."""


class XPSR(LatentDiffusionSR):
    """XPSR (Qu et al., ECCV 2024) as a :class:`LatentDiffusionSR`.

    Args:
        prior: the frozen SD prior (SD-1.5 in the paper) or a factory; ``pixel_attentions`` are attached here.
        scale: upscaling factor (4).
        fusion: ``sfa`` (official) | ``serial`` | ``high_only`` | ``low_only`` (Tab. 3; see
            :data:`restore.models.xpsr.FUSIONS`). ``low_only`` feeds the low-level prompt as the text prompt.
        dfc: ``both`` (official) | ``pixel`` | ``latent`` | ``none`` (Tab. 4).
        dfc_weight: lambda_d of every DFC term (official 0.05).
        training_prompt: ``paper`` | ``official`` (see the module docstring).
        pixel_attention_zero_init: zero ``proj_out`` of the pixel attentions (deviation; official: random).
        controlnet: keyword arguments of ``ControlNetModel.from_unet`` (official: diffusers' defaults).
        conditioning_scale: multiplier of the ControlNet residuals (official 1.0).
        inference_prompts: ``both`` | ``high`` | ``low`` | ``null`` (Tab. 2).
        use_negative_prompts: ``False`` uses "" as both unconditional prompts (Tab. 5: without negative prompt).
        preset: name of the entry of ``presets`` used at inference (``paper`` | ``official``).
        presets: ``{name: {sampling: {...}, added_prompt, negative_prompt, lowlevel_negative_prompt}}``.
        added_prompt / negative_prompt / lowlevel_negative_prompt: override the preset's (``None``: keep it).
        sampling: fields of :class:`SamplingSettings` overriding the preset's.
        captioners: ``{"highlevel": captioner, "lowlevel": captioner}`` (``MLLMCaptioner`` or factories, built
            on first use) for images without prompts at inference; ``None``: prompts must be given.
        pretrained: a released XPSR folder (``unet/`` + ``controlnet/``, §2.5) to load.
        **kwargs: :class:`LatentDiffusionSR` arguments (optimizer, null_prompt_prob, text_cache_size, ...).
    """

    trainable_prior_modules = (PIXEL_ATTR,)
    hparams_ignore = ("captioners",)

    def __init__(
        self,
        prior: FrozenPrior | Callable[[], FrozenPrior],
        scale: int = 4,
        fusion: str = "sfa",
        dfc: str = "both",
        dfc_weight: float = 0.05,
        training_prompt: str = "paper",
        pixel_attention_zero_init: bool = False,
        controlnet: Mapping[str, Any] | None = None,
        conditioning_scale: float = 1.0,
        inference_prompts: str = "both",
        use_negative_prompts: bool = True,
        preset: str = "paper",
        presets: Mapping[str, Mapping[str, Any]] | None = None,
        added_prompt: str | None = None,
        negative_prompt: str | None = None,
        lowlevel_negative_prompt: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        captioners: Mapping[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value, choices in (
            ("fusion", fusion, FUSIONS),
            ("dfc", dfc, DFC_MODES),
            ("training_prompt", training_prompt, TRAINING_PROMPTS),
            ("inference_prompts", inference_prompts, INFERENCE_PROMPTS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self._controlnet_kwargs = plain_dict(controlnet or {})
        super().__init__(prior, **kwargs)
        self.inference = _resolve_preset(
            preset,
            plain_dict(presets or {}),
            {
                "added_prompt": added_prompt,
                "negative_prompt": negative_prompt,
                "lowlevel_negative_prompt": lowlevel_negative_prompt,
            },
            plain_dict(sampling or {}),
            scale,
        )
        self.sampling: SamplingSettings = self.inference["sampling"]
        unknown = set(captioners or {}) - set(_CAPTIONERS)
        if unknown:
            raise ValueError(f"captioners takes the keys {_CAPTIONERS}, got {sorted(unknown)}")
        # not submodules: 7B MLLMs stay out of checkpoints and are built only when inference needs them
        self.__dict__["_captioners"] = dict(captioners or {})
        if pretrained is not None:
            load_official_xpsr(self, pretrained)

    # ------------------------------------------------------------------ modules
    def build_trainable(self, prior: FrozenPrior) -> nn.ModuleDict:
        """Pixel attention on the prior UNet, and the SFA + DFC ControlNet copied from it (§2.2, §2.3)."""
        hp = self.hparams
        if not has_pixel_attention(prior.unet):
            add_pixel_attention(prior.unet, zero_init=hp.pixel_attention_zero_init)
        controlnet = build_xpsr_controlnet(prior.unet, hp.fusion, hp.dfc, **self._controlnet_kwargs)
        return nn.ModuleDict({"controlnet": controlnet})

    @property
    def controlnet(self) -> nn.Module:
        return self.trainable["controlnet"]

    @property
    def scale(self) -> int:
        return int(self.hparams.scale)

    @property
    def uses_lowlevel_attention(self) -> bool:
        """Whether the ControlNet has SFA / serial low-level attention (needs low-level embeddings)."""
        return self.hparams.fusion in ("sfa", "serial")

    # ------------------------------------------------------------------ training
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "gt" not in batch or "lq" not in batch:
            return batch
        gt, lq = batch["gt"], batch["lq"]
        n = len(gt)
        # the ControlNet condition: the LR bicubic-upsampled to the GT size, [0, 1] (§2.5, stored LR/ at 512²)
        lr_up = upsampled_lr(lq, gt)
        high = batch.get(HIGH_FIELD)
        low = batch.get(LOW_FIELD)
        needed = {"high_only": [HIGH_FIELD], "low_only": [LOW_FIELD]}.get(
            self.hparams.fusion, [HIGH_FIELD, LOW_FIELD]
        )
        if self.hparams.training_prompt == "official":
            needed = [f for f in needed if f != HIGH_FIELD]
        absent = [f for f in needed if not batch.get(f)]
        if absent:
            raise MissingPromptsError(
                f"XPSR trains with MLLM prompts but the batch has no {absent}: write them with "
                "`python scripts/extract_prompts.py ...` and set data.train.prompts=<that .jsonl> "
                "data.train.prompt_key='{prompt: highlevel, lowlevel_prompt: lowlevel}' (data/README.md)"
            )
        if self.hparams.fusion == "low_only":
            text = list(low)
        elif self.hparams.training_prompt == "official":
            text = [""] * n  # the released train.py encodes an empty input_ids for the text prompt
        else:
            text = list(high)
        return {**batch, "lr_up": lr_up, HIGH_FIELD: text}

    def predict_noise(
        self, noisy_latents: Tensor, timesteps: Tensor, text_embeddings: Tensor, batch: dict[str, Any]
    ) -> Tensor:
        condition = {"text": text_embeddings}
        if self.uses_lowlevel_attention:
            condition["lowlevel"] = self.encode_prompts(batch[LOW_FIELD])
        with ExitStack() as stack:
            if self.training and self.hparams.dfc != "none":
                batch["dfc_predictions"] = stack.enter_context(degradation_free_predictions(self.controlnet))
            return self.denoise(noisy_latents, timesteps, condition, batch["lr_up"])

    def auxiliary_losses(self, batch: dict[str, Any], latents: Tensor) -> dict[str, Tensor]:
        predictions = batch.get("dfc_predictions")
        if predictions is None:
            return {}
        return {"dfc_loss": degradation_free_loss(predictions, batch["gt"], latents, self.hparams.dfc_weight)}

    def denoise(self, latents: Tensor, t: Tensor, condition: Mapping[str, Tensor], image: Tensor) -> Tensor:
        """ControlNet(LR image; text + low-level prompt) -> residuals -> UNet (pixel attention reads them)."""
        with ExitStack() as stack:
            if self.uses_lowlevel_attention:
                stack.enter_context(lowlevel_prompt(self.controlnet, condition["lowlevel"]))
            down, mid = self.controlnet(
                latents,
                t,
                encoder_hidden_states=condition["text"],
                controlnet_cond=image.to(latents.dtype),
                conditioning_scale=self.hparams.conditioning_scale,
                return_dict=False,
            )
        return self.prior.unet(
            latents,
            t,
            encoder_hidden_states=condition["text"],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    # ------------------------------------------------------------------ inference
    def caption(self, lq: Tensor) -> list[dict[str, str]]:
        """High- and low-level prompts of ``lq`` ``[B, 3, h, w]`` from the configured captioners (§2.4)."""
        missing = [k for k in _CAPTIONERS if k not in self._captioners]
        if missing:
            raise MissingPromptsError(
                f"XPSR needs the {'/'.join(missing)} prompt of every image: give the benchmark a prompt "
                "side-file (benchmark.prompts=<jsonl from `python scripts/extract_prompts.py`>) or configure "
                f"model.captioners.{missing[0]} (configs/model/captioner/) to caption on the fly"
            )
        records: list[dict[str, str]] = [{} for _ in range(len(lq))]
        for field in _CAPTIONERS:
            captioner = self._captioners[field]
            if not isinstance(captioner, nn.Module):  # a factory (Hydra _partial_): build on first use
                captioner = self._captioners[field] = captioner()
            captioner.to(self.device)
            for record, text in zip(records, captioner.caption(lq), strict=True):
                record[field] = text
        return records

    def inference_texts(self, records: Sequence[Mapping[str, str]]) -> tuple[list[str], list[str]]:
        """(high-level prompts, low-level prompts) the model sees for ``records`` (Tab. 2 switch applied)."""
        which = self.hparams.inference_prompts
        high = [r.get(HIGH_RECORD, "") if which in ("both", "high") else "" for r in records]
        low = [r.get(LOW_RECORD, "") if which in ("both", "low") else "" for r in records]
        return high, low

    def conditions(self, records: Sequence[Mapping[str, str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) of the sampler for one batch of prompt records (§2.6 strings)."""
        high, low = self.inference_texts(records)
        added = self.inference["added_prompt"]
        n = len(records)
        use_negative = self.hparams.use_negative_prompts
        negative = [self.inference["negative_prompt"] if use_negative else ""] * n
        low_negative = [self.inference["lowlevel_negative_prompt"] if use_negative else ""] * n
        if self.hparams.fusion == "low_only":
            return {"text": self.encode_prompts(low)}, {"text": self.encode_prompts(low_negative)}
        # official: caption + " " + added prompt (the caption's stray space kept when it is empty)
        cond = {"text": self.encode_prompts([f"{h} {added}" if added else h for h in high])}
        uncond = {"text": self.encode_prompts(negative)}
        if self.uses_lowlevel_attention:
            cond["lowlevel"] = self.encode_prompts(low)
            uncond["lowlevel"] = self.encode_prompts(low_negative)
        return cond, uncond

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        prompts: Sequence[Mapping[str, str]] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, scale*h, scale*w]`` (spec §2.6).

        ``prompts``: one record per image with ``highlevel`` / ``lowlevel`` (a side-file entry); ``None``
        captions ``lq`` with the configured captioners (the official prompts are made from the LR).
        """
        if prompts is None:
            prompts = self.caption(lq)
        if len(prompts) != len(lq):
            raise ValueError(f"got {len(prompts)} prompt records for {len(lq)} images")
        cond, uncond = self.conditions(prompts)
        return self.sample_restored(lq, cond, uncond, self.sampling, generator)

    def forward(self, lq: Tensor) -> Tensor:
        return self.restore(lq)


def _resolve_preset(
    name: str,
    presets: dict[str, Any],
    prompt_overrides: Mapping[str, str | None],
    sampling_overrides: Mapping[str, Any],
    scale: int,
) -> dict[str, Any]:
    """The inference settings: ``presets[name]``, then the explicit prompt / sampling overrides."""
    if name not in presets:
        raise ValueError(f"preset {name!r} is not among the configured presets {sorted(presets)}")
    preset = plain_dict(presets[name])
    unknown = set(preset) - set(_PRESET_KEYS)
    if unknown:
        raise ValueError(f"preset {name!r} has unknown keys {sorted(unknown)}; allowed: {_PRESET_KEYS}")
    resolved: dict[str, Any] = {key: preset.get(key) or "" for key in _PRESET_KEYS[1:]}
    resolved.update({k: v for k, v in prompt_overrides.items() if v is not None})
    fields = {"upscale": scale, **plain_dict(preset.get("sampling") or {}), **sampling_overrides}
    resolved["sampling"] = SamplingSettings(**fields)
    if resolved["sampling"].upscale != scale:
        raise ValueError(
            f"sampling.upscale={resolved['sampling'].upscale} differs from the method's scale={scale}"
        )
    return resolved


def load_official_xpsr(module: XPSR, folder: str | os.PathLike) -> None:
    """Load a released XPSR folder (``runs/xpsr/checkpoint-300000/{unet,controlnet}``, spec §2.5) into
    ``module``: the whole ControlNet (SFA + DFC heads) and the UNet's ``pixel_attentions``. The key sets must
    equal ours exactly, which holds for the official configuration (``fusion=sfa``, ``dfc=both``, SD-1.5)."""
    load_controlnet_release(module.controlnet, module.prior.unet, folder, PIXEL_ATTR, "XPSR")
