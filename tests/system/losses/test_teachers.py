"""Frozen DINOv2 / SigLIP teachers with random tiny weights and local from_pretrained paths."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from system.losses.teachers import Teacher, TeacherConfig, build_teacher  # noqa: E402


def _imgs(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("kind,size,patch", [("dinov2", 28, 14), ("siglip", 32, 16)])
def test_tiny_random_teacher_shapes_and_frozen(kind: str, size: int, patch: int) -> None:
    torch.manual_seed(0)
    t = Teacher(TeacherConfig(kind=kind, image_size=size, random_init=True, tiny=True))
    x = _imgs(size=48).requires_grad_(True)  # resized to the teacher's input size inside
    out = t(x)
    assert out.shape == (2, (size // patch) ** 2, 32) and out.dtype == torch.float32
    assert t.grid == (size // patch, size // patch) and t.dim == 32
    assert not out.requires_grad  # no graph through the teacher
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.model.training


def test_dinov2_normalisation_and_cls_removed() -> None:
    torch.manual_seed(0)
    t = Teacher(TeacherConfig(kind="dinov2", image_size=28, random_init=True, tiny=True))
    x = _imgs(size=28)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = t.model(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state
    assert ref.shape[1] == 5  # CLS + 4 patches
    assert torch.allclose(t(x), ref[:, 1:], atol=1e-6)


def test_siglip_normalisation() -> None:
    torch.manual_seed(0)
    t = Teacher(TeacherConfig(kind="siglip", image_size=32, random_init=True, tiny=True))
    x = _imgs(size=32)
    with torch.no_grad():
        ref = t.model(pixel_values=x).last_hidden_state  # ((x+1)/2 - .5)/.5 == x
    assert torch.allclose(t(x), ref, atol=1e-6)


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="no weights: set path"):
        Teacher(TeacherConfig(kind="dinov2"))
    with pytest.raises(ValueError, match="conflicts"):
        Teacher(TeacherConfig(kind="dinov2", path="/x", random_init=True))
    with pytest.raises(ValueError, match="kind='clip'"):
        Teacher(TeacherConfig(kind="clip", random_init=True))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of patch"):
        Teacher(TeacherConfig(kind="siglip", image_size=40, random_init=True, tiny=True))
    assert build_teacher(None) is None


def test_local_path_dinov2_with_registers(tmp_path) -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                    image_size=28, patch_size=14, num_register_tokens=4)
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "dinov2reg")
    t = Teacher(TeacherConfig(kind="dinov2", path=str(tmp_path / "dinov2reg")))
    x = _imgs(size=28)
    out = t(x)
    assert out.shape == (2, 4, 32)  # CLS + 4 registers dropped
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = t.model(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state
    assert ref.shape[1] == 9 and torch.allclose(out, ref[:, 5:], atol=1e-6)
    with pytest.raises(ValueError, match="model_type"):
        Teacher(TeacherConfig(kind="siglip", path=str(tmp_path / "dinov2reg")))


def test_local_path_full_siglip_checkpoint(tmp_path) -> None:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
    )
    full = SiglipModel(cfg)
    full.save_pretrained(tmp_path / "siglip")
    t = Teacher(TeacherConfig(kind="siglip", path=str(tmp_path / "siglip"), image_size=64))  # pos-emb interpolation
    x = _imgs(size=64)
    assert t(x).shape == (2, 16, 32)
    assert torch.equal(t.model.embeddings.patch_embedding.weight,
                       full.vision_model.embeddings.patch_embedding.weight)  # vision tower loaded, text ignored
