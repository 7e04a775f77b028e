"""Per-iteration time of VAπ on CPU, split into rollout (policy forward + sampling), decode + reward,
learner update and weight sync (learner publish to the object store + actor fetch/load), through
the real pool (cluster.training.run_training: 2 rollout actors + a 1-worker Ray Train + DeepSpeed learner,
embedded photos).

    python bench/vapi_iteration.py [--iters 12] [--batch 8] [--group 8] [--layers 4] [--dim 256] [--no-lpips]
    python bench/vapi_iteration.py --export runs/eostok-tiny/export     # the demo's model (64 px)

Defaults follow the paper's iteration (8 images x group 8, reward = MSE + LPIPS) on a small random
model; LPIPS runs with a random VGG16 (its cost is real, its values are not). Phases are per
iteration (rollout/decode: the slowest actor); the first 2 iterations are warm-up.
Goal: weight sync < 5% of the iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_export(folder: Path, layers: int, dim: int) -> Path:
    """A random-weight debug-tiny tokenizer + GPT (n_layer=layers, dim=dim) as a run exports it."""
    import torch

    from system.models.artifacts import Artifact, save_export
    from system.models.gpt import GPT
    from system.models.registry import gpt_config
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    torch.manual_seed(0)
    tc = tokenizer_config("debug-tiny")
    ac = gpt_config("debug-tiny", vocab_size=tc.quantizer.codebook_size, block_size=tc.seq_len, code_dim=tc.latent_dim,
                    num_classes=8, n_layer=layers, dim=dim, n_head=max(1, dim // 16))
    save_export(str(folder), {"tokenizer": Artifact.of("tokenizer1d", Tokenizer1D(tc)), "ar": Artifact.of("gpt", GPT(ac))})
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True, help="LPIPS in the reward")
    ap.add_argument("--export", default=None, help="an existing export/ folder instead of a random model")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from cluster.checkpoint import CheckpointStore
    from cluster.training import run_training
    from system.config import VapiExperiment, load_config
    from system.data.embedded import ensure_embedded_dataset

    tmp = Path(tempfile.mkdtemp(prefix="vapi_bench_"))
    data = ensure_embedded_dataset(str(ROOT / ".cache/embedded_shards/train"), split="train")
    from system.models.artifacts import read_model_json

    export = Path(a.export).resolve() if a.export else build_export(tmp / "export", a.layers, a.dim)
    model = {name: part["config"] for name, part in read_model_json(str(export)).items()}
    resolution = model["tokenizer"]["image_size"]
    lpips = ["method.w_lpips=1.0", "method.lpips_net.random_init=true"] if a.lpips else ["method.w_lpips=0.0"]
    cfg = load_config(VapiExperiment, [
        "run_name=bench", f"data.url={data}", "data.val_url=null", f"data.batch_size={a.batch}",
        f"data.resolution={resolution}", *lpips,
        f"method.group_size={a.group}", f"method.export_url={export}", "method.heldout_images=0",
        f"train.max_steps={a.iters}", f"checkpoint.every_steps={10 * a.iters}", f"checkpoint.storage_path={tmp}/runs",
        "logging.wandb_mode=disabled", "logging.progress=false",
    ], ["experiments/vapi_tiny.yaml"])
    try:
        history = CheckpointStore(run_training(cfg).run_url).read_jsonl("metrics.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = history[3:] or history  # iter_s / update_wall_s describe the iteration before
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    it = mean("iter_s")
    split = {"rollout_s": mean("sample_s"), "decode_reward_s": mean("reward_s"), "update_s": mean("update_wall_s"),
             "weight_sync_s": mean("weight_sync_s"), "iteration_s": it}
    report = {**{k: round(v, 4) for k, v in split.items()},
              **{f"{k}_pct": round(100 * v / it, 1) for k, v in split.items() if k != "iteration_s"},
              "other_pct (driver, transfers, queueing)": round(100 * (it - sum(v for k, v in split.items() if k != "iteration_s")) / it, 1),
              "sync_publish_s (learner state dict -> ray.put)": round(mean("publish_s"), 4),
              "sync_fetch_load_s (actor ray.get + load_state_dict)": round(mean("weight_sync_s") - mean("publish_s"), 4),
              "rollout_tokens_per_s": round(mean("rollout_tokens_per_s"), 1),
              "images_x_group": f"{a.batch}x{a.group}", "lpips": a.lpips, "resolution": resolution,
              "ar": f"{model['ar']['n_layer']} layers, dim {model['ar']['dim']}", "export": str(export)}
    print(json.dumps(report, indent=1))
    print(f"weight sync = {100 * split['weight_sync_s'] / it:.1f}% of the iteration (goal < 5%)")


if __name__ == "__main__":
    main()
