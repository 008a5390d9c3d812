"""StableSR stage 2: train the CFW fusion layers of the decoder on the stage-1 model's latents.

StableSR (Wang et al., IJCV 2024, Sec. 3.3); official: ``IceClear/StableSR: ldm/models/autoencoder.py``
(``AutoencoderKLResi``: ``get_input``, ``training_step``, ``configure_optimizers``), ``ldm/modules/losses/
contperceptual.py`` (``LPIPSWithDiscriminator``), ``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml`` and
``scripts/generate_vqgan_data.py`` (the data step); networks in :mod:`restore.models.cfw`.

Data (:func:`make_cfw_pairs`, ``scripts/make_cfw_pairs.py``): a stage-1 model restores degraded pairs (the LR
upsampled to the GT size, 200 respaced DDPM steps from the noised LR latent) and its *final latent* is stored with
the upsampled LR and the GT (:mod:`restore.data.cfw_pairs`).

Training (:class:`StableSRCFW`): the frozen VAE encoder reads the upsampled LR for the two fusion features; the
decoder decodes the stored latent (divided by 0.18215) with fusion weight ``w = 1``; only the fusion layers and a
PatchGAN discriminator train, Adam 5e-5, betas (0.5, 0.9), batch 1 x 8 accumulated. Generator loss, as the
official one evaluates with these settings: ``mean(|x - x_hat| + LPIPS(x, x_hat)) / B`` (the log-variance stays 0:
it is frozen with the decoder) ``+ 0.025 * g`` once ``disc_start`` (501) generator steps are done, with ``g =
-mean(D(x_hat))``; the adaptive GAN weight of taming would need the gradient of the frozen ``conv_out``, so the
official code always falls back to the fixed 0.025. Discriminator: hinge loss, also from step 501.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from restore.atomic_write import atomic_path
from restore.data.cfw_pairs import CFW_FOLDERS
from restore.data.folder_overlap import check_folders_disjoint
from restore.data.image_io import list_images, read_image, to_tensor, write_image
from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.latent_diffusion import build
from restore.models.cfw import INFERENCE_FUSION_WEIGHT, TRAIN_FUSION_WEIGHT, CFWAutoencoder
from restore.models.patch_discriminator import PatchDiscriminator, hinge_discriminator_loss
from restore.models.priors import LatentPrior
from restore.sampling.sampler import decode_latents
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = ["StableSRCFW", "make_cfw_pairs", "trained_cfw_autoencoder"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


def _lpips_vgg() -> nn.Module:
    """pyiqa's LPIPS (VGG, v0.1: taming's ``LPIPS``) as a loss on [0, 1] images; missing weights raise
    :class:`restore.weights.MissingWeightsError` naming the files and how to fetch them."""
    import pyiqa

    from restore.weights import check_metric_weights

    check_metric_weights("lpips-vgg")
    return pyiqa.create_metric("lpips-vgg", as_loss=True, device="cpu")


class StableSRCFW(L.LightningModule):
    """StableSR stage 2 (see the module doc).

    Args:
        prior: the stage-1 prior (or a factory): its VAE is the frozen autoencoder the fusion layers join.
        num_fuse_block / num_grow_ch: the fusion layers' RRDB count and growth (official 2 / 32).
        fusion_weight: ``w`` while training (``fusion_w`` 1.0).
        perceptual_weight: LPIPS weight (1.0; 0 trains without it, e.g. offline without the LPIPS weights).
        disc_weight / disc_start: the fixed GAN weight (0.025) and the generator step it starts at (501).
        disc_layers / disc_channels: the PatchGAN (3 layers, 64 channels).
        optimizer: ``params -> Optimizer`` for both the fusion layers and the discriminator (Adam 5e-5, (0.5, 0.9)).
        accumulate: batches per optimiser step (``accumulate_grad_batches`` 8).
        degradation: must be ``None`` (``train.py`` passes its ``degradation`` group; the pairs are stored).
    """

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        num_fuse_block: int = 2,
        num_grow_ch: int = 32,
        fusion_weight: float = TRAIN_FUSION_WEIGHT,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.025,
        disc_start: int = 501,
        disc_layers: int = 3,
        disc_channels: int = 64,
        optimizer: OptimizerFactory | None = None,
        accumulate: int = 8,
        degradation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["prior", "optimizer", "degradation"], logger=False)
        if degradation is not None:
            raise ValueError(
                "StableSRCFW trains on stored CFW pairs (scripts/make_cfw_pairs.py), not on degraded HR images: "
                "set degradation=null"
            )
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.automatic_optimization = False  # a generator and a discriminator, stepped in turn
        prior_module = build(prior)
        vae = prior_module.vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.cfw = CFWAutoencoder(
            vae,
            num_fuse_block=num_fuse_block,
            num_grow_ch=num_grow_ch,
            fusion_weight=INFERENCE_FUSION_WEIGHT,
            train_fusion_weight=fusion_weight,
        )
        self.discriminator = PatchDiscriminator(3, disc_channels, disc_layers)
        self.optimizer_factory = optimizer
        # generator updates done: decides when the GAN terms start; a buffer, so resuming restores it
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        self.__dict__["perceptual"] = (
            None  # frozen LPIPS, built on first use, not a submodule (not checkpointed)
        )

    # ------------------------------------------------------------------ trainable part only in checkpoints
    def _is_frozen_key(self, key: str) -> bool:
        return key.startswith("cfw.vae.")

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and self._is_frozen_key(k[len(prefix) :])]:
            del state[key]
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise CheckpointMismatchError(
                f"CFW checkpoint: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}) keys: is it a StableSRCFW checkpoint with the same fusion layers?"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def train(self, mode: bool = True) -> StableSRCFW:
        super().train(mode)
        self.cfw.vae.eval()  # frozen
        return self

    # ------------------------------------------------------------------ losses
    def perceptual_loss(self, target: Tensor, output: Tensor) -> Tensor:
        """LPIPS per sample ``[B, 1, 1, 1]`` of images in [-1, 1]."""
        if self.perceptual is None:
            self.__dict__["perceptual"] = _lpips_vgg().to(self.device).eval().requires_grad_(False)
        value = self.perceptual((output.float() + 1) / 2, (target.float() + 1) / 2)
        return value.reshape(-1, 1, 1, 1)

    def reconstruct(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(gt, x_hat)`` in [-1, 1]: the stored latent decoded with the fused features of the batch's LR."""
        lq = batch["lq"].float() * 2 - 1
        gt = batch["gt"].float() * 2 - 1
        with torch.no_grad():
            _, features = self.cfw.encode_with_features(lq)
        latent = batch["latent"].float() / self.scaling_factor
        return gt, self.cfw.decode(latent, features, float(self.hparams.fusion_weight))

    def generator_loss(self, gt: Tensor, output: Tensor, gan_on: bool) -> dict[str, Tensor]:
        hp = self.hparams
        rec = (gt - output).abs()
        if hp.perceptual_weight > 0:
            rec = rec + hp.perceptual_weight * self.perceptual_loss(gt, output)
        terms = {"rec": rec.mean() / len(gt)}  # official: torch.mean(nll) / batch size
        self.discriminator.requires_grad_(False)  # the generator's loss must not train D
        terms["g"] = -self.discriminator(output).mean()
        self.discriminator.requires_grad_(True)
        terms["loss"] = terms["rec"] + (hp.disc_weight * terms["g"] if gan_on else 0.0 * terms["g"])
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        gan_on = int(self.generator_steps) >= hp.disc_start
        gt, output = self.reconstruct(batch)
        terms = self.generator_loss(gt, output, gan_on)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"non-finite CFW loss at batch {batch_idx}: {float(terms['loss'])}")
        self.manual_backward(terms["loss"] / hp.accumulate)
        d_loss = hinge_discriminator_loss(self.discriminator(gt), self.discriminator(output.detach()))
        if gan_on:
            self.manual_backward(d_loss / hp.accumulate)
        if (batch_idx + 1) % hp.accumulate == 0:
            for opt in (opt_g, opt_d):
                opt.step()
                opt.zero_grad(set_to_none=True)
            self.generator_steps += 1
        n = len(gt)
        self.log("train/rec_loss", terms["rec"].detach(), batch_size=n)
        self.log("train/g_loss", terms["g"].detach(), batch_size=n)
        self.log("train/disc_loss", d_loss.detach(), batch_size=n)
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, batch_size=n)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("training needs `method.optimizer` (a `_partial_: true` optimizer config)")
        fusion = [p for p in self.cfw.fusion_parameters() if p.requires_grad]
        return [self.optimizer_factory(fusion), self.optimizer_factory(list(self.discriminator.parameters()))]


def trained_cfw_autoencoder(
    checkpoint: str | os.PathLike, vae: nn.Module, fusion_weight: float = INFERENCE_FUSION_WEIGHT
) -> CFWAutoencoder:
    """The CFW autoencoder of a ``train.py experiment=stablesr_cfw`` checkpoint on the stage-1 prior's ``vae``
    (shared, frozen), for inference with fusion weight ``w`` (``--dec_w`` 0.5)."""
    from restore.weights import missing_weight_file

    path = Path(checkpoint)
    if not path.is_file():
        raise missing_weight_file(path, "method.decoder.checkpoint")
    checkpoint = load_checkpoint_file(
        path,
        written_by="train.py experiment=stablesr_cfw (a Lightning checkpoint)",
        fix="give that run's checkpoints/last.ckpt (method.decoder.checkpoint)",
    )
    state = checkpoint.get("state_dict", checkpoint)
    hparams = checkpoint.get("hyper_parameters", {})
    fusion = {k[len("cfw.") :]: v for k, v in state.items() if k.startswith("cfw.fusion_layer_")}
    if not fusion:
        raise CheckpointMismatchError(
            f"{path}: no cfw.fusion_layer_* weights (not a StableSRCFW checkpoint?)"
        )
    model = CFWAutoencoder(
        vae,
        num_fuse_block=int(hparams.get("num_fuse_block", 2)),
        num_grow_ch=int(hparams.get("num_grow_ch", 32)),
        fusion_weight=float(fusion_weight),
    )
    missing, unexpected = model.load_state_dict(fusion, strict=False)
    missing = [k for k in missing if not k.startswith("vae.")]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path}: fusion layers missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- data step
def make_cfw_pairs(
    stage1: Any,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    lq_folder: str = "lr",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, int]:
    """Run ``stage1`` (a :class:`~restore.methods.stablesr.StableSR`) on the pairs of ``pairs`` (``gt/`` and
    ``lq_folder``, e.g. from ``scripts/make_training_pairs.py --preset stablesr_mild --crop 512``) and write the CFW
    pair set to ``out`` (:mod:`restore.data.cfw_pairs`).

    Pair ``k`` (in sorted order) is sampled with a generator seeded ``seed + k`` (batch ``b`` uses its first
    pair's), so a killed run resumes where it stopped (pairs whose latent exists are kept) and gives what one
    uninterrupted run with the same batch size gives. Non-finite samples are skipped, as the official script
    does. Returns ``{"written", "kept", "skipped_nonfinite"}``.
    """
    from restore.methods.stablesr import upsample_bicubic

    pairs, out = Path(pairs), Path(out)
    gt_paths = list_images(pairs / "gt")
    lq_dir = pairs / lq_folder
    check_folders_disjoint([pairs / "gt", lq_dir], [out / folder for folder in CFW_FOLDERS], "pairs", "out")
    if not gt_paths:
        raise FileNotFoundError(f"no GT images in '{pairs / 'gt'}'")
    if limit is not None:
        gt_paths = gt_paths[:limit]
    for folder in CFW_FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    todo = [(k, p) for k, p in enumerate(gt_paths) if not (out / "latents" / f"{p.stem}.npy").exists()]
    counts = {"written": 0, "kept": len(gt_paths) - len(todo), "skipped_nonfinite": 0}
    device = next(stage1.parameters()).device
    with tqdm(
        total=len(gt_paths), initial=counts["kept"], desc="CFW pairs", unit="pair", disable=not progress
    ) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            gts = torch.stack([to_tensor(read_image(p)) for _, p in chunk]).to(device)
            lqs = [_find_lq(lq_dir, p.stem) for _, p in chunk]
            lq = torch.stack([to_tensor(read_image(p)) for p in lqs]).to(device)
            lq_up = upsample_bicubic(lq, gts.shape[-2:])
            generator = torch.Generator(device=device).manual_seed(seed + chunk[0][0])
            with torch.no_grad():
                latents = stage1.final_latents(lq_up, generator)
                samples = decode_latents(
                    stage1.prior.vae, latents
                )  # official decode_first_stage, for checking
            for i, (_, path) in enumerate(chunk):
                if not torch.isfinite(latents[i]).all():
                    counts["skipped_nonfinite"] += 1
                    log.warning("pair %s: non-finite latent, skipped (as the official script)", path.stem)
                    continue
                name = path.stem
                write_image(out / "inputs" / f"{name}.png", lq_up[i].cpu(), overwrite=True)
                write_image(out / "gts" / f"{name}.png", gts[i].cpu(), overwrite=True)
                write_image(out / "samples" / f"{name}.png", samples[i].cpu(), overwrite=True)
                _save_npy_atomically(out / "latents" / f"{name}.npy", latents[i : i + 1].cpu().numpy())
                counts["written"] += 1
            bar.update(len(chunk))
    return counts


def _find_lq(folder: Path, stem: str) -> Path:
    for suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no LR image '{stem}.*' in '{folder}' for the GT of that name")


def _save_npy_atomically(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array.astype(np.float32))
