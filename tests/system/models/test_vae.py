"""The frozen SD3.5-shaped latent VAE (tiny random AutoencoderKL): shapes, the exact latent
normalisation, determinism, gradients through the frozen decoder, the SD3.5 config on the meta
device, export round trips and every way of loading weights."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402

from system.models.vae import (  # noqa: E402
    SD35_VAE_CONFIG, LatentVAE, LatentVAEConfig, build_latent_vae, new_autoencoder)

SD35_PARAMS = 83_819_683  # AutoencoderKL(**SD35_VAE_CONFIG): encoder 34,274,208 + decoder 49,545,475


@pytest.fixture(scope="module")
def vae() -> LatentVAE:
    torch.manual_seed(0)
    return build_latent_vae(LatentVAEConfig(random_init=True, tiny=True))


def _imgs(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:  # (n, 3, size, size) in [-1, 1]
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_round_trip_shapes(vae: LatentVAE) -> None:
    assert (vae.downsample, vae.latent_channels) == (8, 16)
    assert (vae.scaling_factor, vae.shift_factor) == (1.0, 0.0)  # tiny defaults
    z = vae.encode(_imgs(1))
    assert z.shape == (2, 16, 8, 8) and z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(_imgs(1, size=60))
    with pytest.raises(ValueError, match=r"\(B,16,H,W\)"):
        vae.decode(torch.zeros(1, 4, 8, 8))


def test_scaling_and_shift_exactly_as_defined(vae: LatentVAE) -> None:
    scaled = LatentVAE(vae.vae, scaling_factor=1.7, shift_factor=0.3)
    x = _imgs(2)
    raw: AutoencoderKL = vae.vae
    with torch.no_grad():
        want_z = (raw.encode(x).latent_dist.mean - 0.3) * 1.7
        z = scaled.encode(x)
        torch.testing.assert_close(z, want_z)
        torch.testing.assert_close(scaled.decode(z), raw.decode(z / 1.7 + 0.3).sample)
    # defaults come from the autoencoder's config
    cfg_scaled = LatentVAE(new_autoencoder(tiny=True, scaling_factor=2.5, shift_factor=-0.1))
    assert (cfg_scaled.scaling_factor, cfg_scaled.shift_factor) == (2.5, -0.1)


def test_encode_is_deterministic_unless_sampling(vae: LatentVAE) -> None:
    x = _imgs(3)
    assert torch.equal(vae.encode(x), vae.encode(x))
    sampler = LatentVAE(vae.vae, sample=True)
    a = sampler.encode(x, generator=torch.Generator().manual_seed(0))
    b = sampler.encode(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 16, 8, 8) and not torch.equal(a, b)


def test_decode_passes_gradients_to_latents_only(vae: LatentVAE) -> None:
    z = vae.encode(_imgs(4))
    assert not z.requires_grad  # encode: no graph
    z = z.clone().requires_grad_(True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in vae.parameters())
    vae.train()
    assert not vae.training and not vae.vae.training


def test_sd35_config_on_the_meta_device() -> None:
    with torch.device("meta"):
        big = LatentVAE(AutoencoderKL(**SD35_VAE_CONFIG))
    assert next(big.parameters()).is_meta
    assert (big.downsample, big.latent_channels) == (8, 16)
    assert (big.scaling_factor, big.shift_factor) == (1.5305, 0.0609)
    assert sum(p.numel() for p in big.parameters()) == SD35_PARAMS
    d = big.config_dict()
    assert {k: d[k] for k in SD35_VAE_CONFIG} == SD35_VAE_CONFIG
    with torch.device("meta"):
        again = LatentVAE.from_config_dict(d)
    assert sum(p.numel() for p in again.parameters()) == SD35_PARAMS


def test_config_dict_round_trip(vae: LatentVAE) -> None:
    import json

    src = LatentVAE(vae.vae, scaling_factor=1.3, shift_factor=0.2)
    d = json.loads(json.dumps(src.config_dict()))  # JSON-able
    assert (d["scaling_factor"], d["shift_factor"], d["latent_channels"]) == (1.3, 0.2, 16)
    for sd in (dict(src.vae.state_dict()), dict(src.state_dict())):  # AutoencoderKL keys or LatentVAE's vae.*
        other = LatentVAE.from_config_dict(d, sd)
        x = _imgs(5)
        z = src.encode(x)
        assert torch.equal(other.encode(x), z)
        with torch.no_grad():
            assert torch.equal(other.decode(z), src.decode(z))
        assert not any(p.requires_grad for p in other.parameters())


def test_missing_or_conflicting_weights_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no weights: set export.*path.*hub_name.*random_init"):
        build_latent_vae(LatentVAEConfig())
    with pytest.raises(ValueError, match="random_init=True conflicts with path"):
        build_latent_vae(LatentVAEConfig(path=str(tmp_path), random_init=True))
    with pytest.raises(ValueError, match="path and hub_name are set together"):
        build_latent_vae(LatentVAEConfig(path=str(tmp_path), hub_name="stabilityai/stable-diffusion-3.5-medium"))
    with pytest.raises(ValueError, match="tiny=True only applies with random_init"):
        build_latent_vae(LatentVAEConfig(path=str(tmp_path), tiny=True))
    with pytest.raises(ValueError, match="no AutoencoderKL there"):
        build_latent_vae(LatentVAEConfig(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        build_latent_vae(LatentVAEConfig(path=str(tmp_path / "none")))


def test_loads_save_pretrained_and_pipeline_folders(tmp_path, vae: LatentVAE) -> None:
    vae.vae.save_pretrained(str(tmp_path / "vae_only"))
    vae.vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    x = _imgs(6)
    z = vae.encode(x)
    for folder in ("vae_only", "pipe"):
        other = build_latent_vae(LatentVAEConfig(path=str(tmp_path / folder)))
        assert not any(p.requires_grad for p in other.parameters()) and not other.training
        torch.testing.assert_close(other.encode(x), z, msg=folder)
    over = build_latent_vae(LatentVAEConfig(path=str(tmp_path / "pipe"), scaling_factor=2.0, shift_factor=0.5))
    torch.testing.assert_close(over.encode(x), (z - 0.5) * 2.0)


def test_loads_a_run_export(tmp_path, vae: LatentVAE) -> None:
    from system.models.artifacts import Artifact, save_export

    src = LatentVAE(vae.vae, scaling_factor=1.2, shift_factor=0.1)
    save_export(str(tmp_path), {"vae": Artifact("autoencoder_kl", src.config_dict(), dict(src.vae.state_dict()))})
    other = build_latent_vae(LatentVAEConfig(export=str(tmp_path)))
    assert (other.scaling_factor, other.shift_factor) == (1.2, 0.1)
    x = _imgs(7)
    torch.testing.assert_close(other.encode(x), src.encode(x))
    with pytest.raises(ValueError, match="export and path are set together"):
        build_latent_vae(LatentVAEConfig(export=str(tmp_path), path=str(tmp_path)))
