"""One SeeSR training step: samples/s, peak memory and MFU of ``restore``'s module vs a plain PyTorch loop.

The baseline is the step as cswry/SeeSR's ``train_seesr.py`` writes it, with the same networks: VAE-encode the
GT, encode the prompt, noise, ControlNet on the bicubic LR with the RAM tokens, UNet with the residuals,
epsilon MSE, backward, AdamW step. ``restore`` runs :meth:`SeeSR.training_step` (prompt dropout, generator
draws, NaN guard, logging hooks) on the same batch. Both run with and without gradient checkpointing; the
ratio restore/plain shows the framework's overhead.

    python benchmarks/train_step.py                          # CPU: tiny prior + tiny DAPE at 128 px
    python benchmarks/train_step.py --size full --resolution 512 --batch 2 --precision bf16   # GPU, SD-2-base

``--size full`` builds SD-2-base, SeeSR's ControlNet + RCA and RAM Swin-L at full size with random weights
(speed and memory do not depend on weight values; nothing is downloaded). MFU = model FLOPs of one step
(counted with ``torch.utils.flop_counter``) per second / the GPU's peak dense bf16 (or fp32) FLOP/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Peak dense tensor-core FLOP/s by device name (vendor data sheets, SXM parts), for MFU.
PEAK_FLOPS = {
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12},
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def build(size: str, device: torch.device, grad_ckpt: bool, features: bool = False):
    """SeeSR with random weights; ``features``: frozen prior in bf16 + bitsandbytes' 8-bit AdamW (issue 16's
    memory set, measured by benchmarks/gpu/run.py)."""
    from restore.methods.seesr import SeeSR
    from restore.models.priors import sd2_base_prior, tiny_prior

    torch.manual_seed(0)
    if size == "full":
        from restore.models.ram.ram import build_ram

        prior, dape, controlnet = sd2_base_prior(device), build_ram("swin_l_384", device=device), {}
    else:
        from restore.models.dape import tiny_dape

        prior, dape = tiny_prior(), tiny_dape(token_dim=32)
        controlnet = {"conditioning_embedding_out_channels": (8, 16, 16, 16)}
    if features:
        from bitsandbytes.optim import AdamW8bit as optimizer_class
    else:
        optimizer_class = torch.optim.AdamW
    module = SeeSR(
        prior=prior,
        dape=dape,
        controlnet=controlnet,
        optimizer=lambda p: optimizer_class(p, lr=5e-5, weight_decay=1e-2),  # train_seesr.py's AdamW
        gradient_checkpointing=grad_ckpt,
        frozen_dtype="bf16" if features else None,
    )
    if features:
        module.cast_frozen_prior(torch.bfloat16)  # what setup("fit") does when Lightning trains
    module.to(device).train()
    return module


def make_batch(n: int, resolution: int, device: torch.device) -> dict:
    from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, load_embedded_photo

    photos = []
    for i in range(n):
        x = torch.from_numpy(load_embedded_photo(EMBEDDED_PHOTO_NAMES[i % 8])).permute(2, 0, 1).float() / 255
        side = min(x.shape[-2:])
        photos.append(F.interpolate(x[None, :, :side, :side], size=(resolution, resolution), mode="area")[0])
    gt = torch.stack(photos).to(device)
    lq = F.interpolate(gt, scale_factor=0.25, mode="area")
    return {"gt": gt, "lq": lq, "prompt": ["a photo, clean, high-resolution, 8k"] * n}


def plain_step(module, batch: dict) -> torch.Tensor:
    """train_seesr.py's step, written out with the same networks."""
    prior, controlnet = module.prior, module.controlnet
    gt, lr_up, tokens = batch["gt"], batch["lr_up"], batch["ram_tokens"]
    with torch.no_grad():
        latents = prior.vae.encode(gt * 2 - 1).latent_dist.sample() * prior.vae.config.scaling_factor
        ids = prior.tokenizer(
            batch["prompt"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(gt.device)
        text = prior.text_encoder(ids)[0]
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (len(gt),), device=gt.device)
    noisy = prior.noise_scheduler.add_noise(latents, noise, t)
    from restore.models.seesr import representation_tokens

    with representation_tokens((controlnet, prior.unet), tokens):
        down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=lr_up, return_dict=False)
        pred = prior.unet(
            noisy,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    return F.mse_loss(pred.float(), noise.float())


def time_steps(step: Callable[[], torch.Tensor], optimizer, device, warmup: int, steps: int) -> float:
    def one() -> None:
        loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step().backward()
    return counter.get_total_flops()


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table["bf16" if precision == "bf16" else "fp32"]
    return None


def seesr_batch(module, n: int, resolution: int, device: torch.device) -> dict:
    """:func:`make_batch` plus the frozen-DAPE conditions ``on_after_batch_transfer`` adds (bicubic LR and its RAM
    tokens), computed once, outside any timing."""
    batch = make_batch(n, resolution, device)
    lr_up = F.interpolate(batch["lq"], size=batch["gt"].shape[-2:], mode="bicubic").clamp(0, 1)
    return {**batch, "lr_up": lr_up, "ram_tokens": module.ram_tokens(lr_up)}


def attach_bare_trainer(module, device: torch.device) -> None:
    """The step runs outside a fit loop: a bare Trainer answers the strategy calls, ``log()`` is a no-op."""
    import lightning as L

    module.trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    module.log = lambda *a, **k: None


def run(args: argparse.Namespace, grad_ckpt: bool, device: torch.device) -> dict:
    module = build(args.size, device, grad_ckpt)
    batch = seesr_batch(module, args.batch, args.resolution, device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )
    attach_bare_trainer(module, device)
    optimizer = module.configure_optimizers()["optimizer"]
    trainable = sum(p.numel() for p in module.trainable_parameters())

    def restore_step() -> torch.Tensor:
        with autocast:
            return module.training_step(batch, 0)

    def plain() -> torch.Tensor:
        with autocast:
            return plain_step(module, batch)

    result = {"grad_ckpt": grad_ckpt, "trainable_params": trainable}
    for name, step in (("plain", plain), ("restore", restore_step)):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(step, optimizer, device, args.warmup, args.steps)
        peak = (
            torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        result[name] = {"s_per_step": seconds, "samples_per_s": args.batch / seconds, "peak_mem_gib": peak}
    optimizer.zero_grad(set_to_none=True)
    flops = count_flops(plain)
    result["flops_per_step"] = flops
    peak_rate = peak_flops(device, args.precision)
    for name in ("plain", "restore"):
        achieved = flops / result[name]["s_per_step"]
        result[name]["tflops"] = achieved / 1e12
        result[name]["mfu"] = achieved / peak_rate if peak_rate else None
    result["ratio_restore_over_plain"] = result["restore"]["samples_per_s"] / result["plain"]["samples_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--resolution", type=int, default=128, help="GT size in pixels (SeeSR: 512)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step (SeeSR: 2 per GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--grad-ckpt", choices=["both", "on", "off"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # train_seesr.py leaves TF32 off
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"machine: {machine}; torch {torch.__version__}")
    print(
        f"SeeSR {args.size}, {args.resolution} px, batch {args.batch}, {args.precision}, {args.steps} steps"
    )
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.grad_ckpt]
    results = []
    for grad_ckpt in modes:
        r = run(args, grad_ckpt, device)
        results.append(r)
        print(
            f"gradient checkpointing {'on' if grad_ckpt else 'off'} ({r['trainable_params']:,} trainable params,"
            f" {r['flops_per_step'] / 1e12:.3f} TFLOP per step)"
        )
        for name in ("plain", "restore"):
            m = r[name]
            mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
            print(
                f"  {name:8s}: {m['samples_per_s']:.3f} samples/s ({1000 * m['s_per_step']:.0f} ms/step), "
                f"peak {m['peak_mem_gib']:.2f} GiB, {m['tflops']:.2f} TFLOP/s, MFU {mfu}"
            )
        print(f"  ratio restore/plain: {r['ratio_restore_over_plain']:.3f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"json": str(args.json)}, "results": results},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
