"""AliTok's released checkpoints (github.com/ali-vilab/alitok: weights/AliTok.pth, weights/alitok_{b,l,xl}.bin)
-> an export folder every job reads (kinds "alitok-released": the official tensors unchanged, read into
our tokenizer1d and GPT when loaded; system/models/adapters_alitok.py).

    python jobs/import_alitok.py tokenizer=weights/AliTok.pth ar=weights/alitok_b.bin out=runs/alitok-b/export
    python jobs/sample.py --config configs/experiments/alitok_sample_b.yaml export_url=runs/alitok-b/export
    python jobs/evaluate.py samples=runs/alitok-b/samples/samples.npz export_url=runs/alitok-b/export
    python jobs/vapi.py method.export_url=runs/alitok-b/export data.resolution=256 ...

Every tensor of the files is used and every one of our models' is loaded (else a config error naming
the tensor, exit status 2); nothing is written then.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from system.config import ImportAliTokConfig, cli_config, exit_on_config_error  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = cli_config(ImportAliTokConfig, argv)
    from system.models.artifacts import save_export
    from system.sampling.generators import released_alitok

    def read():
        try:
            return released_alitok(cfg.ar, cfg.tokenizer, cfg.preset, **cfg.overrides)
        except (FileNotFoundError, KeyError) as e:
            raise ValueError(str(e)) from None

    parts = exit_on_config_error(read)
    save_export(cfg.out, parts, cfg.storage)
    print(json.dumps({"export_url": cfg.out, "parts": {n: a.kind for n, a in parts.items()},
                      "tensors": {n: len(a.state_dict) for n, a in parts.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
