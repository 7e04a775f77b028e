"""The sources' checks before any rank starts (system/data/sources.py): the data must give every
rank of `cluster.num_workers` one batch (training) or one sample (validation), from the index's
counts and `data.fraction`; the error names the key and what would fit."""
from __future__ import annotations

import numpy as np
import pytest
from shardset import build

from system.config import ConfigError, DataConfig, Experiment, TokenDataConfig
from system.data.sources import ImageShards, TokenShards


def _exp(data, workers: int):
    exp = Experiment(run_name="t", data=data)
    exp.cluster.num_workers = workers
    return exp


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    train, _ = build(tmp_path_factory.mktemp("train"), [10, 10])  # 20 samples
    val, _ = build(tmp_path_factory.mktemp("val"), [3])
    return train, val


def test_image_shards_fit_every_rank_or_name_the_key(images):
    train, val = images
    ImageShards().check(_exp(DataConfig(url=train, val_url=val, batch_size=5), 3))  # 3 x 5 <= 20, 3 val samples
    with pytest.raises(ConfigError, match=r"config key 'data.batch_size' = 100000: data.url = .* holds 20 sample\(s\), "
                                          r"fewer than one batch for each of cluster.num_workers=2 .*use data.batch_size <= 10"):
        ImageShards().check(_exp(DataConfig(url=train, batch_size=100000), 2))
    with pytest.raises(ConfigError, match=r"holds 10 sample\(s\) at data.fraction=0.5, .*use data.batch_size <= 3"):
        ImageShards().check(_exp(DataConfig(url=train, batch_size=4, fraction=0.5), 3))
    with pytest.raises(ConfigError, match=r"use cluster.num_workers <= 20 and data.batch_size=1"):
        ImageShards().check(_exp(DataConfig(url=train, batch_size=1), 21))
    with pytest.raises(ConfigError, match=r"config key 'cluster.num_workers' = 4: data.val_url = .* holds 3 sample\(s\), "
                                          r"fewer than one for each rank"):
        ImageShards().check(_exp(DataConfig(url=train, val_url=val, batch_size=1), 4))


def test_a_source_read_by_rank_0_alone_needs_one_batch(images):
    train, _ = images
    ImageShards(readers=1).check(_exp(DataConfig(url=train, batch_size=16), 4))  # 16 <= 20 on rank 0
    with pytest.raises(ConfigError, match="use data.batch_size <= 20"):
        ImageShards(readers=1).check(_exp(DataConfig(url=train, batch_size=21), 4))


def test_token_shards_fit_every_rank_or_name_the_key(tmp_path):
    from system.data.tokens import write_token_set

    rng = np.random.default_rng(0)
    url = str(tmp_path / "tok")
    write_token_set(url, rng.integers(0, 16, (12, 4)), np.arange(12) % 2, 16, num_shards=2)
    TokenShards().check(_exp(TokenDataConfig(url=url, batch_size=6), 2))
    with pytest.raises(ConfigError, match=r"config key 'data.batch_size' = 7: data.url = .* holds 12 sample\(s\)"):
        TokenShards().check(_exp(TokenDataConfig(url=url, batch_size=7), 2))
