"""SeeSR stage 1: train DAPE, the LoRA of a RAM student that mimics the frozen RAM teacher on HR images.

Reference: SeeSR (Wu et al., CVPR 2024); official cswry/SeeSR ``basicsr/models/dape_model.py``,
``basicsr/options/dape.yaml``:

- teacher = the original RAM, frozen, in eval mode, on the **HR** image; student = the same RAM with LoRA
  (:func:`restore.models.dape.add_dape_lora`), in train mode (dropout / stochastic depth on, as the official
  ``net_g.train()``), on the **LR upsampled bicubically to the HR size**; both inputs then go through
  ``RAM.preprocess`` (bicubic to 384, clamp, ImageNet mean/std);
- loss = ``MSE(student image embeddings [B,145,512], teacher's)`` + ``bce_weight`` (1.0) x mean
  ``BCE(sigmoid(student logits), sigmoid(teacher logits))`` over the 4585 classes, the teacher's
  probabilities as soft targets (BCE-with-logits here: the official raw ``log`` has no epsilon);
- only the LoRA tensors train (``lora.mark_only_lora_as_trainable``) and only they are saved: checkpoints
  hold the student's LoRA under ``student.*`` (our layout), :meth:`DAPETraining.export_dape` writes the
  official flat ``DAPE.pth``; :func:`restore.models.dape.load_dape` reads both.

Data: the official trainer reads pre-made pairs (COCO resized to 512, Real-ESRGAN degradation, LR saved
bicubic-upsampled as 8-bit PNG). Here pairs are synthesised on the training device in
:meth:`DAPETraining.on_after_batch_transfer` from HR crops (as ``restore.methods.latent_diffusion``), with a
per-rank generator saved in checkpoints; paired batches (``lq`` + ``gt``) are used as they are.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from restore.methods.nonfinite_loss import skip_nonfinite_loss
from restore.methods.rank_generator import RankGenerator
from restore.methods.training_pairs import add_synthesised_pairs
from restore.models.dape import LORA_ALPHA, LORA_RANK, add_dape_lora, save_dape
from restore.models.ram import RAM

__all__ = ["DAPECheckpointMismatchError", "DAPETraining"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`"
)

#: Checkpoint entry holding the per-rank degradation generator states.
GENERATOR_CKPT_KEY = "dape_generator"


class DAPECheckpointMismatchError(RuntimeError):
    """A checkpoint's LoRA tensors do not match the student's (another rank / RAM variant)."""


class DAPETraining(L.LightningModule):
    """DAPE training (SeeSR's ``dape_model.py``): LoRA RAM student on degraded LR vs frozen RAM teacher on HR.

    Args:
        ram: the teacher RAM with its pretrained weights (e.g. ``build_ram("swin_l_384", checkpoint=...)``)
            or a zero-argument factory returning it (a Hydra ``_partial_``). The student is a copy with LoRA.
        lora_rank, lora_alpha: LoRA size and scale (official 8 and 1: updates scaled by 1/8).
        bce_weight: weight of the tag-probability BCE term (official 1.0).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``), given only the LoRA parameters.
        scheduler: optional ``optimizer -> LRScheduler``, stepped every optimisation step (BasicSR).
        degradation: ``deg(hq, generator) -> (lq, gt)`` for HR-only batches; not a submodule.
        degradation_seed: base seed of the per-rank degradation generators.
        scale: LR -> HR factor of the degradation (checked against ``degradation.config.scale``).
        student_train_mode: run the student in train mode (official; dropout 0.1 in the tagging head,
            stochastic depth up to 0.1 in Swin); ``False`` trains it in eval mode.
        gradient_checkpointing: recompute the student's Swin blocks in backward (less activation memory).
        skip_nonfinite_loss: on a NaN/inf loss skip the step (all ranks together) instead of stopping.
    """

    def __init__(
        self,
        ram: RAM | Callable[[], RAM],
        lora_rank: int = LORA_RANK,
        lora_alpha: float = LORA_ALPHA,
        bce_weight: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        degradation: nn.Module | None = None,
        degradation_seed: int = 0,
        scale: int = 4,
        student_train_mode: bool = True,
        gradient_checkpointing: bool = False,
        skip_nonfinite_loss: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["ram", "optimizer", "scheduler", "degradation"], logger=False)
        teacher = ram if isinstance(ram, nn.Module) else ram()
        if not isinstance(teacher, RAM):
            raise TypeError(f"ram must be a RAM (restore.models.ram), got {type(teacher).__name__}")
        student = copy.deepcopy(teacher)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = add_dape_lora(student, rank=lora_rank, alpha=lora_alpha).train(student_train_mode)
        if gradient_checkpointing:
            self.student.visual_encoder.set_grad_checkpointing(True)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.__dict__["degradation"] = degradation  # data pipeline, not a submodule (see FeedForwardSR)
        deg_scale = getattr(getattr(degradation, "config", None), "scale", None)
        if deg_scale is not None and deg_scale != scale:
            raise ValueError(
                f"degradation.scale={deg_scale} but method.scale={scale}: set both to the same value"
            )
        self.generator = RankGenerator(degradation_seed)

    @property
    def scale(self) -> int:
        """LR -> HR factor of the synthesised pairs."""
        return int(self.hparams.scale)

    # ------------------------------------------------------------------ trainable vs frozen
    @staticmethod
    def is_lora_key(key: str) -> bool:
        """Whether a parameter name is a trainable (and checkpointed) student LoRA tensor."""
        return key.startswith("student.") and "lora_" in key

    def lora_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser sees (student LoRA only), in module order."""
        return [p for n, p in self.named_parameters() if self.is_lora_key(n)]

    def train(self, mode: bool = True) -> DAPETraining:
        super().train(mode)
        self.teacher.eval()  # frozen teacher: always eval, whatever Lightning asks
        if not self.hparams.student_train_mode:
            self.student.eval()
        return self

    # ------------------------------------------------------------------ pairs
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return add_synthesised_pairs(self, batch)

    # ------------------------------------------------------------------ loss
    def losses(self, lq: Tensor, gt: Tensor) -> dict[str, Tensor]:
        """``feature`` (MSE of the image embeddings), ``tags`` (soft BCE of the logits) and ``loss``."""
        if lq.shape[-2:] != gt.shape[-2:]:  # official: LR bicubic-upsampled to the HR size (sr_bicubic)
            lq = F.interpolate(lq.float(), size=gt.shape[-2:], mode="bicubic", align_corners=False)
        with torch.no_grad():
            target_embeds, target_logits = self.teacher(self.teacher.preprocess(gt))
        embeds, logits = self.student(self.student.preprocess(lq))
        feature = F.mse_loss(embeds.float(), target_embeds.float())
        tags = F.binary_cross_entropy_with_logits(logits.float(), torch.sigmoid(target_logits.float()))
        return {"feature": feature, "tags": tags, "loss": feature + self.hparams.bce_weight * tags}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        terms = self.losses(batch["lq"], batch["gt"])
        loss = terms["loss"]
        if skip_nonfinite_loss(self, loss, batch_idx, self.hparams.skip_nonfinite_loss):
            return None
        n = len(batch["gt"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/loss_feature", terms["feature"], batch_size=n)
        self.log("train/loss_tags", terms["tags"], batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("training needs `model.optimizer` (a `_partial_: true` optimizer config)")
        optimizer = self.optimizer_factory(self.lora_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: LoRA only
    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and not self.is_lora_key(k[len(prefix) :])]:
            del state[key]
        return state

    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load the student's LoRA (the RAM weights come from the teacher's source, not from checkpoints).

        ``strict``: raise :class:`DAPECheckpointMismatchError` when LoRA keys are missing or unexpected; other
        keys are ignored with a warning.
        """
        incoming = {k: v for k, v in state_dict.items() if self.is_lora_key(k)}
        others = len(state_dict) - len(incoming)
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - incoming.keys()), sorted(incoming.keys() - expected)
        if strict and (missing or unexpected):
            raise DAPECheckpointMismatchError(
                f"the checkpoint's LoRA does not match the student: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); another lora_rank or RAM variant?"
            )
        if others:
            rank_zero_warn(f"ignored {others} non-LoRA keys in the loaded state dict")
        super().load_state_dict(incoming, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.generator.state_dict(self)  # every rank calls this hook: the states are gathered
        if state is not None:
            checkpoint[GENERATOR_CKPT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint.get(GENERATOR_CKPT_KEY))

    def export_dape(self, path: str | Path) -> Path:
        """Write the student's LoRA as an official-layout ``DAPE.pth``."""
        return save_dape(self.student, path)
