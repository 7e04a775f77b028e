"""VAπ config rules (method-level `system.methods.vapi.check_config` and the experiment-level
`system.methods.vapi_rollouts.VapiRollouts.check`), checked by the driver's `resolve_job` before any
actor starts."""
import pytest

from cluster.training import resolve_job as check_vapi_experiment
from system.config import ConfigError, VapiExperiment, load_config

LLAMAGEN = ["method.export_url=null", "method.llamagen_gpt=/w/c2i.pt", "method.llamagen_vq=/w/vq.pt"]


def _cfg(*argv):
    return load_config(VapiExperiment, [*LLAMAGEN, *argv], ["experiments/vapi_tiny.yaml"])


def test_defaults_are_the_papers():
    cfg = load_config(VapiExperiment, ["run_name=r", "data.url=s3://bucket/imagenet/train"], ["experiments/vapi.yaml"])
    m = cfg.method
    assert (m.group_size, m.clip_eps, m.adv_clip, m.beta, m.adv_eps) == (8, 0.2, 5.0, 0.1, 1e-8)
    assert (cfg.optim.lr, cfg.data.fraction, cfg.data.batch_size, cfg.train.max_steps) == (1e-6, 0.01, 128, 100)
    assert m.update_mode == "train" and m.export_url.endswith("eostok-h/export") and not m.off_policy
    check_vapi_experiment(_cfg())  # the demo's settings with LlamaGen paths pass


@pytest.mark.parametrize("argv, match", [
    (["method.export_url=runs/x/export"], "either method.export_url or method.llamagen_gpt"),
    (["method.w_lpips=1.0", "method.lpips_net.random_init=false"], "needs method.lpips_net.vgg_path"),
    (["method.group_size=1"], "'method.group_size' = 1 is out of range: it must be >= 2"),  # on load
    (["method.temperature=0"], "'method.temperature' = 0.0 is out of range: it must be > 0"),
    (["cluster.num_workers=3"], "split evenly over cluster.num_workers=3"),
    (["optim.grad_accum=2"], "set optim.grad_accum=1"),
    (["method.crash_rollout_at_call=2", "checkpoint.storage_path=s3://bucket/runs"], "needs a local checkpoint.storage_path"),
])
def test_rules_name_the_key(argv, match):
    with pytest.raises(ValueError, match=match):
        check_vapi_experiment(_cfg(*argv))


@pytest.mark.parametrize("key", ["method.model.ar=eostok-l", "method.disc_lr=0.1", "train.ema_decay=0.9", "model.ar=x"])
def test_keys_of_other_methods_are_unknown(key):
    with pytest.raises(ConfigError, match="unknown config key"):
        _cfg(key)


def test_missing_export_is_a_config_error(tmp_path):
    cfg = load_config(VapiExperiment, [f"method.export_url={tmp_path}/none/export"], ["experiments/vapi_tiny.yaml"])
    with pytest.raises(ValueError, match="train one with jobs/eostok_h.py first"):
        check_vapi_experiment(cfg)
