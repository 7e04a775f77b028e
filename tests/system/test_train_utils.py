import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from system.train_utils import EMA, capture_rng_state, image_grid, lr_factor, restore_rng_state, save_image_grid, seed_everything


def test_lr_warmup_then_cosine_to_min():
    kw = dict(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert lr_factor(500, **kw) == pytest.approx(0.1)  # clamped past the end
    vals = [lr_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay


def test_lr_constant_and_bad_schedule():
    assert lr_factor(3, warmup_steps=0, max_steps=10, min_ratio=0.0, schedule="constant") == 1.0
    assert lr_factor(0, warmup_steps=0, max_steps=10, min_ratio=0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, warmup_steps=0, max_steps=10, min_ratio=0.0, schedule="linear")


def test_ema_update_swap_state():
    p = {"w": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}
    ema = EMA(p, decay=0.9)
    p["w"] += 1.0
    ema.update(p)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.1))
    assert ema.shadow["b"].dtype == torch.float32
    ema.swap(p)
    assert torch.allclose(p["w"], torch.full((3,), 0.1)) and torch.allclose(ema.shadow["w"], torch.ones(3))
    ema.swap(p)
    assert torch.equal(p["w"], torch.ones(3))
    other = EMA(p, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"w": torch.zeros(3)})
    with pytest.raises(ValueError):
        EMA(p, decay=1.0)


def test_ema_warmup_decay_ramps_up_to_the_decay():
    ema = EMA({"w": torch.zeros(1)}, decay=0.99)
    assert ema.warmup_decay(1) == pytest.approx(2 / 11) and ema.warmup_decay(10) == pytest.approx(11 / 20)
    assert ema.warmup_decay(10**6) == 0.99  # capped at the configured decay
    assert [ema.warmup_decay(n) for n in range(1, 50)] == sorted(ema.warmup_decay(n) for n in range(1, 50))


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


def test_rng_capture_restore_roundtrip_weights_only(tmp_path):
    seed_everything(5)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = _draws()
    seed_everything(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == first


def test_image_grid_and_png():
    rows = {"a": torch.zeros(3, 3, 8, 8) - 1, "b": torch.ones(2, 1, 8, 8)}
    grid = image_grid(rows.values(), pad=2)
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3) and grid.dtype == np.uint8
    assert grid[2 + 10, 2].tolist() == [255, 255, 255]  # row b, first cell (gray -> rgb)
    assert grid[2 + 10, 2 + 2 * 10].tolist() == [0, 0, 0]  # row b has no third image
    buf = io.BytesIO()
    save_image_grid(list(rows.values()), buf)  # unnamed rows: the grid alone, 8 px cells upscaled x12 to 96 px
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.size == (32 * 12, 22 * 12) and img.format == "PNG"
    assert np.array_equal(np.asarray(img)[::12, ::12], grid)  # nearest upscale keeps every pixel
    buf = io.BytesIO()
    save_image_grid(rows, buf, title="step 5")  # named rows get a label column on the left, title on top
    labelled = Image.open(io.BytesIO(buf.getvalue()))
    assert labelled.height == 22 * 12 + 24 and labelled.width > 32 * 12
    assert np.array_equal(np.asarray(labelled)[24:, -32 * 12 :], np.asarray(img))
    with pytest.raises(ValueError, match="row 0"):
        image_grid([torch.zeros(3, 8, 8)])


DETERMINISM = """
import sys, torch
from system.train_utils import use_deterministic_algorithms
{call}
before = "torch._inductor.config" in sys.modules
import torch._inductor.config as inductor_config
print(before, torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
      inductor_config.deterministic)
"""


def test_deterministic_algorithms_agree_with_torch_without_importing_inductor():
    """Ours leaves torch._inductor unloaded (3-4 s per rank) and sets what torch's sets, inductor's
    flag included, whether inductor is loaded before or after the call."""
    import subprocess
    import sys

    def run(call: str) -> list[str]:
        code = DETERMINISM.format(call=call)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()

    assert run("torch.use_deterministic_algorithms(True)") == ["True", "True", "False", "True"]
    assert run("use_deterministic_algorithms(warn_only=True)") == ["False", "True", "True", "True"]
    assert run("import torch._inductor.config\nuse_deterministic_algorithms()") == ["True", "True", "False", "True"]
