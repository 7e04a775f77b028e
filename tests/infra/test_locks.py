"""Each lock (infra/lock.py) holds its target's whole dependency closure, offline: the closure of the
project with the target's extras, over the requirements pip's resolver reported for the target's
Python and platform (lock-<target>.requires.json, written with the lock), is pinned, and every pin
satisfies what its dependents ask. For the cuda target this is the image's closure (CUDA torch,
triton, nvidia-*, flash-attn), checked here without CUDA and without a network."""
from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

INFRA = Path(__file__).resolve().parents[2] / "infra"
spec = importlib.util.spec_from_file_location("infra_lock", INFRA / "lock.py")
lock = importlib.util.module_from_spec(spec)
sys.modules.setdefault("infra_lock", lock)
spec.loader.exec_module(lock)

TARGETS = sorted(lock.TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_lock_was_made_from_this_pyproject(name):
    target = lock.TARGETS[name]
    made_from, _ = lock.read_snapshot(target)
    assert made_from == [str(r) for r in lock.target_roots(target)], \
        f"pyproject.toml changed since {target.lock.name} was written: re-run python infra/lock.py"
    _, header = lock.read_lock(target.lock)
    assert header == {"target": name, "python": target.python, "platform": target.platform,
                      "extras": ",".join(target.extras)}


@pytest.mark.parametrize("name", TARGETS)
def test_lock_covers_its_targets_closure(name):
    """The closure check: every package the target installs is pinned, and nothing else is."""
    target = lock.TARGETS[name]
    pins, _ = lock.read_lock(target.lock)
    _, requires_of = lock.read_snapshot(target)
    assert lock.missing_pins(target, pins, requires_of) == []
    need = lock.closure(lock.target_roots(target), requires_of, target.environment())
    assert set(pins) - set(need) == set(), f"{target.lock.name} pins packages its target does not need"


def test_cuda_closure_has_the_cuda_torchs_requirements():
    target = lock.TARGETS["cuda"]
    pins, _ = lock.read_lock(target.lock)
    _, requires_of = lock.read_snapshot(target)
    torch_needs = {canonicalize_name(Requirement(r).name) for r in requires_of("torch")
                   if lock.applies(r, (), target.environment())}
    assert "triton" in torch_needs and any(n.startswith("nvidia-") for n in torch_needs)
    assert torch_needs <= set(pins)
    assert requires_of("flash-attn") == list(lock.FLASH_ATTN_REQUIRES)


@pytest.mark.parametrize("dropped", ["triton", "nvidia-nccl-cu13", "einops"])
def test_a_closure_package_without_a_pin_fails(dropped):
    target = lock.TARGETS["cuda"]
    pins, _ = lock.read_lock(target.lock)
    assert dropped in pins
    del pins[dropped]
    assert lock.missing_pins(target, pins, lock.read_snapshot(target)[1]) == [dropped]


@pytest.mark.parametrize("name", TARGETS)
def test_every_pin_satisfies_its_dependents(name):
    """The lock is consistent: each requirement in the closure admits the pinned version."""
    target = lock.TARGETS[name]
    pins, _ = lock.read_lock(target.lock)
    _, requires_of = lock.read_snapshot(target)
    env = target.environment()
    need = lock.closure(lock.target_roots(target), requires_of, env)
    bad = []
    for parent, extras in need.items():
        lines = requires_of(parent) or []
        for line in lines:
            req = Requirement(line)
            if lock.applies(line, extras, env) and not req.specifier.contains(Version(pins[canonicalize_name(req.name)]), prereleases=True):
                bad.append(f"{parent} needs {req}, {target.lock.name} pins {pins[canonicalize_name(req.name)]}")
    for req in lock.target_roots(target):
        if not req.specifier.contains(Version(pins[canonicalize_name(req.name)]), prereleases=True):
            bad.append(f"pyproject.toml needs {req}, {target.lock.name} pins {pins[canonicalize_name(req.name)]}")
    assert not bad, "\n".join(bad)


def test_cpu_snapshot_agrees_with_the_installed_metadata():
    """The snapshot says what the packages themselves say: for the CPU lock (this environment), each
    installed package's own Requires-Dist lines that apply here are in the snapshot."""
    target = lock.TARGETS["cpu"]
    pins, _ = lock.read_lock(target.lock)
    _, requires_of = lock.read_snapshot(target)
    env = target.environment()
    need = lock.closure(lock.target_roots(target), requires_of, env)
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        ours = {str(Requirement(r)) for r in dist.requires or [] if lock.applies(r, need.get(name, ()), env)}
        assert ours == {str(Requirement(r)) for r in requires_of(name)}, name
        checked += 1
    assert checked > 100
