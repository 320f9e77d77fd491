"""Under ZeRO-3 each rank keeps the EMA of its own parameter partitions and the whole EMA is
gathered only for a checkpoint: the partitions reassemble exactly. A 2-worker ZeRO-3 run's checkpoint
holding the whole EMA: test_fault_tolerance.py (that run is killed, resumes and finishes)."""
import types

import torch

from ray_suti.train import loop


def test_partitions_reassemble_the_whole_tensor(monkeypatch):
    whole = torch.randn(3, 5)  # 15 values over 2 ranks: chunks of 8, the last padded with a zero
    param = types.SimpleNamespace(ds_numel=15, ds_shape=(3, 5), ds_tensor=types.SimpleNamespace(ds_numel=8))
    parts = [loop._partition(whole, param, rank, 2) for rank in (0, 1)]
    assert [p.shape for p in parts] == [(8,), (8,)] and parts[1][-1] == 0
    monkeypatch.setattr(torch.distributed, "gather", lambda t, out, dst: [o.copy_(p) for o, p in zip(out or [], parts)])
    assert torch.equal(loop._gather_ema({"w": parts[0]}, [("w", param)], 0, 2, "cpu")["w"], whole)
    assert loop._gather_ema({"w": parts[1]}, [("w", param)], 1, 2, "cpu") is None  # only rank 0 holds it
