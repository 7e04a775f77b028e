#!/usr/bin/env python
"""The README's plan table: every paper configuration planned by the dry run (system/pipelines/
dry_run.py: one step of every phase traced on fake tensors at the configured size, memory per rank
under the configured ZeRO stage and world size, FLOPs, time at a stated MFU), no GPU, data or weights.

    python bench/paper_plans.py [--mfu 0.4] [--card h100] [--markdown]

AR models are planned on the token shards their tokenizers write (sequence length, vocabulary and
classes as the pipeline would hand them); the tokenizer stages as their pipelines plan them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# where a paper states its compute (../shared/seeds/, ../shared/REFERENCE.md)
PAPER = {
    "AliTok stage 1": "tokenizer: 900K steps (stage 1 600K + stage 2 300K) on 32x A800-80G",
    "AliTok stage 2": "(with stage 1)",
    "VAπ on LlamaGen-XXL": "about 25 min on 8 GPUs (about 3.3 GPU-h)",
}


def rows(card: str, mfu: float) -> list[tuple[str, object]]:
    """(label, StepPlan) of every paper configuration."""
    from system.config import ARExperiment, EOSTokExperiment, MaskedARExperiment, VapiExperiment, load_config
    from system.data.sources import DataSpec, TokenSpec
    from system.pipelines.alitok import ALITOK
    from system.pipelines.dry_run import Walk, plan_steps
    from system.pipelines.semtok import SEMTOK
    from system.pipelines.steps import TrainStep

    root = tempfile.mkdtemp()
    walk = lambda: Walk(card=card, mfu=mfu)  # noqa: E731
    out: list[tuple[str, object]] = []
    base = ["base.yaml", "data/imagenet.yaml"]
    for size in ("s", "l", "h"):
        exp = load_config(EOSTokExperiment, [f"checkpoint.storage_path={root}"],
                          [*base, f"model/eostok_{size}.yaml", "experiments/eostok_h.yaml"])
        out.append((f"EOSTok-{size.upper()} (joint)", plan_steps([TrainStep(name="eostok", exp=exp)], walk())[0]))
    for name, steps in (("AliTok stage 1", "stage1"), ("AliTok stage 2", "stage2")):
        plans = plan_steps(ALITOK.steps(ALITOK.load([f"storage_path={root}", "steps=[stage1,stage2]"])), walk())
        out.append((name, next(p for p in plans if p.step == steps)))
    sem = plan_steps(SEMTOK.steps(SEMTOK.load([f"storage_path={root}", "steps=[stage1,stage2]"])), walk())
    out += [("SemTok stage I", sem[0]), ("SemTok stage II", sem[1])]

    def ar(label: str, schema: type, defaults: list[str], model: str, grid: int, vocab: int, *extra: str) -> None:
        from system.models.registry import gpt_config

        seq = gpt_config(model).prefix_tokens + grid  # the codes its tokenizer writes: prefix + the 16 x 16 grid
        exp = load_config(schema, [f"checkpoint.storage_path={root}", "data.url=/planned/tokens", f"method.model={model}", *extra],
                          ["base.yaml", *defaults])
        data = DataSpec(num_classes=1000, tokens=TokenSpec(seq, vocab))
        from system.pipelines.dry_run import plan_trained

        out.append((label, plan_trained(exp, data, walk())))

    wide = ("cluster.num_workers=64", "data.batch_size=32")  # XL and larger: 64 ranks x 32 (alitok_xl.yaml)
    for size in ("b", "l", "xl"):
        ar(f"AliTok-{size.upper()} AR", ARExperiment, ["experiments/ar_alitok.yaml"], f"alitok-{size}", 256, 4096,
           *(wide if size == "xl" else ()))
    for size in ("l", "xl", "xxl"):
        ar(f"SemTok-AR-{size.upper()} (masked)", MaskedARExperiment, ["experiments/ar_semtok.yaml"], f"semtok-ar-{size}",
           256, 2**18, *(wide if size != "l" else ()))
    for size in ("b", "l", "xl", "xxl", "3b"):
        ar(f"LlamaGen-{size.upper()} AR", ARExperiment, ["experiments/ar_llamagen.yaml"], f"llamagen-{size}", 256, 16384)
    vapi = load_config(VapiExperiment, [f"checkpoint.storage_path={root}", "method.export_url=null",
                                        "method.llamagen_gpt=/models/c2i_XXL_384.pt", "method.llamagen_vq=/models/vq_ds16_c2i.pt",
                                        "data.resolution=384", "method.gpt_overrides={block_size: 576}"],
                       ["data/imagenet.yaml", "experiments/vapi.yaml"])
    out.append(("VAπ on LlamaGen-XXL", plan_steps([TrainStep(name="vapi", exp=vapi)], walk())[0]))
    return out


def table(plans: list[tuple[str, object]], markdown: bool) -> str:
    head = ["configuration", "params trained (frozen)", "ranks x batch/rank", "ZeRO", "GB/rank", "H100 80GB", "H200 141GB",
            "s/step", "steps", "GPU-h", "paper's compute"]
    lines = []
    for label, p in plans:
        r = p.row
        lines.append([label, f"{r['params'] / 1e6:,.0f}M" + (f" ({r['frozen'] / 1e6:,.0f}M)" if r.get("frozen") else ""),
                      f"{r['ranks']} x {r['micro']}", str(r["zero"]), f"{r['gb_rank']:.1f}", r["fits_h100"], r["fits_h200"],
                      f"{r['s_step']:.3g}", f"{r['steps']:,}",
                      f"{r['gpu_h']:,.0f}" if r["gpu_h"] >= 10 else f"{r['gpu_h']:.2g}", PAPER.get(label, "")])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(x) + " |" for x in lines)])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--card", default="h100")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    plans = rows(a.card, a.mfu)
    print(table(plans, a.markdown))
    for label, p in plans:
        for n in p.notes:
            if n.startswith("does not fit"):
                print(f"  {label}: {n}")
    print(f"planned {len(plans)} configurations in {time.perf_counter() - t0:.0f} s (time at MFU {a.mfu} on {a.card})")


if __name__ == "__main__":
    main()
