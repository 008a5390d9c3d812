"""The GPU check of issue 16: every figure in one run, one JSON (benchmarks/gpu/README.md).

    python benchmarks/gpu/run.py --json benchmarks/results/gpu_h100.json     # H100/H200, ~6 min
    python benchmarks/gpu/run.py --smoke --json /tmp/smoke.json              # tiny models on the CPU, seconds

Figures: the SeeSR stage-2 step (SD-2-base + ControlNet + RCA + RAM Swin-L, random weights, 512² GT, bf16
autocast) as ``restore`` runs it with and without gradient checkpointing, with the memory features (frozen
prior in bf16, 8-bit AdamW) — samples/s, peak memory, MFU — and the largest batch under a 24 GB cap
(``torch.cuda.set_per_process_memory_fraction``); the plain step as cswry/SeeSR ``train_seesr.py`` writes it
(VAE, text encoder and RAM cast to the autocast dtype, UNet + ControlNet fp32, fp32 AdamW, no checkpointing) on
the same batch for the ratio; 50-step 512² inference s/image; Real-ESRGAN degradation images/s on the GPU
and on this machine's CPU; scoring images/s (PSNR + SSIM through pyiqa). Random weights: speed and memory do
not depend on weight values; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import (  # noqa: E402
    attach_bare_trainer,
    count_flops,
    make_batch,
    peak_flops,
    plain_step,
    seesr_batch,
)
from train_step import build as build_seesr  # noqa: E402

GIB = 2**30
CAP_GB = 24  # the consumer-card budget of the goal


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cast_like_official(module) -> None:
    """train_seesr.py: ``vae/text_encoder/RAM.to(dtype=weight_dtype)``; UNet and ControlNet stay fp32."""
    for part in (module.prior.vae, module.prior.text_encoder, module.dape):
        part.to(torch.bfloat16)


def timed(
    step: Callable[[], torch.Tensor], optimizer, device, warmup: int, steps: int
) -> tuple[float, float]:
    """Seconds per optimisation step and the peak memory (GiB; CUDA only, else NaN)."""

    def one() -> None:
        step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        one()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return seconds, peak


def train_figures(args, device: torch.device, variant: str, flops: dict) -> dict:
    """One configuration of the step: ``plain`` (official), ``restore`` (checkpointing on/off), ``features``."""
    grad_ckpt = variant in ("restore_ckpt", "features_ckpt")
    features = variant.startswith("features")
    module = build_seesr(args.size, device, grad_ckpt, features)
    attach_bare_trainer(module, device)
    batch = seesr_batch(module, args.batch, args.resolution, device)  # RAM tokens: once, outside the timing
    if variant == "plain":
        cast_like_official(module)
    optimizer = module.configure_optimizers()["optimizer"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        with autocast:
            return plain_step(module, batch) if variant == "plain" else module.training_step(batch, 0)

    seconds, peak = timed(step, optimizer, device, args.warmup, args.steps)
    if "model" not in flops:  # the model FLOPs of one step (same networks in every variant)
        optimizer.zero_grad(set_to_none=True)
        flops["model"] = count_flops(step)
    rate = peak_flops(device, "bf16")
    result = {
        "variant": variant,
        "grad_ckpt": grad_ckpt,
        "frozen_dtype": "bf16" if features else None,
        "optimizer": type(optimizer).__name__,
        "batch": args.batch,
        "s_per_step": seconds,
        "samples_per_s": args.batch / seconds,
        "peak_mem_gib": peak,
        "mfu": flops["model"] / seconds / rate if rate else None,
    }
    return result  # the networks go with this frame; main() collects between variants


def largest_batch(args, device: torch.device, variant: str) -> int | None:
    """The largest per-GPU batch whose step fits under ``CAP_GB`` (doubling, then bisection)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GB * 1e9 / total), device)
    module = build_seesr(args.size, device, "ckpt" in variant, variant.startswith("features"))
    attach_bare_trainer(module, device)
    optimizer = module.configure_optimizers()["optimizer"]

    def fits(n: int) -> bool:
        try:
            batch = seesr_batch(module, n, args.resolution, device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                module.training_step(batch, 0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return True
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    good, bad = 0, None
    n = 1
    while bad is None and n <= args.max_batch:
        if fits(n):
            good, n = n, n * 2
        else:
            bad = n
    bad = bad or good + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    gc.collect()
    torch.cuda.empty_cache()
    return good


def inference_figures(args, device: torch.device) -> dict:
    from restore.sampling.sampler import SamplingSettings

    module = build_seesr(args.size, device, False, False).eval()
    module.settings = SamplingSettings(num_steps=args.inference_steps)
    if hasattr(module, "sampling"):
        module.sampling = SamplingSettings(**{**vars(module.sampling), "num_steps": args.inference_steps})
    lq = make_batch(1, args.resolution, device)["lq"]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        module.restore(lq)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = module.restore(lq)
        sync(device)
    return {
        "s_per_image": time.perf_counter() - start,
        "steps": args.inference_steps,
        "output_size": list(out.shape[-2:]),
    }


def degradation_figures(args, device: torch.device) -> dict:
    from restore.data.degradation import RealESRGANDegradation

    result = {}
    for where in dict.fromkeys([device.type, "cpu"]):
        dev = torch.device(where)
        deg = RealESRGANDegradation.from_preset("realesrgan").to(dev)
        hq = make_batch(args.degradation_batch, args.resolution, dev)["gt"]
        gen = torch.Generator(device=dev).manual_seed(0)
        deg(hq, gen)
        sync(dev)
        start = time.perf_counter()
        for _ in range(args.degradation_batches):
            deg(hq, gen)
        sync(dev)
        result[f"{where}_images_per_s"] = args.degradation_batches * len(hq) / (time.perf_counter() - start)
    return result


def scoring_figures(args, device: torch.device) -> dict:
    import pyiqa

    metrics = {name: pyiqa.create_metric(name, device=device) for name in ("psnr", "ssim")}
    gt = make_batch(args.degradation_batch, args.resolution, device)["gt"]
    sr = F.interpolate(F.interpolate(gt, scale_factor=0.25, mode="area"), size=gt.shape[-2:], mode="bicubic")
    sr = sr.clamp(0, 1)
    with torch.no_grad():
        for metric in metrics.values():
            metric(sr, gt)
        sync(device)
        start = time.perf_counter()
        for metric in metrics.values():
            metric(sr, gt)
        sync(device)
    return {"metrics": list(metrics), "images_per_s": len(gt) / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 1 step each (tests)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    full = {
        "size": "full",
        "resolution": 512,
        "batch": 2,
        "warmup": 3,
        "steps": 10,
        "max_batch": 64,
        "inference_steps": 50,
        "degradation_batch": 8,
        "degradation_batches": 10,
    }
    smoke = {
        "size": "tiny",
        "resolution": 128,
        "batch": 2,
        "warmup": 1,
        "steps": 1,
        "max_batch": 4,
        "inference_steps": 2,
        "degradation_batch": 2,
        "degradation_batches": 1,
    }
    for key, value in (smoke if args.smoke else full).items():
        setattr(args, key, value)
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # train_seesr.py leaves TF32 off
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    report: dict = {
        "machine": machine,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "settings": {k: getattr(args, k) for k in full},
    }
    flops: dict = {}
    started = time.perf_counter()
    variants = ["plain", "restore", "restore_ckpt", "features", "features_ckpt"]
    report["train_step"] = {}
    for variant in variants:
        report["train_step"][variant] = train_figures(args, device, variant, flops)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{variant}: {report['train_step'][variant]['samples_per_s']:.3f} samples/s", flush=True)
    report["flops_per_step"] = flops["model"]
    plain = report["train_step"]["plain"]["samples_per_s"]
    report["ratio_over_plain"] = {v: report["train_step"][v]["samples_per_s"] / plain for v in variants[1:]}
    report["largest_batch_24gb"] = {v: largest_batch(args, device, v) for v in ("plain", "features_ckpt")}
    report["inference"] = inference_figures(args, device)
    report["degradation"] = degradation_figures(args, device)
    report["scoring"] = scoring_figures(args, device)
    report["wall_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
