"""XPSR: ControlNet with Semantic-Fusion Attention + Conditional Attention on a frozen SD-1.5, prompted by MLLMs,
trained with the Degradation-Free Constraint.

XPSR (Qu et al., ECCV 2024); official: ``qyp2000/XPSR: train.py`` + ``configs/xpsr.yaml`` (training),
``test.py`` + ``configs/xpsr_test.yaml`` (inference); networks in :mod:`restore.models.xpsr`, MLLM prompts from
``scripts/extract_prompts.py``.

Training step: the ControlNet reads the bicubic-x4 LR in [0, 1] with the high-level prompt as its text and
the low-level (quality) prompt in its SFA blocks; the UNet reads the same text and, in its ``pixel_attentions``,
the raw ControlNet residuals. Loss = epsilon MSE + 0.05 x each DFC term (3 RGB heads to the resized GT, 13 latent
heads to the resized GT latent). Trainable: the ControlNet (with its SFA and DFC heads) and the UNet's
``pixel_attentions``.

Prompts come with the batch, from a side-file written by ``scripts/extract_prompts.py`` (fields ``prompt`` =
the high-level caption and ``lowlevel_prompt``, mapped by the data config's ``prompt_key``). Which text the
networks see is a switch, because the paper and the released trainer disagree: ``training_prompt=paper``
(default) uses the high-level caption; ``official`` trains with an empty high-level prompt, as the released
``train.py`` does (it never reads the caption), so only the low-level prompt is informative.

The ablations of the paper are constructor options (configs: ``configs/method/xpsr.yaml``): ``fusion`` (Tab. 3),
``dfc`` (Tab. 4), ``negative_prompt`` on/off (Tab. 5), ``inference_prompts`` (Tab. 2), the prior (Tab. 6).

Inference: prompts per image from the benchmark's side-file (``restore(lq, prompts=[record])``), or made on
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
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from restore.data.precomputed_inputs import precomputed_text, text_fields
from restore.methods.controlnet_sr import ControlNetSR
from restore.methods.latent_diffusion import Prediction, build, plain_dict
from restore.models.priors import LatentPrior, TextCondition
from restore.models.xpsr import (
    DFC_MODES,
    FUSIONS,
    PIXEL_ATTR,
    build_xpsr_trainable,
    degradation_free_loss,
    degradation_free_predictions,
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


class XPSR(ControlNetSR):
    """XPSR (Qu et al., ECCV 2024) as a :class:`~restore.methods.controlnet_sr.ControlNetSR`.

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
        pretrained: a released XPSR folder (``unet/`` + ``controlnet/``) to load.
        **kwargs: :class:`~restore.methods.latent_diffusion.LatentDiffusionSR` arguments (optimizer,
            null_prompt_prob, text_cache_size, ...).
    """

    takes_prompts = True
    hparams_ignore = ("captioners",)

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
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
        inference = _resolve_preset(
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
        unknown = set(captioners or {}) - set(_CAPTIONERS)
        if unknown:
            raise ValueError(f"captioners takes the keys {_CAPTIONERS}, got {sorted(unknown)}")
        prior_module = build(prior)
        trainable = build_xpsr_trainable(
            prior_module.unet, fusion, dfc, pixel_attention_zero_init, **plain_dict(controlnet or {})
        )
        super().__init__(
            prior_module,
            trainable,
            scale=scale,
            conditioning_scale=conditioning_scale,
            sampling=inference["sampling"],
            trainable_prior_modules=(PIXEL_ATTR,),
            **kwargs,
        )
        self.inference = inference
        # not submodules: 7B MLLMs stay out of checkpoints and are built only when inference needs them
        self.__dict__["_captioners"] = dict(captioners or {})
        if pretrained is not None:
            load_official_xpsr(self, pretrained)

    @property
    def uses_lowlevel_attention(self) -> bool:
        """Whether the ControlNet has SFA / serial low-level attention (needs low-level embeddings)."""
        return self.hparams.fusion in ("sfa", "serial")

    # ------------------------------------------------------------------ training
    #: which prompts are encoded, and as what, depends on these
    precomputed_settings = ("fusion", "training_prompt")

    def training_inputs(self, batch: Mapping[str, Any], lr_up: Tensor) -> dict[str, Any]:
        """The text prompt of the step (see the module doc); the prompts the configuration needs must be there
        (not with precomputed inputs: their features are in the batch)."""
        if precomputed_text(batch, "text") is not None:
            return {}
        n = len(batch["gt"])
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
        return {HIGH_FIELD: text}

    def condition_for_training(self, text: TextCondition, batch: Mapping[str, Any]) -> dict[str, Any]:
        condition: dict[str, Any] = {"text": text}
        if self.uses_lowlevel_attention:
            lowlevel = precomputed_text(batch, "lowlevel_text")
            condition["lowlevel"] = self.prior.encode_text(batch[LOW_FIELD]) if lowlevel is None else lowlevel
        return condition

    def precompute_inputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The base's (GT moments, the text prompt's features) plus the low-level prompt's features for SFA."""
        out = super().precompute_inputs(batch)
        if self.uses_lowlevel_attention:
            out.update(text_fields("lowlevel_text", self.prior.encode_text(batch[LOW_FIELD])))
        return out

    def side_inputs(self, condition: Mapping[str, Any]) -> AbstractContextManager:
        """The low-level prompt embeddings for the ControlNet's SFA blocks."""
        if not self.uses_lowlevel_attention:
            return nullcontext()
        return lowlevel_prompt(self.controlnet, condition["lowlevel"].hidden_states)

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor | Prediction:
        """The network output; in training also the DFC heads' predictions (extras ``dfc``)."""
        if not (self.training and self.hparams.dfc != "none"):
            return super().predict(noisy_latents, timesteps, text, batch)
        with degradation_free_predictions(self.controlnet) as dfc:
            output = super().predict(noisy_latents, timesteps, text, batch)
        return Prediction(output, {"dfc": dfc})

    def auxiliary_losses(
        self, batch: Mapping[str, Any], latents: Tensor, prediction: Prediction
    ) -> dict[str, Tensor]:
        """The DFC term (``dfc_weight`` x L1 of every head, summed; ``models.xpsr.degradation_free_loss``)."""
        predictions = prediction.extras.get("dfc")
        if predictions is None:
            return {}
        return {"dfc": degradation_free_loss(predictions, batch["gt"], latents, self.hparams.dfc_weight)}

    # ------------------------------------------------------------------ inference
    def caption(self, lq: Tensor) -> list[dict[str, str]]:
        """High- and low-level prompts of ``lq`` ``[B, 3, h, w]`` from the configured captioners."""
        missing = [k for k in _CAPTIONERS if k not in self._captioners]
        if missing:
            raise MissingPromptsError(
                f"XPSR needs the {'/'.join(missing)} prompt of every image: give the benchmark a prompt "
                "side-file (benchmark.prompts=<jsonl from `python scripts/extract_prompts.py`>) or configure "
                f"method.captioners.{missing[0]} (configs/method/captioner/) to caption on the fly"
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
        """(cond, uncond) of the sampler for one batch of prompt records (``test.py``'s strings)."""
        high, low = self.inference_texts(records)
        added = self.inference["added_prompt"]
        n = len(records)
        use_negative = self.hparams.use_negative_prompts
        negative = [self.inference["negative_prompt"] if use_negative else ""] * n
        low_negative = [self.inference["lowlevel_negative_prompt"] if use_negative else ""] * n
        if self.hparams.fusion == "low_only":
            return {"text": self.prior.encode_text(low)}, {"text": self.prior.encode_text(low_negative)}
        # official: caption + " " + added prompt (the caption's stray space kept when it is empty)
        cond = {"text": self.prior.encode_text([f"{h} {added}" if added else h for h in high])}
        uncond = {"text": self.prior.encode_text(negative)}
        if self.uses_lowlevel_attention:
            cond["lowlevel"] = self.prior.encode_text(low)
            uncond["lowlevel"] = self.prior.encode_text(low_negative)
        return cond, uncond

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        prompts: Sequence[Mapping[str, str]] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, scale*h, scale*w]`` (``test.py``).

        ``prompts``: one record per image with ``highlevel`` / ``lowlevel`` (a side-file entry); ``None``
        captions ``lq`` with the configured captioners (the official prompts are made from the LR).
        """
        if prompts is None:
            prompts = self.caption(lq)
        if len(prompts) != len(lq):
            raise ValueError(f"got {len(prompts)} prompt records for {len(lq)} images")
        cond, uncond = self.conditions(prompts)
        return self.sample_restored(lq, cond, uncond, self.sampling, generator)


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
    """Load a released XPSR folder (``runs/xpsr/checkpoint-300000/{unet,controlnet}``) into ``module``: the
    whole ControlNet (SFA + DFC heads) and the UNet's ``pixel_attentions``. The key sets must equal ours
    exactly, which holds for the official configuration (``fusion=sfa``, ``dfc=both``, SD-1.5)."""
    module.load_release(folder, PIXEL_ATTR, "XPSR")
