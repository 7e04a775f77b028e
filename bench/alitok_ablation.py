#!/usr/bin/env python
"""AliTok's key ablation in direction at tiny scale: stage 1 with a causal vs a bidirectional
decoder (same seed, data and budget; no prefix tokens, no aux loss: the paper's rows (A) and (B)),
then the same AR trained on each tokenizer's codes. Prints the AR's held-out next-token accuracy
(paper: 5.4% bidirectional -> 10.7% causal), the AR's training accuracy, the tokenizer's
validation PSNR and code usage. Each variant is one jobs/alitok_xl.py pipeline run
(configs/experiments/alitok_ablation.yaml on top of alitok_tiny.yaml): both in about 6 minutes on 2
cores.

    python bench/alitok_ablation.py [--steps 1000] [--ar-steps 600] [--storage runs] [--seed 0] [--codebook 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(name: str, causal: bool, args: argparse.Namespace) -> dict:
    root = Path(args.storage).absolute() / name
    cmd = [sys.executable, "jobs/alitok_xl.py", "--config", "configs/experiments/alitok_tiny.yaml",
           "--config", "configs/experiments/alitok_ablation.yaml", f"run_name={name}", f"storage_path={args.storage}",
           f"stage1.method.decoder_causal={str(causal).lower()}", f"stage1.train.max_steps={args.steps}",
           f"ar.train.max_steps={args.ar_steps}", f"stage1.seed={args.seed}", f"ar.seed={args.seed}"]
    if args.codebook:
        cmd.append(f"stage1.method.tokenizer_overrides.quantizer.codebook_size={args.codebook}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    s1 = json.loads((root / "stage1" / "result.json").read_text())
    ar = json.loads((root / "ar" / "result.json").read_text())
    rec = json.loads((root / "eval" / "report.json").read_text())["reconstruction"]
    return {"held-out next-token acc": rec["ar_next_token_accuracy"], "AR train acc (last log)": ar["metrics"].get("acc"),
            "probe acc (stage 1, last log)": s1["metrics"].get("probe/acc"),
            "val PSNR (dB)": rec["psnr"], "val SSIM": rec["ssim"],
            "val code usage": rec["codebook_usage"], "val code perplexity": rec["codebook_perplexity"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="stage-1 steps of each tokenizer")
    p.add_argument("--ar-steps", type=int, default=600, help="AR steps on each tokenizer's codes")
    p.add_argument("--storage", default="runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook", type=int, default=0, help="VQ codebook size (0: the tiny preset's 64)")
    args = p.parse_args()
    tag = f"s{args.seed}" + (f"-k{args.codebook}" if args.codebook else "")
    res = {v: run_variant(f"alitok-abl-{v}-{tag}", v == "causal", args) for v in ("bidirectional", "causal")}
    keys = list(res["causal"])
    print(f"\nAliTok ablation, tiny scale ({args.steps} tokenizer + {args.ar_steps} AR steps, seed {args.seed}, "
          f"codebook {args.codebook or 64})")
    print(f"{'':32s}{'bidirectional (A)':>20s}{'causal (B)':>14s}")
    for k in keys:
        a, b = res["bidirectional"][k], res["causal"][k]
        print(f"{k:32s}{a:20.4f}{b:14.4f}" if a is not None and b is not None else f"{k:32s}{a!s:>20s}{b!s:>14s}")
    (Path(args.storage) / f"alitok_ablation_{tag}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
