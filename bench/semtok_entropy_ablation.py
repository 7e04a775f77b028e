#!/usr/bin/env python
"""SemTok's BSQ entropy loss on vs off at tiny scale on the embedded photos: stage I of the tiny
preset trained twice (same seed, data, VAE and budget; method.quant = 0.0025 vs 0), then both
exported tokenizers encode every train and val image. Prints, per variant, the bit usage (fraction
of the BSQ bits whose mean over the codes lies in [0.1, 0.9]), the code perplexity (exp of the
entropy of the empirical code distribution), the distinct codes, the mean per-bit entropy and the
flow decoder's validation PSNR.

Both variants read one VAE: runs/<storage>/semtok-abl-vae (fitted once, for the preset's steps or
--vae-steps, or --vae an existing latent_vae export such as runs/semtok-tiny/vae/export). About 5
minutes on 2 cores.

    python bench/semtok_entropy_ablation.py [--steps 600] [--storage runs] [--seed 0] [--vae URL | --vae-steps N]
                                            [--quant 0.0025]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = "configs/experiments/semtok_tiny.yaml"


def run(args: argparse.Namespace, *overrides: str) -> None:
    cmd = [sys.executable, "jobs/semtok.py", "--config", TINY, f"storage_path={args.storage}", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def code_statistics(export: str) -> dict:
    """Encode every train and val image of the embedded set with the tokenizer of `export`."""
    import torch

    from system.config import EvaluateConfig
    from system.eval.suite import shard_batches
    from system.models.tokenizers import load_tokenizer
    from system.models.quantizers import codebook_perplexity, codes_to_bits
    from system.models.semtok import bit_usage

    tok = load_tokenizer(export)
    codes = []
    for split in ("train", "val"):
        cfg = EvaluateConfig(shards=str(REPO / ".cache/embedded_shards" / split), embedded=True, batch_size=64)
        codes += [tok.encode(images) for images, _ in shard_batches(cfg, tok.image_size)]
    codes = torch.cat(codes)
    bits = tok.model.cfg.bits
    means = codes_to_bits(codes.reshape(-1), bits).float().mean(0)
    p = means.clamp(1e-6, 1 - 1e-6)
    return {"images": len(codes), "tokens": codes.numel(), "bit usage [0.1, 0.9]": float(bit_usage(means)),
            "code perplexity": codebook_perplexity(codes, 2**bits), "distinct codes": float(torch.unique(codes).numel()),
            "mean bit entropy (bits)": float((-(p * p.log2() + (1 - p) * (1 - p).log2())).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600, help="stage I steps of each variant")
    p.add_argument("--storage", default="runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", type=float, default=0.0025, help="the entropy loss weight of the 'on' variant (paper 0.0025)")
    p.add_argument("--group", type=int, default=1, help="method.entropy_group of the 'on' variant (1: per-bit factorised)")
    p.add_argument("--vae", default=None, help="a latent_vae export to reuse (default: fit one under semtok-abl-vae)")
    p.add_argument("--vae-steps", type=int, default=0, help="steps of that fit (0: the tiny preset's)")
    args = p.parse_args()
    storage = Path(args.storage).absolute()
    vae = args.vae
    if vae is None:
        name = "semtok-abl-vae" + (f"-n{args.vae_steps}" if args.vae_steps else "")
        run(args, f"run_name={name}", "steps=[vae]", *([f"vae.train.max_steps={args.vae_steps}"] if args.vae_steps else []))
        vae = str(storage / name / "vae" / "export")
    res = {}
    for name, quant in (("off", 0.0), ("on", args.quant)):
        group = args.group if quant > 0 else 1
        run_name = f"semtok-abl-q{quant:g}" + (f"-g{group}" if group > 1 else "") + f"-s{args.seed}-n{args.steps}"
        run(args, f"run_name={run_name}", "steps=[stage1]", f"stage1.method.vae.export={vae}", "stage1.method.vae.hub_name=null",
            f"stage1.method.quant={quant}", f"stage1.method.entropy_group={group}", f"stage1.train.max_steps={args.steps}", f"stage1.seed={args.seed}",
            "stage1.train.val_max_images=0")
        root = storage / run_name / "stage1"
        val = json.loads((root / "result.json").read_text()).get("validation", {})
        res[name] = {**code_statistics(str(root / "export")), "val PSNR (flow, dB)": val.get("val_ema/psnr", val.get("val/psnr"))}
    print(f"\nSemTok BSQ entropy loss off vs on ({args.quant}, entropy_group {args.group}), tiny scale, {args.steps} stage I "
          f"steps, seed {args.seed}")
    print(f"{'':28s}{'off':>14s}{'on':>14s}")
    for k in res["on"]:
        a, b = res["off"][k], res["on"][k]
        print(f"{k:28s}{a:14.4f}{b:14.4f}" if a is not None and b is not None else f"{k:28s}{a!s:>14s}{b!s:>14s}")
    (storage / f"semtok_entropy_ablation_q{args.quant:g}_g{args.group}_s{args.seed}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
