"""Base method for diffusion-prior SR: a frozen latent T2I prior plus trainable condition modules.

The training step is the LDM one of the official trainers (``cswry/SeeSR: train_seesr.py``, ``qyp2000/XPSR:
train.py``, ``PixArt-alpha/PixArt-alpha: train_scripts/train.py`` for DreamClear, ``IceClear/StableSR:
ldm/models/diffusion/ddpm.py``): GT in [-1, 1] -> VAE latent (a posterior sample, x the VAE's scaling); eps ~
N(0, I); t ~ U{0..T-1}; the prompt dropped to the prior's null condition with ``null_prompt_prob``; the noisy
latent and the target come from the prior's schedule (:class:`~restore.methods.objectives.DiffusionObjective`:
epsilon, v, or learned-range variance with its VLB term).

A method (SeeSR, XPSR, ...) is this base plus:

- its trainable modules, built *before* calling the base constructor (usually by a builder function of its
  ``restore/models/<method>.py``) and passed as ``trainable``; prior submodules that train are named in
  ``trainable_prior_modules``; other frozen networks (a tagger, a reference restorer) in ``frozen``;
- :meth:`predict`: its network output for the noisy latents (a tensor, or a :class:`Prediction` carrying extras
  such as XPSR's DFC head outputs);
- optionally :meth:`auxiliary_losses` (extra named terms from the batch and the prediction's extras);
- :meth:`denoise` and :meth:`restore` for inference (:func:`restore.sampling.sampler.sample` runs the loop);
- the class attributes :attr:`requires_weights` / :attr:`takes_prompts`, which eval.py and restore.infer read.

The loss is ``sum(loss_weights[name] * term)`` over the named terms (weight 1 unless configured), each logged as
``train/<name>_loss``, the sum as ``train/loss``. Nothing is written into the batch.

What is trainable is decided once, at construction: every parameter under a *frozen root* (the ``prior`` and the
``frozen`` modules) is frozen, except submodules of the prior's denoiser whose name ends with one of
``trainable_prior_modules``; everything in ``trainable`` trains. Checkpoints follow the same rule:
:meth:`state_dict` leaves out the frozen keys (they are reloaded from the prior's source), so a checkpoint holds
the trainable weights, the EMA state and the per-rank generator states only.

Randomness: degradations, prompt dropout, VAE posterior samples, noise and timesteps are all drawn from one
per-rank ``torch.Generator`` saved in checkpoints, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from restore.data.precomputed_inputs import (
    check_precomputed_source,
    precomputed,
    precomputed_text,
    text_fields,
)
from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.nonfinite_loss import skip_nonfinite_loss
from restore.methods.objectives import DiffusionObjective
from restore.methods.rank_generator import RankGenerator
from restore.methods.training_memory import (
    cast_parameters,
    check_mixed_precision,
    compile_in_place,
    parse_frozen_dtype,
    to_channels_last,
)
from restore.methods.training_pairs import add_synthesised_pairs
from restore.models.priors import LatentPrior, TextCondition, freeze
from restore.models.priors.text import TextCache
from restore.sampling.sampler import SamplingInputs, SamplingSettings, sample

__all__ = ["CheckpointMismatchError", "LatentDiffusionSR", "Prediction", "build", "plain_dict"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`"
)

#: Checkpoint entries written by :class:`LatentDiffusionSR` next to Lightning's.
GENERATOR_CKPT_KEY = "diffusion_generator"
EMA_CKPT_KEY = "ema"
PRIOR_SOURCE_CKPT_KEY = "prior_source"


def plain_dict(value: Any) -> dict[str, Any]:
    """A Hydra DictConfig (or any mapping) as a plain dict (diffusers configs must serialise to JSON)."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    return dict(value)


def build(part: Any) -> Any:
    """``part`` itself, or what it builds when it is a zero-argument factory (a Hydra ``_partial_``)."""
    return part if isinstance(part, nn.Module) else part()


@dataclass
class Prediction:
    """A method's network output in the objective's parametrisation, plus what its extra losses need."""

    output: Tensor
    extras: Mapping[str, Any] = field(default_factory=dict)


class LatentDiffusionSR(L.LightningModule):
    """Frozen latent T2I prior + trainable modules, trained with the prior's diffusion objective.

    Args:
        prior: a :class:`~restore.models.priors.LatentPrior` or a zero-argument factory returning one.
        trainable: the trainable modules (built by the method before calling this constructor).
        trainable_prior_modules: names (suffixes at a dot boundary) of submodules of the prior's denoiser that
            train, e.g. ``("image_attentions",)`` for SeeSR (``train_seesr.py``: "UNet except modules whose name
            ends with --trainable_modules").
        frozen: other frozen networks of the method, attached under their names (not optimised, not written to
            checkpoints), e.g. SeeSR's DAPE tagger.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``), given only the trainable parameters.
        scheduler: optional ``optimizer -> LRScheduler``, stepped every optimisation step.
        degradation: ``deg(hq, generator) -> (lq, gt)`` for HR-only batches (as in ``FeedForwardSR``).
        degradation_seed: base seed of the per-rank generators (degradation and diffusion draws).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; ``None`` = the prior scheduler's config.
        variance_type: ``"learned_range"`` to train a learned variance (MSE + VLB); ``None`` = the prior's.
        loss_weights: ``{term: weight}`` multiplying the named loss terms (default 1 each).
        null_prompt_prob: per-sample probability of the prior's null condition instead of the prompt.
        ema_decay: EMA of the trainable parameters (diffusers ``EMAModel``); ``None`` = off.
        gradient_checkpointing: enable it on the trainable diffusers modules and on the prior's denoiser (the loss
            back-propagates through the frozen denoiser into the condition modules, so its activations count too).
        scale_lr: scale the optimiser's lr with the global batch ``B = batch_size x accumulate_grad_batches x
            world_size``: ``true`` / ``"linear"``: x ``B / lr_base_batch`` (diffusers' ``--scale_lr``);
            ``"sqrt"``: x ``sqrt(B / lr_base_batch)`` (PixArt's ``auto_lr`` rule); ``false``: as configured.
        lr_base_batch: the global batch at which the configured lr applies unscaled.
        skip_nonfinite_loss: on a NaN/inf loss skip the step (all ranks together) instead of stopping.
        text_cache_size: keep the prior's encodings of up to this many distinct prompts (its encoders are
            frozen, so an entry stays valid); 0 = the prior's own setting. Worth it when prompts repeat.
        frozen_dtype: ``"bf16"`` / ``"fp16"``: store the frozen prior weights (VAE, text encoders, the denoiser
            except ``trainable_prior_modules``) in that dtype when training starts; trainable weights stay fp32
            masters. Needs a ``*-mixed`` trainer precision. ``None`` = fp32 (docs/training_memory.md).
        channels_last: store the convolution weights of the prior's VAE and denoiser and of the trainable
            modules channels-last (faster tensor-core convolutions; same maths).
        compile_denoiser: ``torch.compile`` the prior's denoiser in place (parameter names unchanged); ``true`` =
            inductor, or a dynamo backend name.
    """

    #: eval.py / restore.infer refuse to run the method without trained weights (ckpt_path or pretrained=)
    requires_weights: ClassVar[bool] = True
    #: :meth:`restore` takes per-image prompt records (``restore(lq, prompts=[...])``, a benchmark side-file)
    takes_prompts: ClassVar[bool] = False
    #: Subclass ``__init__`` arguments kept out of ``hparams`` (modules, e.g. a frozen tagger).
    hparams_ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        trainable: nn.ModuleDict,
        trainable_prior_modules: Sequence[str] = (),
        frozen: Mapping[str, nn.Module] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        degradation: nn.Module | None = None,
        degradation_seed: int = 0,
        prediction_type: str | None = None,
        variance_type: str | None = None,
        loss_weights: Mapping[str, float] | None = None,
        null_prompt_prob: float = 0.5,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        scale_lr: bool | str = False,
        lr_base_batch: int = 1,
        skip_nonfinite_loss: bool = False,
        text_cache_size: int = 0,
        frozen_dtype: str | None = None,
        channels_last: bool = False,
        compile_denoiser: bool | str = False,
    ) -> None:
        super().__init__()
        # Lightning collects the subclasses' __init__ arguments too: modules they take are named in
        # `hparams_ignore` (hyper-parameters are deep-copied and written to every checkpoint).
        self.save_hyperparameters(
            ignore=[
                "prior",
                "trainable",
                "frozen",
                "optimizer",
                "scheduler",
                "degradation",
                *self.hparams_ignore,
            ],
            logger=False,
        )
        self._plain_hparams()
        if not 0.0 <= null_prompt_prob <= 1.0:
            raise ValueError(f"null_prompt_prob must be in [0, 1], got {null_prompt_prob}")
        if not isinstance(trainable, nn.ModuleDict):
            raise TypeError(f"trainable must be an nn.ModuleDict, got {type(trainable).__name__}")
        self._frozen_roots: list[str] = []
        self.register_frozen("prior", build(prior))
        self.trainable = trainable
        for name, module in (frozen or {}).items():
            self.register_frozen(name, module)
        self._prior_trainable_prefixes = self._unfreeze_prior_modules(tuple(trainable_prior_modules))
        self._check_no_shared_parameters()

        self.objective = DiffusionObjective(
            self.prior.noise_scheduler,
            prediction_type or self.prior.prediction_type,
            variance_type if variance_type is not None else self.prior.variance_type,
        )
        self.loss_weights = {str(k): float(v) for k, v in (loss_weights or {}).items()}
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.__dict__["degradation"] = degradation  # data pipeline, not a submodule (see FeedForwardSR)
        if gradient_checkpointing:
            for module in (*self.trainable.values(), self.prior.denoiser):
                if getattr(module, "_supports_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()
        if text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {text_cache_size}")
        if text_cache_size:
            self.prior.text_cache = TextCache(text_cache_size)
        self.ema = EMAModel(self.trainable_parameters(), decay=ema_decay) if ema_decay is not None else None
        self._ema_reset_pending = False
        self.generator = RankGenerator(degradation_seed)
        self.frozen_dtype = parse_frozen_dtype(frozen_dtype)  # applied in setup("fit"), see there
        if channels_last:
            to_channels_last((self.prior.vae, self.prior.denoiser, *self.trainable.values()))
        if compile_denoiser:
            compile_in_place(self.prior.denoiser, compile_denoiser)

    def setup(self, stage: str) -> None:
        # The cast waits for training to start: a subclass constructor may still load weights into the prior
        # (``pretrained=``), and eval/inference keep their own precision setting. Lightning restores a
        # checkpoint after this hook, but checkpoints hold only trainable keys, which stay fp32.
        if stage == "fit" and self.frozen_dtype is not None:
            check_mixed_precision(self.trainer.precision, self.frozen_dtype)
            self.cast_frozen_prior(self.frozen_dtype)

    def cast_frozen_prior(self, dtype: torch.dtype) -> int:
        """Cast the frozen prior weights to ``dtype`` (trainable ones, incl. ``trainable_prior_modules``, stay
        as they are); returns the number of tensors cast. Lightning calls it through ``frozen_dtype``."""
        return cast_parameters(
            self, dtype, lambda name: name.startswith("prior.") and self._is_frozen_key(name)
        )

    def _plain_hparams(self) -> None:
        # Hydra hands over DictConfig/ListConfig values; checkpoints are read with weights_only=True, which
        # refuses to unpickle them, so hyper-parameters are stored as plain containers.
        for store in (self._hparams, self._hparams_initial):
            for key, value in list(store.items()):
                if isinstance(value, (DictConfig, ListConfig)):
                    store[key] = OmegaConf.to_container(value, resolve=True)

    # ------------------------------------------------------------------ trainable vs frozen
    def register_frozen(self, name: str, module: nn.Module) -> None:
        """Attach a frozen submodule (kept in eval mode, not optimised, not written to checkpoints)."""
        setattr(self, name, freeze(module))
        self._frozen_roots.append(name)

    def _unfreeze_prior_modules(self, names: tuple[str, ...]) -> tuple[str, ...]:
        prefixes = []
        denoiser = self.prior.denoiser
        for name in names:
            found = [
                full for full, _ in denoiser.named_modules() if full == name or full.endswith("." + name)
            ]
            if not found:
                raise ValueError(
                    f"trainable_prior_modules: no submodule of the prior's {self.prior.denoiser_name} is named "
                    f"{name!r}"
                )
            for full in found:
                denoiser.get_submodule(full).requires_grad_(True).train()
                prefixes.append(f"prior.{self.prior.denoiser_name}.{full}")
        return tuple(prefixes)

    def _check_no_shared_parameters(self) -> None:
        # A trainable module holding prior weights would be optimised *and* dropped from checkpoints.
        frozen_ids = {
            id(p) for n, p in self.named_parameters(remove_duplicate=False) if self._is_frozen_key(n)
        }
        if any(id(p) in frozen_ids for p in self.trainable.parameters()):
            raise ValueError(
                "`trainable` shares parameters with the frozen prior: copy them (e.g. ControlNetModel.from_unet) "
                "or name the prior submodule in trainable_prior_modules instead"
            )

    def _is_frozen_key(self, key: str) -> bool:
        """Whether a parameter/buffer name belongs to the frozen part (not optimised, not checkpointed)."""
        if not any(key.startswith(root + ".") for root in self._frozen_roots):
            return False
        return not any(key.startswith(prefix + ".") for prefix in self._prior_trainable_prefixes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser and the EMA see, in a fixed (module) order."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not self._is_frozen_key(n)]

    def train(self, mode: bool = True) -> LatentDiffusionSR:
        super().train(mode)
        for root in self._frozen_roots:  # frozen parts stay in eval mode whatever Lightning asks
            getattr(self, root).eval()
        for prefix in self._prior_trainable_prefixes:
            self.get_submodule(prefix).train(mode)
        return self

    # ------------------------------------------------------------------ training
    @property
    def noise_scheduler(self) -> Any:
        return self.prior.noise_scheduler

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type

    def null_prompt_mask(self, n: int, generator: torch.Generator) -> Tensor:
        """Which of ``n`` samples get the null condition (Bernoulli(null_prompt_prob), from ``generator``)."""
        return torch.rand(n, generator=generator, device=generator.device) < self.hparams.null_prompt_prob

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return add_synthesised_pairs(self, batch)

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor | Prediction:
        """The network output for the training step, in the objective's parametrisation (with the variance
        channels where the prior learns them). Methods add their conditions; the base runs the prior's
        denoiser alone (with any ``trainable_prior_modules`` inside it)."""
        return self.prior.predict(noisy_latents, timesteps, text)

    def auxiliary_losses(
        self, batch: Mapping[str, Any], latents: Tensor, prediction: Prediction
    ) -> dict[str, Tensor]:
        """Extra named loss terms of a training step (e.g. XPSR's DFC), from the batch, the scaled GT latents the
        step noised and the prediction (with its extras). The base has none."""
        return {}

    # ------------------------------------------------------------------ precomputed inputs
    #: hyper-parameters that change what :meth:`precompute_inputs` computes (part of a precomputed set's identity)
    precomputed_settings: ClassVar[tuple[str, ...]] = ()

    def precompute_inputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """What the training step computes with frozen networks, for a batch after ``on_after_batch_transfer``
        (``scripts/precompute_training_inputs.py``, :mod:`restore.data.precomputed_inputs`): the GT's VAE moments and
        the text prompt's features. The draws (posterior sample, prompt dropout, noise, timesteps) stay in the step."""
        n = len(batch["gt"])
        text = self.prior.encode_text(list(batch.get("prompt") or [""] * n))
        return {"gt_moments": self.prior.encode_moments(batch["gt"]), **text_fields("text", text)}

    def precompute_null_text(self) -> dict[str, Tensor]:
        """The prior's null condition (one row) where it is an encoded prompt (SD's ``""``), else nothing: the
        others (SDXL zeros, PixArt's learned caption) need no text encoder in the step."""
        if self.prior.null_prompt is None:
            return {}
        return text_fields("null_text", self.prior.encode_text([self.prior.null_prompt]))

    def precomputed_identity(self) -> dict[str, Any]:
        """What makes precomputed inputs this module's: method, prior, :attr:`precomputed_settings` and the sha256
        of every frozen network that computes them (the prior's VAE and text encoder(s), the method's taggers)."""
        from restore.evaluation.fingerprint import module_digest

        parts = {"vae": self.prior.vae}
        parts.update({name: getattr(self.prior, name, None) for name in self.prior.text_encoder_parts})
        parts.update({root: getattr(self, root) for root in self._frozen_roots if root != "prior"})
        return {
            "method": type(self).__qualname__,
            "prior": self.prior.text_encoder_id,
            "settings": {name: self.hparams.get(name) for name in self.precomputed_settings},
            "weights": {
                name: module_digest(part) for name, part in parts.items() if isinstance(part, nn.Module)
            },
        }

    def training_latents(self, batch: Mapping[str, Any], generator: torch.Generator) -> Tensor:
        """The step's scaled GT latents: a VAE posterior sample, from the batch's precomputed moments when it
        carries them (the same draw, no VAE run)."""
        moments = precomputed(batch, "gt_moments")
        if moments is None:
            return self.prior.encode_images(batch["gt"], generator)
        check_precomputed_source(batch, self.prior.text_encoder_id, type(self).__qualname__)
        return self.prior.latents_from_moments(moments, generator)

    def training_text(self, batch: Mapping[str, Any], prompts: Sequence[str], null: Tensor) -> TextCondition:
        """The step's text condition, rows in ``null`` replaced by the prior's null condition: encoded, or from
        the batch's precomputed features when it carries them (no text encoder run)."""
        text = precomputed_text(batch, "text")
        if text is None:
            return self.prior.encode_text(prompts, null=null)
        added = self.prior.added_conditions(len(text), text.hidden_states.device)
        if added:
            text = TextCondition(text.hidden_states, text.attention_mask, text.pooled, added)
        if not bool(null.any()):
            return text
        null_text = precomputed_text(batch, "null_text")
        if null_text is None:
            null_text = self.prior.null_condition(len(text), like=text)
        return text.where(null, null_text)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        gt = batch["gt"]
        n = len(gt)
        gen = self.generator.get(self, gt.device)
        prompts = list(batch.get("prompt") or [""] * n)
        null = self.null_prompt_mask(n, gen)
        latents = self.training_latents(batch, gen)
        text = self.training_text(batch, prompts, null)
        noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device)
        num_t = self.objective.num_train_timesteps
        timesteps = torch.randint(0, num_t, (n,), generator=gen, device=gen.device).to(latents.device)
        noisy = self.objective.add_noise(latents, noise, timesteps)
        prediction = self.predict(noisy, timesteps, text, batch)
        if isinstance(prediction, Tensor):
            prediction = Prediction(prediction)
        terms = self.objective.losses(prediction.output, latents, noisy, noise, timesteps)
        terms.update(self.auxiliary_losses(batch, latents, prediction))
        unknown = set(self.loss_weights) - set(terms)
        if unknown:
            raise ValueError(
                f"loss_weights names {sorted(unknown)}, but this method's loss terms are {sorted(terms)}"
            )
        loss = sum(self.loss_weights.get(name, 1.0) * value for name, value in terms.items())
        for name, value in terms.items():
            self.log(f"train/{name}_loss", value.detach(), batch_size=n)
        if skip_nonfinite_loss(self, loss, batch_idx, self.hparams.skip_nonfinite_loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("training needs `method.optimizer` (a `_partial_: true` optimizer config)")
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.hparams.scale_lr:
            factor = self._lr_scale_factor(self.hparams.scale_lr, self.hparams.get("lr_base_batch", 1))
            for group in optimizer.param_groups:
                group["lr"] *= factor
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_scale_factor(self, rule: bool | str, base_batch: int) -> float:
        if rule not in (True, "linear", "sqrt"):
            raise ValueError(f"scale_lr must be false, true, 'linear' or 'sqrt', got {rule!r}")
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if not isinstance(batch_size, int):
            raise ValueError("scale_lr needs a datamodule with an integer `batch_size`")
        ratio = batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size / base_batch
        return math.sqrt(ratio) if rule == "sqrt" else ratio

    # ------------------------------------------------------------------ inference
    def denoise(self, latents: Tensor, t: Tensor, condition: Any, spatial: Mapping[str, Tensor]) -> Tensor:
        """The network output for a latent (tile), its condition and its crops of the spatial conditions (the
        sampling loop's :class:`~restore.sampling.sampler.Denoiser`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement denoise()")

    def restore(self, lq: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] (the method's scale)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement restore()")

    def forward(self, lq: Tensor) -> Tensor:
        return self.restore(lq)

    @property
    def evaluation_note(self) -> str | None:
        """Shown next to the method's column in tables and reports: a prior built in code (the tiny test
        priors) has random weights, so its images are noise by design."""
        if self.prior.source is not None:
            return None
        return (
            "tiny random prior (weights built in code, never trained): its images are noise by design; the "
            "column shows the machinery running, not the method's quality"
        )

    def sample(
        self, inputs: SamplingInputs, settings: SamplingSettings, generator: torch.Generator | None = None
    ) -> Tensor:
        """:func:`restore.sampling.sampler.sample` with :meth:`denoise`, the prior's VAE and schedule, under the
        EMA weights; ``settings.seed`` seeds a generator (on ``inputs``' device) when none is given."""
        if generator is None and settings.seed is not None:
            device = next(
                (x.device for x in (inputs.start_reference, inputs.color_reference) if x is not None),
                self.device,
            )
            generator = torch.Generator(device=device).manual_seed(int(settings.seed))
        with self.ema_weights():
            return sample(self.denoise, inputs, self.prior.vae, self.noise_scheduler, settings, generator)

    # ------------------------------------------------------------------ EMA
    def on_train_start(self) -> None:
        if self._ema_reset_pending and self.ema is not None:
            self.ema = EMAModel(self.trainable_parameters(), decay=self.hparams.ema_decay)
            self._ema_reset_pending = False

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the weights changed, once per optimiser step (not per accumulated micro-batch), and
        # before on_train_batch_end, where ModelCheckpoint saves: a checkpoint's EMA includes its last step.
        if self.ema is not None:
            self.ema.to(device=self.device)
            self.ema.step(self.trainable_parameters())

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swap the EMA weights into the trainable parameters (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # ------------------------------------------------------------------ checkpoints: trainable part only
    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and self._is_frozen_key(k[len(prefix) :])]:
            del state[key]
        return state

    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load the trainable weights (the frozen prior comes from its source, not from checkpoints).

        ``strict``: raise :class:`CheckpointMismatchError` when trainable keys are missing or unexpected, or
        when frozen keys are present; otherwise frozen keys are ignored with a warning.
        """
        frozen = [k for k in state_dict if self._is_frozen_key(k)]
        incoming = {k: v for k, v in state_dict.items() if not self._is_frozen_key(k)}
        expected = set(self.state_dict().keys())
        missing = sorted(expected - incoming.keys())
        # Our checkpoints never hold frozen keys: in strict mode they mean weights trained elsewhere that
        # this configuration would silently drop (e.g. another trainable_prior_modules).
        unexpected = sorted((incoming.keys() - expected) | set(frozen if strict else ()))
        if strict and (missing or unexpected):
            raise CheckpointMismatchError(
                f"the checkpoint's trainable weights do not match {type(self).__name__}: "
                f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:5]}). Was it written by another method / config (trainable modules, "
                "trainable_prior_modules)?"
            )
        if frozen:
            rank_zero_warn(f"ignored {len(frozen)} frozen-prior keys in the loaded state dict")
        super().load_state_dict(incoming, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PRIOR_SOURCE_CKPT_KEY] = self.prior.source
        if self.ema is not None:
            checkpoint[EMA_CKPT_KEY] = self.ema.state_dict()
        state = self.generator.state_dict(self)  # every rank calls this hook: the states are gathered
        if state is not None:
            checkpoint[GENERATOR_CKPT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint.get(GENERATOR_CKPT_KEY))
        source = checkpoint.get(PRIOR_SOURCE_CKPT_KEY)
        if source is not None and source != self.prior.source:
            rank_zero_warn(
                f"checkpoint was trained on prior {source!r}, this module uses {self.prior.source!r}"
            )
        saved_ema = checkpoint.get(EMA_CKPT_KEY)
        if self.ema is not None and saved_ema is not None:
            n_params = len(self.trainable_parameters())
            if len(saved_ema["shadow_params"]) != n_params:
                raise CheckpointMismatchError(
                    f"checkpoint EMA has {len(saved_ema['shadow_params'])} tensors, the module {n_params}"
                )
            self.ema.load_state_dict(saved_ema)
            self.ema.to(device=self.device)
        elif self.ema is not None:
            self._ema_reset_pending = True  # weights are loaded after this hook: re-initialise at train start
            rank_zero_warn(
                "EMA is on but the checkpoint has no EMA state: EMA restarts from the loaded weights"
            )
