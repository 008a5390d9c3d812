"""StableSR stage 2 (restore.methods.stablesr_cfw, restore.data.cfw_pairs): the data step from a stage-1 model,
training the fusion layers against the PatchGAN, and the trained decoder inside StableSR's inference
(official: IceClear/StableSR scripts/generate_vqgan_data.py, ldm/models/autoencoder.py AutoencoderKLResi)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from restore.data.cfw_pairs import CFWPairDataset, cfw_pair_names
from restore.data.image_io import write_image
from restore.methods.stablesr import StableSR
from restore.methods.stablesr_cfw import StableSRCFW, make_cfw_pairs, trained_cfw_autoencoder
from restore.models.cfw import CFWAutoencoder
from restore.models.patch_discriminator import PatchDiscriminator, hinge_discriminator_loss
from restore.models.priors import tiny_prior
from restore.models.stablesr import tiny_stablesr_encoder_config

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SAMPLING = {"scheduler": "iddpm", "variance": "fixed_small", "num_steps": 2, "guidance_scale": 1.0,
            "latent_tile": 16, "latent_tile_overlap": 8, "seed": 0, "progress": False}  # fmt: skip


def _stage1(**kwargs) -> StableSR:
    torch.manual_seed(0)
    return StableSR(
        prior=tiny_prior(),
        encoder=tiny_stablesr_encoder_config(),
        sft_hidden=16,
        input_size=32,
        pair_pool=0,
        sampling=SAMPLING,
        **kwargs,
    ).eval()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A stored pair set (gt/ 32², lr/ 8²), as scripts/make_training_pairs.py writes one."""
    root = tmp_path_factory.mktemp("pairs")
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        gt = torch.rand(3, 32, 32, generator=gen)
        write_image(root / "gt" / f"{i:07d}.png", gt)
        write_image(root / "lr" / f"{i:07d}.png", torch.nn.functional.avg_pool2d(gt[None], 4)[0])
    return root


@pytest.fixture(scope="module")
def cfw_pairs(pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cfw")
    assert make_cfw_pairs(_stage1(), pairs, out, progress=False) == {
        "written": 3,
        "kept": 0,
        "skipped_nonfinite": 0,
    }
    return out


def test_data_step_writes_the_official_layout_and_resumes(pairs, cfw_pairs, tmp_path) -> None:
    assert cfw_pair_names(cfw_pairs) == ["0000000", "0000001", "0000002"]
    latent = np.load(cfw_pairs / "latents/0000001.npy")
    assert latent.shape == (1, 4, 4, 4) and latent.dtype == np.float32
    assert (cfw_pairs / "samples/0000001.png").is_file()
    item = CFWPairDataset(cfw_pairs)[1]
    assert item["lq"].shape == item["gt"].shape == (3, 32, 32) and item["latent"].shape == (4, 4, 4)
    # interrupted after one pair, then the same command: the rest is made, and equals one uninterrupted run
    part = tmp_path / "part"
    assert make_cfw_pairs(_stage1(), pairs, part, limit=1, progress=False)["written"] == 1
    assert make_cfw_pairs(_stage1(), pairs, part, progress=False) == {
        "written": 2,
        "kept": 1,
        "skipped_nonfinite": 0,
    }
    for name in cfw_pair_names(cfw_pairs):
        np.testing.assert_array_equal(
            np.load(part / f"latents/{name}.npy"), np.load(cfw_pairs / f"latents/{name}.npy")
        )
    # the stored latent is what the stage-1 sampler ends on for that pair's upsampled LR and seed
    from restore.methods.stablesr import upsample_bicubic

    lq = upsample_bicubic(torch.from_numpy(np.asarray(_read(pairs / "lr/0000002.png")))[None], (32, 32))
    expected = _stage1().final_latents(lq, torch.Generator().manual_seed(0 + 2))
    np.testing.assert_allclose(np.load(cfw_pairs / "latents/0000002.npy"), expected.numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="make_cfw_pairs"):
        CFWPairDataset(tmp_path / "empty")


def _read(path: Path) -> np.ndarray:
    from restore.data.image_io import read_image

    return read_image(path).transpose(2, 0, 1)


def _fit(module: StableSRCFW, data: Path, tmp_path: Path, batches: int) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=2 * batches,  # manual optimisation: each batch steps both optimisers
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(CFWPairDataset(data), batch_size=1))
    return trainer


def test_training_moves_only_the_fusion_layers_and_the_discriminator(cfw_pairs, tmp_path) -> None:
    torch.manual_seed(0)
    module = StableSRCFW(tiny_prior(), perceptual_weight=0.0, disc_start=1, disc_channels=8, accumulate=1,
                         optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.9)))  # fmt: skip
    vae = {k: v.clone() for k, v in module.cfw.vae.state_dict().items()}
    fusion = {k: v.clone() for k, v in module.cfw.state_dict().items() if k.startswith("fusion_layer_")}
    disc = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    # one batch: the generator steps, the discriminator's GAN terms are not on yet (disc_start=1)
    _fit(module, cfw_pairs, tmp_path / "a", batches=1)
    assert int(module.generator_steps) == 1
    weights = [k for k in disc if "running" not in k and "num_batches" not in k]  # BN statistics do move
    assert all(torch.equal(module.discriminator.state_dict()[k], disc[k]) for k in weights)
    _fit(module, cfw_pairs, tmp_path / "b", batches=2)
    assert all(torch.equal(module.cfw.vae.state_dict()[k], v) for k, v in vae.items())
    assert any(not torch.equal(module.cfw.state_dict()[k], v) for k, v in fusion.items())
    assert any(not torch.equal(module.discriminator.state_dict()[k], v) for k, v in disc.items())
    assert not any(k.startswith("cfw.vae.") for k in module.state_dict())  # the frozen VAE is not saved


def test_trained_decoder_joins_stablesr_on_the_stage1_vae(cfw_pairs, tmp_path) -> None:
    torch.manual_seed(0)
    trained = StableSRCFW(tiny_prior(), perceptual_weight=0.0, disc_start=0, disc_channels=8, accumulate=1,
                          optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))  # fmt: skip
    trainer = _fit(trained, cfw_pairs, tmp_path, batches=1)
    ckpt = tmp_path / "cfw.ckpt"
    trainer.save_checkpoint(ckpt)
    stage1 = _stage1(decoder=lambda vae: trained_cfw_autoencoder(ckpt, vae=vae))
    assert isinstance(stage1.decoder, CFWAutoencoder) and stage1.decoder.vae is stage1.prior.vae
    for key, value in trained.cfw.state_dict().items():
        if key.startswith("fusion_layer_"):
            assert torch.equal(stage1.decoder.state_dict()[key], value)
    assert not any(
        k.startswith("decoder.") for k in stage1.state_dict()
    )  # frozen: not in stage-1 checkpoints
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with_cfw = stage1.restore(lq)
    without = _stage1().restore(lq)
    assert with_cfw.shape == without.shape == (1, 3, 32, 32) and not torch.equal(with_cfw, without)
    with pytest.raises(FileNotFoundError, match="method.decoder.checkpoint"):
        trained_cfw_autoencoder(tmp_path / "none.ckpt", vae=stage1.prior.vae)


def test_patch_discriminator_is_taming_shaped() -> None:
    disc = PatchDiscriminator()
    assert [k for k in disc.state_dict() if k.endswith("weight")][:3] == [
        "main.0.weight",
        "main.2.weight",
        "main.3.weight",
    ]
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633  # taming NLayerDiscriminator(3, 64, 3)
    assert disc(torch.zeros(1, 3, 512, 512)).shape == (1, 1, 62, 62)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_discriminator_loss(real, fake) == pytest.approx(0.5 * (0.25 + 0.75))
