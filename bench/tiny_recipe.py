"""What limits the tiny EOSTok demo: recipe variants trained side by side, one process, same data.

Each variant is the demo preset (configs/experiments/eostok_tiny.yaml) plus `key=value`
overrides of the job's own config keys. It trains in this process with bench/overhead.py's
`PlainLoop` (AdamW with decay on matrices, the job's warm-up + cosine schedule, gradient clipping,
the EOSTok generator and discriminator phases, the generator EMA; no Ray, no DeepSpeed: the loop's
arithmetic, not its plumbing) on the
embedded train crops and reports validation PSNR / SSIM (the held-out val crops) of the raw and
EMA tokenizer, codebook usage on val, the AR's accuracy and steps/s.

    python bench/tiny_recipe.py                       # the preset alone
    python bench/tiny_recipe.py --variant "token_mix: method.model.tokenizer_overrides.token_mix=true"
    python bench/tiny_recipe.py --steps 300 --variant "a: optim.lr=2e-3" --variant "b: ..."

A variant named `preset` (no overrides) always runs first, so every row has its baseline.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead import PlainLoop  # noqa: E402 (the rank loop's arithmetic without its plumbing)
from system.config.experiments import EOSTokExperiment  # noqa: E402
from system.config.load import load_config  # noqa: E402
from system.data.embedded import ensure_embedded_dataset  # noqa: E402
from system.data.shards import IMAGE_FIELDS, iter_tar_samples, read_index  # noqa: E402
from system.data.storage import join  # noqa: E402
from system.data.transforms import preprocess, to_tensor  # noqa: E402
from system.eval.recon_metrics import ssim  # noqa: E402
from system.methods.base import DataSpec  # noqa: E402
from system.methods.eostok import EOSTok  # noqa: E402
from system.methods.tokenizer_training import batch_psnr, code_histogram, usage_and_perplexity  # noqa: E402
from system.train_utils import save_image_grid, seed_everything  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs/experiments/eostok_tiny.yaml"


def load_split(url: str, split: str, resolution: int) -> tuple[list[bytes], torch.Tensor]:
    """Every (image bytes, label) of a shard set, in index and tar order (the shard format's own
    index and tar iterator; the whole split fits in memory here)."""
    ensure_embedded_dataset(url, split=split)
    data, labels = [], []
    for shard in read_index(url)["shards"]:
        with open(join(url, shard["name"]), "rb") as f:
            for _, fields in iter_tar_samples(f, shard["name"]):
                data.append(next(fields[e] for e in IMAGE_FIELDS if e in fields))
                labels.append(int(fields["cls"]))
    return data, torch.tensor(labels)


def decoded(data: list[bytes], resolution: int, flip: bool) -> torch.Tensor:
    return to_tensor([preprocess(d, resolution, flip) for d in data])


@torch.no_grad()
def evaluate(tok: torch.nn.Module, val: torch.Tensor, k: int) -> dict[str, float]:
    tok.eval()
    out = tok(val)
    recon = out.image.clamp(-1, 1)
    usage, _ = usage_and_perplexity(code_histogram(out.quant.codes, k))
    tok.train()
    return {"psnr": float(batch_psnr(recon, val)),
            "ssim": float(ssim((recon + 1) / 2, (val + 1) / 2, data_range=1.0).mean()),
            "usage": float(usage)}


def run_variant(name: str, overrides: list[str], steps: int, seed: int, out_dir: Path | None) -> dict:
    noquant = "bench.noquant" in overrides  # diagnostic upper bound: the quantizer passes latents through
    overrides = [o for o in overrides if o != "bench.noquant"]
    exp = load_config(EOSTokExperiment, ["--config", str(PRESET), *overrides])
    steps = steps or exp.train.max_steps
    seed_everything(seed)
    res, bs = exp.data.resolution, exp.data.batch_size * exp.cluster.num_workers  # the job's global batch
    train_bytes, train_y = load_split(exp.data.url, "train", res)
    val_bytes, _ = load_split(exp.data.val_url, "val", res)
    train_x = [decoded(train_bytes, res, False), decoded(train_bytes, res, True)]
    val_x = decoded(val_bytes, res, False)
    method = EOSTok(exp.method, DataSpec(res, 8, exp.data.storage))
    loop = PlainLoop(method, exp.optim, steps, exp.train.ema_every)
    mods = loop.mods
    if noquant:
        q = mods["gen"].tokenizer.quantizer
        fwd = q.forward
        q.forward = lambda z: fwd(z)._replace(quantized=z, losses={})
    live, ema = dict(mods["gen"].named_parameters()), loop.emas["gen"]
    g = torch.Generator().manual_seed(seed)
    k = method.tok_cfg.quantizer.num_codes
    t0, acc, curve = time.perf_counter(), float("nan"), []
    for step in range(steps):
        idx = torch.randint(0, len(train_y), (bs,), generator=g)
        flip = torch.randint(0, 2, (bs,), generator=g)
        x = torch.where(flip.view(-1, 1, 1, 1).bool(), train_x[1][idx], train_x[0][idx])
        acc = float(loop.step({"image": x, "label": train_y[idx]})["gen"].metrics["ar_acc"])
        if (step + 1) % max(steps // 6, 1) == 0:
            curve.append(round(evaluate(mods["gen"].tokenizer, val_x, k)["psnr"], 2))
    elapsed = time.perf_counter() - t0
    raw = evaluate(mods["gen"].tokenizer, val_x, k)
    ema.swap(live)  # the EMA weights in place, for its metrics and the grid
    ema_m = evaluate(mods["gen"].tokenizer, val_x, k)
    if out_dir is not None:
        n = 8
        pick = torch.arange(0, len(val_x), len(val_x) // n)[:n]
        mods["gen"].eval()
        imgs = method.sample_images(mods, {"image": val_x[pick], "label": torch.arange(n) % 8}, seed=0)
        mods["gen"].train()
        save_image_grid(imgs, out_dir / f"{name}.png", title=f"{name}: val PSNR {ema_m['psnr']:.2f} dB (EMA)")
    ema.swap(live)
    return {"variant": name, "steps": steps, "steps/s": steps / elapsed, "val_psnr": raw["psnr"],
            "val_psnr_ema": ema_m["psnr"], "val_ssim_ema": ema_m["ssim"], "usage_ema": ema_m["usage"],
            "ar_acc": acc, "curve": curve}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help='"name: key=value key=value ..."')
    ap.add_argument("--steps", type=int, default=0, help="steps per variant (0: the preset's train.max_steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-preset", action="store_true", help="skip the baseline row")
    ap.add_argument("--grids", default="", help="folder for one labelled PNG per variant (val crops)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [] if args.no_preset else [("preset", [])]
    for v in args.variant:
        name, _, rest = v.partition(":")
        variants.append((name.strip(), rest.split()))
    out_dir = Path(args.grids) if args.grids else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'variant':<28} {'steps':>5} {'st/s':>5} {'psnr':>6} {'ema':>6} {'ssim':>5} {'usage':>5} {'ar_acc':>6}  psnr curve")
    for name, ov in variants:
        r = run_variant(name, ov, args.steps, args.seed, out_dir)
        print(f"{r['variant']:<28} {r['steps']:>5} {r['steps/s']:>5.2f} {r['val_psnr']:>6.2f} {r['val_psnr_ema']:>6.2f} "
              f"{r['val_ssim_ema']:>5.3f} {r['usage_ema']:>5.2f} {r['ar_acc']:>6.3f}  {r['curve']}", flush=True)


if __name__ == "__main__":
    main()
