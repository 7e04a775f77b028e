import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))
import make_shards  # noqa: E402


@pytest.mark.parametrize(
    "argv,message",
    [
        (["src=/a", "out=/b", "shard_sise=3"], "unknown config key 'shard_sise'"),
        (["src=/a", "out=/b", "shard_size=many"], "shard_size"),
        (["out=/b"], "src"),
        (["src=/a", "out=s3://"], "out"),
        (["src=/a", "out=/b", "storage.retry_mode=sometimes"], "retry_mode"),
    ],
)
def test_config_errors_exit_2_before_ray(argv, message, capsys):
    import ray

    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    for split, n in (("train", 8), ("val", 2)):
        for c, wnid in enumerate(("n01", "n02", "n03", "n04")):
            (tmp_path / "src" / split / wnid).mkdir(parents=True)
            for j in range(n):
                arr = np.random.default_rng([c, j]).integers(0, 256, (24, 32, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG")
                (tmp_path / "src" / split / wnid / f"{j}.JPEG").write_bytes(buf.getvalue())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, str(ROOT / "jobs/make_shards.py"), f"src={tmp_path / 'src'}", f"out={tmp_path / 'out'}"]
    bad = subprocess.run(cmd + ["shard_size=x"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "shard_size" in bad.stderr and "Started a local Ray" not in bad.stderr
    ok = subprocess.run(cmd + ["shard_size=12", "cluster.local_num_cpus=2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = [json.loads(line) for line in ok.stdout.splitlines() if line.startswith('{"split"')]
    assert lines == [{"split": "train", "shards": 3, "num_samples": 32}, {"split": "val", "shards": 1, "num_samples": 8}]
    index = json.loads((tmp_path / "out/train/index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [12, 12, 8] and index["classes"]["n04"] == 3
