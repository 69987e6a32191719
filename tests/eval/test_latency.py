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


def test_interleaved_profile_times_every_network_in_every_round_and_speedups_are_per_round_ratios(monkeypatch) -> None:
    import graftkd.eval.latency as lat

    a, b = _conv().train(), _conv().eval()
    calls: list[int] = []
    clock = iter(range(10_000))
    monkeypatch.setattr(lat.time, "perf_counter", lambda: float(next(clock)))  # every forward "takes" 1 s
    real = lat._forward_all
    monkeypatch.setattr(lat, "_forward_all", lambda models, x: (calls.append(len(models)), real(models, x))[1])
    prof = lat.profile_interleaved({"a": a, "b": b, "ens": [a, b]}, 4, batch_sizes=(1, 8), repeats=3, warmup=1,
                                   reference="ens")
    rounds = [1, 1, 2] + [1, 2, 1] + [2, 1, 1] + [1, 1, 2]  # a b ens | b ens a | ens a b | a b ens
    assert calls == [1, 1, 2] + rounds * 2  # MACs once, then per batch size each network once a round, rotating
    for name in ("a", "b", "ens"):
        assert prof[name]["ms_b1"] == prof[name]["ms_b8"] == 1000.0 and prof[name]["measured"] == "interleaved"
        assert prof[name]["speedup_b8"] == 1.0 and prof[name]["speedup_reference"] == "ens"
    assert (prof["ens"]["params"], prof["a"]["params"]) == (484, 242) and a.training and not b.training
