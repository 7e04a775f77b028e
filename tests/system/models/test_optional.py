"""diffusers is SemTok's extra (`tokenizer-ar[semtok]`): without it every other method registers and
runs, and SemTok fails with a message naming the extra to install."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from system.models.optional import missing, require

REPO = Path(__file__).resolve().parents[3]

WITHOUT_DIFFUSERS = """
import sys
sys.modules["diffusers"] = None  # as if it were not installed
from system.methods import registry
print("methods:", ",".join(registry.names()))
for call in (lambda: registry.get("semtok"), lambda: __import__("system.models.mmdit"),
             lambda: __import__("system.models.vae", fromlist=["x"]).new_autoencoder()):
    try:
        call()
    except ModuleNotFoundError as e:
        print("error:", e.name, "|", e)
"""


def test_missing_names_the_extra(monkeypatch):
    e = missing("diffusers")
    assert e.name == "diffusers" and "pip install 'tokenizer-ar[semtok]'" in str(e) and "SemTok" in str(e)
    assert require("json").dumps([1]) == "[1]"
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tokenizer-ar\[semtok\]'"):
        require("diffusers")


def test_every_other_method_works_without_diffusers():
    out = subprocess.run([sys.executable, "-c", WITHOUT_DIFFUSERS], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    methods = out.stdout.split("methods:", 1)[1].splitlines()[0].strip().split(",")
    assert {"eostok", "alitok_stage1", "ar", "vapi"} <= set(methods) and "semtok" not in methods, methods
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, out.stdout
    for line in errors:
        assert line.startswith("error: diffusers |") and "pip install 'tokenizer-ar[semtok]'" in line, line


IMPORTS_OF_A_JOB = """
import sys
from system.config.methods import EOSTokConfig, VapiConfig
from system.methods import registry
from system.models.tokenizers import frozen_tokenizer, load_tokenizer
from system.models.tokenizer1d import Tokenizer1D, tokenizer_config
assert registry.for_config(EOSTokConfig()).name == "eostok" and registry.for_config(VapiConfig()).name == "vapi"
frozen_tokenizer(Tokenizer1D(tokenizer_config("debug-tiny")))
print("loaded:", "diffusers" in sys.modules, "system.models.semtok" in sys.modules, "torch._dynamo" in sys.modules)
print("methods:", ",".join(registry.names()))
print("loaded:", "diffusers" in sys.modules, "system.models.semtok" in sys.modules)
"""


def test_a_job_of_another_method_never_imports_diffusers():
    """The method and tokenizer registries import a built-in only when it is asked for: diffusers
    (about 5 s in every process, each rank included) stays out of every job but SemTok's."""
    out = subprocess.run([sys.executable, "-c", IMPORTS_OF_A_JOB], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("loaded:")]
    assert lines == ["loaded: False False False", "loaded: True True"], out.stdout
    assert "semtok" in out.stdout.split("methods:", 1)[1]
