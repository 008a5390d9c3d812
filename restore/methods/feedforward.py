"""Feed-forward SR trained on pairs synthesised on the fly (Real-ESRNet style: RRDBNet + L1).

The smallest complete method of the framework: it exercises the data -> degradation -> network -> loss ->
checkpoint -> resume path that the diffusion methods share, and it is a real baseline (Real-ESRNet x4plus,
Wang et al. 2021, ``options/train_realesrnet_x4plus.yml``).

Pair synthesis runs in :meth:`FeedForwardSR.on_after_batch_transfer`, i.e. batched on the training device,
from a ``torch.Generator`` seeded per rank. The generator state is saved in every checkpoint and restored
on resume, so a resumed run draws the same degradations as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restore.methods.nonfinite_loss import skip_nonfinite_loss
from restore.methods.rank_generator import RankGenerator, mixed_seed
from restore.methods.training_pairs import add_synthesised_pairs, degrade_on_device
from restore.models.basicsr_weights import load_basicsr_state_dict

__all__ = ["FeedForwardSR"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

# Pair synthesis belongs to the method (it needs the training device and the checkpointed generator), so the
# hook is overridden on purpose; Lightning warns about that whenever a datamodule is used as well.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`"
)

#: Checkpoint entry holding the per-rank degradation generator states.
GENERATOR_CKPT_KEY = "degradation_generator"
#: Distinct seed-sequence stream for validation degradations, so they never replay training draws.
_VAL_STREAM = 1


def _psnr(sr: Tensor, gt: Tensor) -> Tensor:
    """Per-image RGB PSNR in dB of [0, 1] images, on the common top-left region (GT may be a few px larger)."""
    h, w = min(sr.shape[-2], gt.shape[-2]), min(sr.shape[-1], gt.shape[-1])
    mse = (sr[..., :h, :w].float() - gt[..., :h, :w].float()).pow(2).mean(dim=(-3, -2, -1))
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


class FeedForwardSR(L.LightningModule):
    """A feed-forward SR network trained with L1 to the degradation's ``gt`` on synthesised pairs.

    Args:
        net: the SR network, ``(B, 3, h, w) -> (B, 3, h*s, w*s)`` (e.g. :class:`restore.models.rrdbnet.RRDBNet`).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); needed for training only.
        scheduler: optional ``optimizer -> LRScheduler``, stepped every optimisation step (as BasicSR does).
        degradation: ``deg(hq, generator) -> (lq, gt)`` used when a batch holds only ``"hq"``.
            Deliberately not a submodule: it is part of the data pipeline, so its buffers stay out of
            checkpoints and evaluation can build the method without it.
        degradation_seed: base seed of the per-rank synthesis generators.
        pretrained: optional BasicSR-format weights for ``net`` (e.g. ESRGAN_SRx4_DF2KOST_official-ff704c30.pth).
        pretrained_key: entry of that file to load (``params_ema``; ``null`` for a bare state dict).
        skip_nonfinite_loss: on a NaN/inf loss, skip the step (all ranks together) instead of stopping.
    """

    #: eval.py / restore.infer refuse to score a randomly initialised network
    requires_weights = True
    takes_prompts = False

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        degradation: nn.Module | None = None,
        degradation_seed: int = 0,
        pretrained: str | None = None,
        pretrained_key: str | None = "params_ema",
        skip_nonfinite_loss: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "degradation"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.__dict__["degradation"] = degradation  # bypass nn.Module registration, see the class docstring
        self._check_scales()
        if pretrained:
            self._load_pretrained(pretrained, pretrained_key)
        self.generator = RankGenerator(degradation_seed)

    # ------------------------------------------------------------------ construction helpers
    @property
    def scale(self) -> int:
        """Upscaling factor of ``net`` (its ``scale`` attribute)."""
        scale = getattr(self.net, "scale", None)
        if not isinstance(scale, int):
            raise AttributeError(f"{type(self.net).__name__} has no integer `scale` attribute")
        return scale

    def _check_scales(self) -> None:
        deg_scale = getattr(getattr(self.degradation, "config", None), "scale", None)
        net_scale = getattr(self.net, "scale", None)
        if deg_scale is not None and net_scale is not None and deg_scale != net_scale:
            raise ValueError(
                f"degradation.scale={deg_scale} but model.net.scale={net_scale}: the synthesised LR would not "
                "match the network; set both to the same value"
            )

    def _load_pretrained(self, path: str, key: str | None) -> None:
        try:
            state = load_basicsr_state_dict(path, key)
            self.net.load_state_dict(state, strict=True)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
            raise type(err)(f"cannot load `method.pretrained={path}` (key {key!r}): {err}") from err

    # ------------------------------------------------------------------ inference
    def restore(self, lq: Tensor) -> Tensor:
        """Super-resolve an LR batch of any size: pads to ``net.input_multiple`` (reflect) and crops back."""
        multiple = int(getattr(self.net, "input_multiple", 1))
        h, w = lq.shape[-2:]
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            mode = "reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"
            lq = F.pad(lq, (0, pad_w, 0, pad_h), mode=mode)
        return self.net(lq)[..., : h * self.scale, : w * self.scale]

    def forward(self, lq: Tensor) -> Tensor:
        return self.restore(lq)

    # ------------------------------------------------------------------ pair synthesis
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return add_synthesised_pairs(self, batch)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        sr = self.net(batch["lq"])
        loss = F.l1_loss(sr, batch["gt"])
        if skip_nonfinite_loss(self, loss, batch_idx, self.hparams.skip_nonfinite_loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(sr))
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("training needs `method.optimizer` (a `_partial_: true` optimizer config)")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ validation / prediction
    def _val_pairs(self, batch: dict[str, Any], batch_idx: int) -> list[tuple[Tensor, Tensor]]:
        """(lq, gt) per image (sizes may differ): paired data as is, HR-only data degraded with a seed fixed
        by the batch index, so the validation inputs are the same at every validation run."""
        if "lq" in batch:
            if "gt" not in batch:
                raise ValueError(
                    "validation needs GT images: use a paired dataset (with 'gt') or an HR dataset"
                )
            lqs, gts = batch["lq"], batch["gt"]
        else:
            images = _per_image(batch["hq"])
            gen = torch.Generator(device=images[0].device)
            gen.manual_seed(
                mixed_seed(self.hparams.degradation_seed, _VAL_STREAM, self.global_rank, batch_idx)
            )
            return [degrade_on_device(self.degradation, hq, gen) for hq in images]
        return list(zip(_per_image(lqs), _per_image(gts), strict=True))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        psnrs = []
        for lq, gt in self._val_pairs(batch, batch_idx):
            sr = self.restore(lq).clamp(0, 1)
            sr = torch.round(sr * 255.0) / 255.0  # score what a saved 8-bit PNG would hold
            psnrs.append(_psnr(sr, gt))
        psnr = torch.cat(psnrs)
        self.log("val/psnr", psnr.mean(), sync_dist=True, batch_size=len(psnr))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"sr": list of (3, H, W) in [0, 1], "key": list of str}`` for the image writer."""
        srs = [self.restore(lq).clamp(0, 1)[0] for lq in _per_image(batch["lq"])]
        return {"sr": srs, "key": list(batch["key"])}

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.generator.state_dict(self)  # every rank calls this hook: the states are gathered
        if state is not None:
            checkpoint[GENERATOR_CKPT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint.get(GENERATOR_CKPT_KEY))


def _per_image(images: Tensor | list[Tensor]) -> list[Tensor]:
    """(1, C, H, W) tensors from a stacked batch or from the list that variable-size collation yields."""
    if isinstance(images, Tensor):
        return list(images.split(1))
    return [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
