"""Config schema: overrides, YAML files, and the errors users see for bad input."""
from __future__ import annotations

import pytest
import yaml

from system.config import ConfigError, EOSTokExperiment, load_config, redact, to_yaml

BASE = ["run_name=t", "data.url=/tmp/shards"]


def test_overrides_and_types():
    cfg = load_config(EOSTokExperiment, [*BASE, "optim.lr=3e-4", "deepspeed.zero_stage=3", "optim.betas=[0.9,0.96]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.optim.betas == (0.9, 0.96)
    assert cfg.method.ntp == pytest.approx(0.1)


def test_config_file_then_cli_wins(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"run_name": "fromfile", "data": {"url": "/d", "batch_size": 7}, "train": {"max_steps": 5}}))
    cfg = load_config(EOSTokExperiment, ["--config", str(f), "train.max_steps=9"])
    assert (cfg.run_name, cfg.data.batch_size, cfg.train.max_steps) == ("fromfile", 7, 9)


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([*BASE, "optim.lrr=1"], "unknown config key 'optim.lrr'. Allowed keys here: lr,"),
        ([*BASE, "nope=1"], "unknown config key 'nope'"),
        ([*BASE, "train.max_steps=many"], "bad value for config key 'train.max_steps'"),
        ([*BASE, "deepspeed.zero_stage=5"], "expected one of [0, 1, 2, 3]"),
        ([*BASE, "method.model.attn_backend=xformers"], "method.model.attn_backend"),
        ([*BASE, "model.ar=eostok-l"], "unknown config key 'model'"),
        ([*BASE, "train.ema_decay=0.9"], "unknown config key 'train.ema_decay'"),
        (["data.url=/x"], "missing required config value(s): run_name"),
        (["run_name=t", "data.url=s3://"], "names no bucket"),
        (["run_name=t", "data.url=gopher://host/x"], "unsupported storage URL 'gopher://host/x'"),
        ([*BASE, "--verbose"], "cannot read argument '--verbose'"),
        ([*BASE, "--config"], "--config needs a YAML file"),
        ([*BASE, "--config", "/does/not/exist.yaml"], "config file not found"),
    ],
)
def test_errors_name_the_key(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(EOSTokExperiment, argv)
    assert needle in str(e.value)


@pytest.mark.parametrize("name", ["a/b", "my run", "../up", ".hidden", "''", "x" * 129, "a\\b", "tab\there"])
def test_a_run_name_is_one_safe_path_segment(name):
    """A run name is the run's folder and a word of the printed `sample:` / `evaluate:` commands."""
    with pytest.raises(ConfigError, match=r"config key 'run_name' = .* is not a usable run name: .*one path segment"):
        load_config(EOSTokExperiment, ["data.url=/x", f"run_name={name}"])


def test_every_run_name_of_a_pipeline_and_of_side_by_side_runs_is_checked(tmp_path):
    from system.config import ARExperiment
    from system.config.load import apply_overrides
    from system.pipelines.alitok import ALITOK

    for name, fine in (("eostok-tiny_2.b", True), ("a/b", False)):
        if fine:
            assert load_config(EOSTokExperiment, ["data.url=/x", f"run_name={name}"]).run_name == name
        argv = [f"storage_path={tmp_path}", f"run_name={name}"]
        if fine:
            assert ALITOK.load(argv).run_name == name
        else:
            with pytest.raises(ConfigError, match="config key 'run_name' = 'a/b' is not a usable run name"):
                ALITOK.load(argv)
    ar = load_config(ARExperiment, ["run_name=ar", "data.url=/x", "method.tokenizer_export=/t"])
    with pytest.raises(ConfigError, match="config key 'run_name' = 'ar-s l'"):
        apply_overrides(ar, ["run_name=ar-s l"])


def test_errors_start_no_cluster():
    ray = pytest.importorskip("ray")
    with pytest.raises(ConfigError):
        load_config(EOSTokExperiment, ["run_name=t", "data.url=/x", "cluster.num_workers=two"])
    assert not ray.is_initialized()


def test_secrets_redacted():
    cfg = load_config(
        EOSTokExperiment,
        [*BASE, "data.storage.key=AKIAXXXX", "data.storage.secret=s3cr3t", "checkpoint.storage_path=s3://u:pw@bkt/runs"],
    )
    text = to_yaml(cfg)
    assert "s3cr3t" not in text and "AKIAXXXX" not in text and ":pw@" not in text
    assert "'***'" in text or "***" in text
    assert redact({"wandb_api_key": "x", "token": "y", "keep_last": 3}) == {"wandb_api_key": "***", "token": "***", "keep_last": 3}


def test_every_shipped_yaml_is_valid():
    """Each experiment file under configs/experiments loads against its job's schema."""

    from system.config.load import CONFIG_DIR

    from system.config import VapiExperiment

    for pattern, schema in (("eostok*.yaml", EOSTokExperiment), ("vapi*.yaml", VapiExperiment)):
        files = sorted(f for f in (CONFIG_DIR / "experiments").glob(pattern) if "pipeline" not in f.name)
        assert files, f"no {pattern} experiment configs shipped"
        for f in files:
            cfg = load_config(schema, ["--config", str(f), "data.url=/x"])
            assert cfg.run_name
    for f in sorted((CONFIG_DIR / "model").glob("eostok*.yaml")):
        assert load_config(EOSTokExperiment, ["--config", str(f), "run_name=t", "data.url=/x"]).method.model.ar


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EOSTokExperiment, ["run_name=t", "data.url=shards/train", "data.storage.endpoint_url=http://h:1"])
    assert cfg.data.url == str(tmp_path / "shards" / "train")
    assert cfg.checkpoint.storage_path == str(tmp_path / "runs")


JOBS = [  # (schema, default YAML files of the job, required overrides)
    ("EOSTokExperiment", ["base.yaml", "data/imagenet.yaml", "model/eostok_h.yaml", "experiments/eostok_h.yaml"], []),
    ("EOSTokExperiment", ["experiments/eostok_tiny.yaml"], []),
    ("VapiExperiment", ["data/imagenet.yaml", "experiments/vapi.yaml"], []),
    ("AliTokStage1Experiment", ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage1.yaml"], []),
    ("AliTokStage2Experiment", ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage2.yaml"], []),
    ("AliTokStage1Experiment", ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage1.yaml",
                                "experiments/alitok_tiny_stage1.yaml"], []),
    ("AliTokStage2Experiment", ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage2.yaml",
                                "experiments/alitok_tiny_stage2.yaml"], []),
    ("SampleConfig", ["sample.yaml"], ["export_url=/runs/x/export"]),
    ("EvaluateConfig", ["evaluate.yaml"], ["samples=/runs/x/samples.npz"]),
    ("MakeShardsConfig", ["make_shards.yaml"], ["src=/data/imagenet", "out=s3://bucket/shards"]),
]


@pytest.mark.parametrize("schema_name, defaults, required", JOBS, ids=[f"{j[0]}-{j[1][-1]}" for j in JOBS])
def test_saved_config_loads_back_equal(schema_name, defaults, required, tmp_path):
    """What a run saves (config.yaml) is a valid --config for the same job and gives the same
    resolved config, apart from redacted secrets (e.g. num_latent_tokens is not a secret)."""
    import system.config as C

    schema = getattr(C, schema_name)
    over = [*required, "storage.key=AKIAXXXX" if schema_name in ("SampleConfig", "EvaluateConfig", "MakeShardsConfig")
            else "data.storage.key=AKIAXXXX"]
    cfg = load_config(schema, over, defaults)
    text = to_yaml(cfg)
    assert "AKIAXXXX" not in text and "'***'" in text
    (tmp_path / "config.yaml").write_text(text)
    again = load_config(schema, ["--config", str(tmp_path / "config.yaml")])
    plain = C.to_dict(cfg)
    back = C.to_dict(again)
    storage = plain.get("data", plain).get("storage")
    storage["key"] = "***"  # the one redacted value
    assert back == plain
    if schema_name == "EOSTokExperiment" and "eostok_tiny" in defaults[-1]:
        assert again.method.model.tokenizer_overrides["num_latent_tokens"] == 64


def test_only_real_secrets_are_redacted():
    tree = {"num_latent_tokens": 32, "max_new_tokens": 4, "keep_last": 3, "key": "k", "secret": "s", "token": "t",
            "wandb_api_key": "w", "aws_secret_access_key": "a", "password": "p", "sort_key": "x", "tokenizer": "eostok"}
    out = redact(tree)
    assert out == {**tree, "key": "***", "secret": "***", "token": "***", "wandb_api_key": "***",
                   "aws_secret_access_key": "***", "password": "***"}


def test_ranges_are_checked_on_load():
    with pytest.raises(ConfigError, match=r"config key 'cluster.max_failures' = -1 is out of range: it must be >= 0"):
        load_config(EOSTokExperiment, [*BASE, "cluster.max_failures=-1"])
    with pytest.raises(ConfigError, match=r"'data.fraction' = 1.5 is out of range: it must be in \(0, 1\]"):
        load_config(EOSTokExperiment, [*BASE, "data.fraction=1.5"])
    assert load_config(EOSTokExperiment, [*BASE, "cluster.local_num_cpus=null"]).cluster.local_num_cpus is None
