"""Base method for diffusion-prior SR: a frozen latent T2I prior plus trainable condition modules.

Spec: ``../shared/specs/seesr_xpsr.md`` §1.5 (SeeSR training step: GT in [-1, 1] -> ``vae.encode(...)
.latent_dist.sample() x 0.18215``, eps ~ N(0, I), t ~ U{0..999}, ``add_noise``, prompt replaced by "" with
p=0.5, loss = MSE(eps_hat, eps); AdamW 5e-5 / wd 1e-2; no EMA; ``--scale_lr`` off; frozen VAE / text encoder /
UNet except modules whose name ends with ``--trainable_modules``); §2 (XPSR, same step); and
``dreamclear_supir_stablesr.md`` §3.4 (StableSR: fixed "" prompt, epsilon, t ~ U{0..999}).

Subclasses (SeeSR, XPSR, ...) provide the trainable modules (``trainable`` / :meth:`build_trainable`), name the
prior submodules that train (``trainable_prior_modules``) and implement :meth:`predict_noise`.

What is trainable is decided once, at construction: every parameter under a *frozen root* (the ``prior``, plus
roots added with :meth:`register_frozen`, e.g. a tagger) is frozen, except submodules of the prior UNet whose
name ends with one of ``trainable_prior_modules``; everything in ``trainable`` trains. Checkpoints follow the same
rule: :meth:`state_dict` leaves out the frozen keys (they are reloaded from the prior's source), so a checkpoint
holds the trainable weights, the EMA state and the per-rank generator states only.

Randomness: degradations, prompt dropout, VAE posterior samples, noise and timesteps are all drawn from one
per-rank ``torch.Generator`` saved in checkpoints, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.nonfinite_loss import skip_nonfinite_loss
from restore.methods.rank_generator import RankGenerator
from restore.methods.training_pairs import add_synthesised_pairs
from restore.models.priors import FrozenPrior, freeze
from restore.sampling.sampler import SamplingSettings, resize_bicubic, sample, upscale_for_sampling

__all__ = ["CheckpointMismatchError", "LatentDiffusionSR", "plain_dict"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`"
)

#: Checkpoint entries written by :class:`LatentDiffusionSR` next to Lightning's.
GENERATOR_CKPT_KEY = "diffusion_generator"
EMA_CKPT_KEY = "ema"
PRIOR_SOURCE_CKPT_KEY = "prior_source"

PREDICTION_TYPES = ("epsilon", "v_prediction")


def plain_dict(value: Any) -> dict[str, Any]:
    """A Hydra DictConfig (or any mapping) as a plain dict (diffusers configs must serialise to JSON)."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    return dict(value)


class LatentDiffusionSR(L.LightningModule):
    """Frozen latent T2I prior + trainable modules, trained with the LDM noise-prediction loss.

    Args:
        prior: a :class:`FrozenPrior` or a zero-argument factory returning one (a Hydra ``_partial_``).
        trainable: the trainable modules; ``None`` calls :meth:`build_trainable` (subclasses).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``), given only the trainable parameters.
        scheduler: optional ``optimizer -> LRScheduler``, stepped every optimisation step.
        degradation: ``deg(hq, generator) -> (lq, gt)`` for HR-only batches (as in ``FeedForwardSR``).
        degradation_seed: base seed of the per-rank generators (degradation and diffusion draws).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; ``None`` = the prior scheduler's config.
        null_prompt_prob: per-sample probability of replacing the prompt by "" (SeeSR: 0.5).
        ema_decay: EMA of the trainable parameters (diffusers ``EMAModel``); ``None`` = off (SeeSR: off).
        gradient_checkpointing: enable it on the trainable diffusers modules and on the prior UNet (the loss
            back-propagates through the frozen UNet into the condition modules, so its activations count too).
        scale_lr: multiply the optimiser's lr by ``batch_size x accumulate_grad_batches x world_size``.
        trainable_prior_modules: names (suffixes at a dot boundary) of prior-UNet submodules that train, e.g.
            ``("image_attentions",)`` for SeeSR (spec §1.5: "UNet except modules whose name ends with
            --trainable_modules"); defaults to the class attribute of the same name.
        skip_nonfinite_loss: on a NaN/inf loss skip the step (all ranks together) instead of stopping.
        text_cache_size: keep the text-encoder output of up to this many distinct prompts (the encoder is
            frozen, so a cached embedding stays valid); 0 = off. Worth it when prompts repeat (tags, "" of the
            null-prompt dropout, a fixed negative prompt at inference).
    """

    #: Default of the ``trainable_prior_modules`` argument, for subclasses.
    trainable_prior_modules: tuple[str, ...] = ()
    #: Subclass ``__init__`` arguments kept out of ``hparams`` (modules, e.g. a frozen tagger).
    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        prior: FrozenPrior | Callable[[], FrozenPrior],
        trainable: nn.ModuleDict | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        degradation: nn.Module | None = None,
        degradation_seed: int = 0,
        prediction_type: str | None = None,
        null_prompt_prob: float = 0.5,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        scale_lr: bool = False,
        trainable_prior_modules: Sequence[str] | None = None,
        skip_nonfinite_loss: bool = False,
        text_cache_size: int = 0,
    ) -> None:
        super().__init__()
        # Lightning collects the subclasses' __init__ arguments too: modules they take are named in
        # `hparams_ignore` (hyper-parameters are deep-copied and written to every checkpoint).
        self.save_hyperparameters(
            ignore=["prior", "trainable", "optimizer", "scheduler", "degradation", *self.hparams_ignore],
            logger=False,
        )
        self._plain_hparams()
        if not 0.0 <= null_prompt_prob <= 1.0:
            raise ValueError(f"null_prompt_prob must be in [0, 1], got {null_prompt_prob}")
        self._frozen_roots: list[str] = []
        self.register_frozen("prior", prior if isinstance(prior, FrozenPrior) else prior())
        self.trainable = trainable if trainable is not None else self.build_trainable(self.prior)
        if not isinstance(self.trainable, nn.ModuleDict):
            raise TypeError(f"trainable must be an nn.ModuleDict, got {type(self.trainable).__name__}")
        names = self.trainable_prior_modules if trainable_prior_modules is None else trainable_prior_modules
        self._prior_trainable_prefixes = self._unfreeze_prior_modules(tuple(names))
        self._check_no_shared_parameters()

        configured = self.prior.noise_scheduler.config.prediction_type
        self.prediction_type = prediction_type or configured
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )

        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.__dict__["degradation"] = degradation  # data pipeline, not a submodule (see FeedForwardSR)
        if gradient_checkpointing:
            for module in (*self.trainable.values(), self.prior.unet):
                if getattr(module, "_supports_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()

        if text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {text_cache_size}")
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.ema = EMAModel(self.trainable_parameters(), decay=ema_decay) if ema_decay is not None else None
        self._ema_reset_pending = False
        self.generator = RankGenerator(degradation_seed)

    def _plain_hparams(self) -> None:
        # Hydra hands over DictConfig/ListConfig values; checkpoints are read with weights_only=True, which
        # refuses to unpickle them, so hyper-parameters are stored as plain containers.
        for store in (self._hparams, self._hparams_initial):
            for key, value in list(store.items()):
                if isinstance(value, (DictConfig, ListConfig)):
                    store[key] = OmegaConf.to_container(value, resolve=True)

    # ------------------------------------------------------------------ trainable vs frozen
    def build_trainable(self, prior: FrozenPrior) -> nn.ModuleDict:
        """The trainable modules when none are passed; subclasses build them here (e.g. a ControlNet)."""
        raise NotImplementedError(f"{type(self).__name__} needs `trainable` or a build_trainable() override")

    def register_frozen(self, name: str, module: nn.Module) -> None:
        """Attach a frozen submodule (kept in eval mode, not optimised, not written to checkpoints)."""
        setattr(self, name, freeze(module))
        self._frozen_roots.append(name)

    def _unfreeze_prior_modules(self, names: tuple[str, ...]) -> tuple[str, ...]:
        prefixes = []
        unet = self.prior.unet
        for name in names:
            found = [full for full, _ in unet.named_modules() if full == name or full.endswith("." + name)]
            if not found:
                raise ValueError(f"trainable_prior_modules: no submodule of the prior UNet is named {name!r}")
            for full in found:
                unet.get_submodule(full).requires_grad_(True).train()
                prefixes.append(f"prior.unet.{full}")
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

    # ------------------------------------------------------------------ diffusion pieces
    @property
    def noise_scheduler(self) -> Any:
        return self.prior.noise_scheduler

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[0, 1] images -> scaled VAE latents (a posterior sample, float32), as SD training does."""
        vae = self.prior.vae
        posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # None for SD 1.x / 2.x
        return ((posterior.sample(generator=generator) - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder last hidden states of ``prompts`` padded to the tokenizer's max length.

        With ``text_cache_size > 0`` only prompts not seen recently go through the encoder (least recently
        used ones are evicted); results equal the uncached ones up to the float rounding of another batch
        composition inside the encoder (~1e-7).
        """
        prompts = list(prompts)
        size = int(self.hparams.get("text_cache_size", 0))
        if size == 0:
            return self._run_text_encoder(prompts)
        cache = self._text_cache
        new = list(dict.fromkeys(p for p in prompts if p not in cache))
        if new:
            for prompt, embedding in zip(new, self._run_text_encoder(new), strict=True):
                cache[prompt] = embedding
        rows = []
        for prompt in prompts:
            cache.move_to_end(prompt)
            rows.append(cache[prompt])
        out = torch.stack(rows).to(self.device)
        while len(cache) > size:
            cache.popitem(last=False)
        return out

    def _run_text_encoder(self, prompts: list[str]) -> Tensor:
        tok = self.prior.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.prior.text_encoder(ids)[0]

    def null_prompt_mask(self, n: int, generator: torch.Generator) -> Tensor:
        """Which of ``n`` samples get the empty prompt (Bernoulli(null_prompt_prob), from ``generator``)."""
        return torch.rand(n, generator=generator, device=generator.device) < self.hparams.null_prompt_prob

    def diffusion_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """epsilon: the noise; v_prediction: ``sqrt(a_t) eps - sqrt(1 - a_t) x0`` (``scheduler.get_velocity``)."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def predict_noise(
        self, noisy_latents: Tensor, timesteps: Tensor, text_embeddings: Tensor, batch: dict[str, Any]
    ) -> Tensor:
        """The network output in the ``prediction_type`` parametrisation. Subclasses add their conditions;
        the base runs the prior UNet alone (with any ``trainable_prior_modules`` inside it)."""
        return self.prior.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample

    def auxiliary_losses(self, batch: dict[str, Any], latents: Tensor) -> dict[str, Tensor]:
        """Extra loss terms of a training step, added to the diffusion loss and logged as ``train/<name>``
        (e.g. XPSR's DFC). Called right after :meth:`predict_noise` on the same batch; ``latents`` are the
        scaled GT latents the step noised. Subclasses override; the base has none."""
        return {}

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return add_synthesised_pairs(self, batch)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        gt = batch["gt"]
        n = len(gt)
        gen = self.generator.get(self, gt.device)
        prompts = list(batch.get("prompt") or [""] * n)
        drop = self.null_prompt_mask(n, gen).tolist()
        prompts = ["" if d else p for p, d in zip(prompts, drop, strict=True)]
        latents = self.encode_images(gt, gen)
        text = self.encode_prompts(prompts)
        noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device)
        num_t = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_t, (n,), generator=gen, device=gen.device).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.diffusion_target(latents, noise, timesteps)
        pred = self.predict_noise(noisy, timesteps, text, batch)
        loss = F.mse_loss(pred.float(), target.float())  # float32 whatever the autocast dtype
        extra = self.auxiliary_losses(batch, latents)
        if extra:
            self.log("train/diffusion_loss", loss.detach(), batch_size=n)
            for name, value in extra.items():
                self.log(f"train/{name}", value.detach(), batch_size=n)
            loss = loss + sum(extra.values())
        if skip_nonfinite_loss(self, loss, batch_idx, self.hparams.skip_nonfinite_loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("training needs `model.optimizer` (a `_partial_: true` optimizer config)")
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.hparams.scale_lr:
            factor = self._lr_scale_factor()
            for group in optimizer.param_groups:
                group["lr"] *= factor
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_scale_factor(self) -> int:
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if not isinstance(batch_size, int):
            raise ValueError("scale_lr=true needs a datamodule with an integer `batch_size`")
        return batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size

    # ------------------------------------------------------------------ inference
    def denoise(self, latents: Tensor, t: Tensor, condition: Any, image: Tensor) -> Tensor:
        """The network output for a latent (tile), its conditions and its LR image crop (sampling loop)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement denoise()")

    def sample_restored(
        self,
        lq: Tensor,
        cond: Any,
        uncond: Any,
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The shared tail of the ControlNet-style methods' ``restore``: upscale ``lq`` for sampling, run
        :func:`restore.sampling.sampler.sample` with :meth:`denoise` under the EMA weights (``settings.seed``
        when no generator is given), and resize to exactly ``upscale x`` the input (colour fix before)."""
        lr_up, out_size = upscale_for_sampling(lq, settings.upscale, settings.process_size)
        if generator is None and settings.seed is not None:
            generator = torch.Generator(device=lq.device).manual_seed(int(settings.seed))
        with self.ema_weights():
            image = sample(
                self.denoise,
                cond,
                uncond,
                lr_up,
                vae=self.prior.vae,
                scheduler=self.noise_scheduler,
                settings=settings,
                generator=generator,
            )
        return resize_bicubic(image, out_size)

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
