"""Latency/size profile: keys, exact parameter and MAC counts of small known networks."""
from __future__ import annotations

from torch import nn

from graftkd.eval.latency import count_macs, profile_model


def _conv() -> nn.Module:
    # MACs on 3x4x4: conv 4 out * 16 positions * 3 in * 9 taps = 1728; linear 64 * 2 = 128
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2))


def test_profile_keys_and_exact_counts() -> None:
    m = _conv().train()
    prof = profile_model(m, 4, batch_sizes=(1, 8), repeats=2, warmup=1)
    assert set(prof) == {"networks", "params", "macs", "size_bytes", "image_size", "threads", "repeats",
                         "ms_b1", "ms_b8", "img_s_b1"}
    assert prof["params"] == (3 * 9 * 4 + 4) + (64 * 2 + 2) == 242
    assert prof["macs"] == 1728 + 128
    assert 242 * 4 < prof["size_bytes"] < 242 * 4 + 1024  # float32 weights + safetensors header
    assert prof["ms_b1"] > 0 and prof["ms_b8"] > 0 and prof["networks"] == 1
    assert m.training  # the training flag is restored


def test_ensemble_is_the_networks_run_together() -> None:
    a, b = _conv(), _conv()
    prof = profile_model([a, b], 4, batch_sizes=(1,), repeats=2, warmup=1)
    assert (prof["networks"], prof["params"]) == (2, 484)
    assert count_macs([a, b], 4) == 2 * (1728 + 128)
    shared = profile_model([a, a], 4, batch_sizes=(1,), repeats=1, warmup=0)
    assert shared["params"] == 242  # a shared network counted once
