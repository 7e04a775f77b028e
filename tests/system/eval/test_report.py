import json

import numpy as np

from system.eval.inception import RANDOM_WEIGHTS_LABEL
from system.eval.report import RANDOM_LPIPS_LABEL, build_report, flat_metrics, format_table


def _report(pretrained=False):
    return build_report(
        inception_label=RANDOM_WEIGHTS_LABEL if not pretrained else "Inception-v3", inception_pretrained=pretrained,
        lpips_pretrained=pretrained,
        generation={"samples": "s.npz", "num_images": 8, "fid": np.float64(12.5), "inception_score": 1.5,
                     "precision": 0.5, "recall": None},
        reconstruction={"shards": "val", "num_images": 4, "rfid": 3.0, "psnr": float("inf"), "codebook_usage": 0.25,
                        "codebook_size": 64},
        config={"seed": 0}, device="cpu", seconds=1.23456,
    )


def test_report_is_json_and_labels_random_weights():
    r = _report()
    assert json.loads(json.dumps(r, allow_nan=False)) == r  # numpy scalars and inf made JSON-safe
    assert r["inception"] == {"label": RANDOM_WEIGHTS_LABEL, "pretrained": False}
    assert r["lpips"]["label"] == RANDOM_LPIPS_LABEL
    assert r["generation"]["fid"] == 12.5 and r["reconstruction"]["psnr"] is None
    assert any("not a real FID" in w for w in r["warnings"]) and r["seconds"] == 1.235
    assert _report(pretrained=True)["warnings"] == []


def test_table_and_flat_metrics():
    r = _report()
    table = format_table(r)
    assert f"[{RANDOM_WEIGHTS_LABEL}]" in table and "fid                       12.5000" in table
    assert "recall                    n/a" in table and "WARNING:" in table
    flat = flat_metrics(r)
    assert flat == {"generation/fid": 12.5, "generation/inception_score": 1.5, "generation/precision": 0.5,
                    "reconstruction/rfid": 3.0, "reconstruction/codebook_usage": 0.25, "reconstruction/codebook_size": 64.0}
