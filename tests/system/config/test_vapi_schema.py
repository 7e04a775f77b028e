"""VAπ config cross-field rules (`check_vapi_config`), checked before any actor starts."""
import pytest

from system.config.load import load_config
from system.config.vapi_schema import VapiExperiment, check_vapi_config

LLAMAGEN = ["method.export_url=null", "method.llamagen_gpt=/w/c2i.pt", "method.llamagen_vq=/w/vq.pt"]


def _cfg(*argv):
    return load_config(VapiExperiment, [*LLAMAGEN, *argv], ["experiments/vapi_tiny.yaml"])


def test_defaults_are_the_papers():
    cfg = load_config(VapiExperiment, ["run_name=r", "data.url=s3://bucket/imagenet/train"], [])
    m = cfg.method
    assert (m.group_size, m.clip_eps, m.adv_clip, m.beta, cfg.optim.lr, cfg.data.fraction) == (8, 0.2, 5.0, 0.1, 1e-6, 0.01)
    assert m.export_url.endswith("eostok-h/export") and not m.off_policy
    check_vapi_config(_cfg())  # the demo's settings with LlamaGen paths pass


@pytest.mark.parametrize("argv, match", [
    (["method.export_url=runs/x/export"], "either method.export_url or method.llamagen_gpt"),
    (["method.w_lpips=1.0", "method.lpips_net.random_init=false"], "needs method.lpips_net.vgg_path"),
    (["method.group_size=1"], "group_size >= 2"),
    (["cluster.num_workers=3"], "split evenly over cluster.num_workers=3"),
    (["optim.grad_accum=2"], "set optim.grad_accum=1"),
    (["method.crash_rollout_at_call=2", "checkpoint.storage_path=s3://bucket/runs"], "needs a local checkpoint.storage_path"),
])
def test_rules_name_the_key(argv, match):
    with pytest.raises(ValueError, match=match):
        check_vapi_config(_cfg(*argv))


def test_missing_export_is_a_config_error(tmp_path):
    cfg = load_config(VapiExperiment, [f"method.export_url={tmp_path}/none/export"], ["experiments/vapi_tiny.yaml"])
    with pytest.raises(ValueError, match="train one with jobs/eostok_h.py first"):
        check_vapi_config(cfg)
