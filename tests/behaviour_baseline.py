"""SeeSR / XPSR behaviour pinned across refactors: training losses and sampled images of the tiny methods.

Each case is a method config plus overrides (the same configs train.py / eval.py compose). For each case the
module is built with a fixed seed, trained for two steps on two fixed photo pairs (a real Lightning Trainer,
CPU, fp32), and then restores one LR image. The per-step losses, the logged loss terms and the restored image
are recorded.

``tests/fixtures/behaviour_baseline.npz`` was written by ``python tests/behaviour_baseline.py --write`` at commit
a53e433, *before* the core was redesigned for other priors ("one core for every prior"), together with the
train.py checkpoints of two cases in the layout of that time (``tests/fixtures/pre_refactor_<case>.ckpt.gz``:
every floating-point tensor zeroed so that the files compress to kilobytes; keys, shapes, dtypes, optimizer,
EMA and generator entries are the real ones).
``tests/test_behaviour_baseline.py`` re-runs every case and compares. Regenerate the fixture only for an
intended change of behaviour, and say so in the commit.

The cases cover SeeSR's tag sources, samplers, starts, colour fixes and the tiled latent / VAE path, and
XPSR's fusions (Tab. 3), DFC heads (Tab. 4), training prompts, presets (paper / official), inference prompts
(Tab. 2), negative prompts (Tab. 5) and the zero-initialised pixel attention.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
BASELINE = FIXTURES / "behaviour_baseline.npz"
#: Cases whose train.py checkpoint is kept as written before the refactor (old checkpoints must still load).
CHECKPOINT_CASES = ("seesr_default", "xpsr_sfa_paper")

#: The config group naming a method (train.py, eval.py and restore.infer).
GROUP = "method"
# small and fast: 4 steps at 64 px (LR 16 px); every case restores one LR image of 24 x 16 px
_FAST = ["sampling.num_steps=4", "sampling.process_size=64", "sampling.progress=false", "sampling.seed=3"]

CASES: dict[str, tuple[str, list[str]]] = {
    "seesr_default": ("seesr_tiny", []),
    "seesr_lq_tags_dpmsolver_wavelet_tiled": (
        "seesr_tiny",
        [
            "tags_from=lq",
            "sampling.scheduler=dpmsolver++",
            "sampling.color_fix=wavelet",
            "sampling.latent_tile=6",
            "sampling.latent_tile_overlap=2",
            "sampling.vae_decoder_tile=4",
            "sampling.vae_encoder_tile=48",
        ],
    ),
    "seesr_noise_ddim_cfg1": (
        "seesr_tiny",
        ["sampling.scheduler=ddim", "sampling.start=noise", "sampling.guidance_scale=1.0"],
    ),
    "xpsr_sfa_paper": ("xpsr_tiny", []),
    "xpsr_official": ("xpsr_tiny", ["preset=official", "training_prompt=official"]),
    "xpsr_serial": ("xpsr_tiny", ["fusion=serial"]),
    "xpsr_high_only": ("xpsr_tiny", ["fusion=high_only"]),
    "xpsr_low_only": ("xpsr_tiny", ["fusion=low_only"]),
    "xpsr_dfc_pixel": ("xpsr_tiny", ["dfc=pixel"]),
    "xpsr_dfc_latent": ("xpsr_tiny", ["dfc=latent"]),
    "xpsr_dfc_none": ("xpsr_tiny", ["dfc=none"]),
    "xpsr_zero_init_high_prompts_no_negative": (
        "xpsr_tiny",
        ["pixel_attention_zero_init=true", "inference_prompts=high", "use_negative_prompts=false"],
    ),
    "xpsr_low_prompts_tiled": (
        "xpsr_tiny",
        ["inference_prompts=low", "sampling.latent_tile=6", "sampling.latent_tile_overlap=2"],
    ),
    "xpsr_null_prompts": ("xpsr_tiny", ["inference_prompts='null'"]),
}


def _photo_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    from restore.data.hr_datasets import load_embedded_photo

    photos = [load_embedded_photo(n) for n in ("astronaut", "coffee")]
    gt = torch.stack(
        [
            F.interpolate(torch.from_numpy(p).permute(2, 0, 1).float()[None], size=(64, 64), mode="area")[0]
            for p in photos
        ]
    )
    return gt, F.interpolate(gt, scale_factor=0.25, mode="area")


class _Pairs(Dataset):
    """Two fixed (GT 64 px, LR 16 px) photo pairs with XPSR's two prompt fields."""

    def __init__(self) -> None:
        self.gt, self.lq = _photo_pairs()

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "gt": self.gt[i],
            "lq": self.lq[i],
            "key": f"p{i}",
            "prompt": f"a photo number {i}",
            "lowlevel_prompt": f"blurry and noisy {i}",
        }


class _SeeSRPairs(_Pairs):
    """The same pairs without prompts: SeeSR's tags then come from the frozen DAPE."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"gt": self.gt[i], "lq": self.lq[i], "key": f"p{i}"}


class _Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.terms: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and key != "train/loss":
                self.terms.setdefault(key, []).append(float(value))


def build(config: str, overrides: list[str], tmp: Path) -> L.LightningModule:
    """The method of ``config`` with ``overrides`` (relative to the method's node), built with seed 0."""
    from hydra.utils import instantiate

    sys.path.insert(0, str(REPO / "tests"))
    from hydra_helpers import compose_config

    extra = [f"++{GROUP}.{o}" for o in [*_FAST, *overrides]]
    cfg = compose_config("train", [f"{GROUP}={config}", *extra], tmp)
    L.seed_everything(0, verbose=False)
    return instantiate(cfg[GROUP])


def run_case(name: str, tmp: Path, checkpoint: Path | None = None) -> dict[str, np.ndarray]:
    """Train case ``name`` two steps and restore one image; returns the recorded arrays."""
    config, overrides = CASES[name]
    module = build(config, overrides, tmp)
    data = _SeeSRPairs() if config.startswith("seesr") else _Pairs()
    record = _Record()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp,
        callbacks=[record],
        gradient_clip_val=1.0,
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    if checkpoint is not None:
        write_checkpoint_fixture(trainer, checkpoint)
    return {**record_of(record), "image": restore_one(module)}


def _zeroed(value: Any) -> Any:
    if torch.is_tensor(value):
        return torch.zeros_like(value) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _zeroed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_zeroed(v) for v in value)
    return value


def write_checkpoint_fixture(trainer: L.Trainer, path: Path) -> None:
    """The train.py checkpoint of ``trainer`` with its floating-point tensors zeroed, gzipped."""
    import gzip
    import io

    raw = path.with_suffix("")
    trainer.save_checkpoint(raw, weights_only=False)
    buffer = io.BytesIO()
    torch.save(_zeroed(torch.load(raw, weights_only=False)), buffer)
    raw.unlink()
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(buffer.getvalue())


def read_checkpoint_fixture(path: Path, into: Path) -> Path:
    """Unpack a gzipped checkpoint fixture to ``into`` (a ``.ckpt`` path); returns it."""
    import gzip
    import shutil

    with gzip.open(path, "rb") as src, open(into, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return into


def record_of(record: _Record) -> dict[str, np.ndarray]:
    out = {"losses": np.asarray(record.losses, dtype=np.float64)}
    out.update({f"term:{k}": np.asarray(v, dtype=np.float64) for k, v in sorted(record.terms.items())})
    return out


def restore_lq() -> torch.Tensor:
    """One 24 x 16 LR image (landscape: the latent is not square, so tiles and crops are exercised)."""
    from restore.data.hr_datasets import load_embedded_photo

    photo = torch.from_numpy(load_embedded_photo("chelsea")).permute(2, 0, 1).float()[None]
    return F.interpolate(photo, size=(16, 24), mode="area")


def restore_one(module: L.LightningModule) -> np.ndarray:
    lq = restore_lq()
    module.eval()
    with torch.no_grad():
        if type(module).__name__ == "XPSR":
            prompts = [{"highlevel": "a cat on a rug", "lowlevel": "the image is blurry"}]
            out = module.restore(lq, prompts=prompts)
        else:
            out = module.restore(lq)
    return out.float().numpy()


def flatten(results: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{case}/{key}": value for case, arrays in results.items() for key, value in arrays.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record the fixture (see the module doc)")
    args = parser.parse_args()
    import tempfile

    torch.set_num_threads(2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            ckpt = (
                FIXTURES / f"pre_refactor_{name}.ckpt.gz" if args.write and name in CHECKPOINT_CASES else None
            )
            results[name] = run_case(name, Path(tmp) / name, ckpt)
            print(
                name,
                results[name]["losses"],
                {k: v for k, v in results[name].items() if k.startswith("term")},
            )
    if args.write:
        FIXTURES.mkdir(exist_ok=True)
        np.savez_compressed(BASELINE, **flatten(results))
        print(f"wrote {BASELINE}")


if __name__ == "__main__":
    main()
