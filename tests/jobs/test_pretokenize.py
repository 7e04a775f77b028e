"""jobs/pretokenize.py: config errors exit 2 naming the key before Ray starts; end to end on the
embedded photos with a random-weight debug-tiny export (then a re-run writes nothing)."""
from __future__ import annotations

import pytest

import pretokenize
from system.data import TokenShardReader, read_index
from system.data.embedded import ensure_embedded_dataset


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return ensure_embedded_dataset(str(tmp_path_factory.mktemp("photos") / "val"), split="val", per_class=2, resolution=40)


@pytest.mark.parametrize("args,key", [
    (["augment=mirror"], "augment"),
    (["batch_size=0"], "batch_size"),
    (["src=/no/such/shards"], "'src'"),
    (["export_url=/no/such/export"], "'export_url'"),
    (["resolution=48"], "'resolution'"),
    (["out={src}"], "'out'"),
    (["shard_sise=3"], "shard_sise"),
])
def test_config_errors_exit_2_before_ray(args, key, photos, tiny_export, tmp_path, capsys):
    import ray

    base = {"src": photos, "out": str(tmp_path / "out"), "export_url": str(tiny_export)}
    argv = [f"{k}={v}" for k, v in base.items()] + [a.format(src=photos) for a in args]
    with pytest.raises(SystemExit) as e:
        pretokenize.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("config error:") and key in err, err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_end_to_end_and_rerun(photos, tiny_export, tmp_path, capsys):
    import ray

    out = str(tmp_path / "tokens")
    argv = [f"src={photos}", f"out={out}", f"export_url={tiny_export}", "augment=ten-crop", "batch_size=32",
            "cluster.local_num_cpus=2", "cluster.device=cpu"]
    try:
        assert pretokenize.main(argv) == 0
        err = capsys.readouterr().err
        assert "token samples (views)  160" in err and "shards written now     2" in err and "bytes per view" in err
        idx = read_index(out)
        assert idx["tokens"]["augment"] == "ten-crop" and idx["tokens"]["tokenizer"]["kind"] == "tokenizer1d"
        r = TokenShardReader(out, batch_size=16, drop_last=False)
        keys = [k for b in r.one_epoch() for k in b["key"]]
        assert len(keys) == len(set(keys)) == 160 and r.classes == read_index(photos)["classes"]
        assert pretokenize.main(argv) == 0  # a re-run: every shard's marker matches
        assert "shards written now     0" in capsys.readouterr().err and read_index(out) == idx
    finally:
        ray.shutdown()
