"""Encode the prompts of a side-file once with a prior's text encoder(s) into a folder of feature files.

    python scripts/precompute_text_features.py --prior pixart_alpha --prompts data/lsdir/prompts.jsonl \\
        --out data/lsdir/t5_features --device cuda --dtype bf16
    # then train / evaluate without the encoder:
    python train.py ... method.prior.load_text_encoder=false method.prior.text_features=data/lsdir/t5_features

``--prior`` names a config of ``configs/method/prior/`` (its weights as that config loads them; the denoiser and
the VAE are not loaded). ``--prompts``: a JSONL side-file (``{"path": ..., "<field>": ...}``, data/README.md;
``--field``, default ``prompt``) or a text file with one prompt per line. The empty prompt is always encoded
too (the null condition of SD priors, and PixArt's without a learned null caption).

One ``safetensors`` file per distinct prompt (named by its sha256) plus ``manifest.json`` naming the encoder: a
prior loaded from the same weights reads them (:class:`restore.models.priors.TextFeatureStore`) and refuses
features of another encoder. Prompts already in the folder are skipped, so a killed run continues where it
stopped; every file is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def read_prompts(path: Path, field: str) -> list[str]:
    """The distinct prompts of a JSONL side-file (``field``) or a text file (one per line), plus ``""``."""
    if path.suffix == ".jsonl":
        from restore.data.prompts import PromptTable

        texts = PromptTable(path, key=field).texts()
    else:
        texts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(dict.fromkeys(["", *texts]))


def load_text_prior(name: str) -> object:
    """The prior of ``configs/method/prior/<name>.yaml`` with its text encoder(s) only."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from restore import CONFIG_DIR

    path = CONFIG_DIR / "method" / "prior" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"--prior {name!r} is not a config of configs/method/prior/: {', '.join(options)}")
    cfg = OmegaConf.load(path)
    if str(cfg._target_).endswith(".from_pretrained"):
        cfg.load_denoiser = False
        cfg.load_text_encoder = True
        cfg.text_features = None
    return instantiate(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", required=True, help="a config of configs/method/prior/, e.g. pixart_alpha")
    parser.add_argument("--prompts", required=True, type=Path, help="JSONL side-file or text file")
    parser.add_argument("--field", default="prompt", help="JSONL field holding the prompt (default: prompt)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the features (created)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the text encoder's dtype")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from restore.models.priors import TextFeatureStore

    if not args.prompts.is_file():
        raise SystemExit(f"--prompts {args.prompts} does not exist")
    prompts = read_prompts(args.prompts, args.field)
    prior = load_text_prior(args.prior)
    prior.to(device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
    store = TextFeatureStore(args.out, prior.text_encoder_id)
    todo = [p for p in prompts if p not in store]
    print(f"{len(prompts)} distinct prompts, {len(prompts) - len(todo)} already in {args.out}")
    with torch.no_grad():
        for start in tqdm(range(0, len(todo), args.batch_size), desc="encode", disable=args.no_progress):
            batch = todo[start : start + args.batch_size]
            features = prior.run_text_encoder(batch)
            for i, prompt in enumerate(batch):
                store.write(prompt, features.rows(i).map(lambda t: t.float() if t.is_floating_point() else t))
    print(f"wrote {len(todo)} feature file(s) to {args.out} (encoder {prior.text_encoder_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
