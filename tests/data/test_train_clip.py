"""train-clip on page pairs and rendered pages: a Ray Train job or one process; the weights plug into the builder."""
import math
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from ray_suti.data.builder import ClipEmbedder
from ray_suti.data.clip import load_clip
from ray_suti.data.train_clip import ClipTrainConfig, train_clip
from ray_suti.world.crawl import WorldConfig, generate_world

pytestmark = pytest.mark.slow


def test_train_clip_writes_weights_the_builder_loads(tmp_path, ray_local):
    generate_world(WorldConfig(out=str(tmp_path / "world"), pages=30, image_size=32, pages_per_shard=15,
                               preview_pages=0), progress=False)
    out = tmp_path / "clip.safetensors"
    metrics = train_clip(ClipTrainConfig(input=str(tmp_path / "world" / "web"), output=str(out), steps=4,
                                         batch_size=16, storage_path=str(tmp_path / "runs")))
    assert metrics["step"] == 4
    trained, untrained = load_file(str(out)), load_clip("tiny")[0].state_dict()
    assert any((trained[k] - untrained[k]).abs().max() > 0 for k in untrained if k in trained)
    # the builder's embedding actor, run in this process on a few crawled images
    images = pq.read_table(tmp_path / "world" / "web", columns=["image"]).column(0).to_pylist()[:4]
    rows = ClipEmbedder("tiny", str(out), use_gpu=False)(pd.DataFrame({"image": images, "reason": [""] * 4}))
    assert all(len(e) > 0 and abs(np.linalg.norm(e) - 1) < 1e-4 for e in rows["embedding"])


def test_render_recipe_runs_on_two_ray_train_workers(tmp_path, ray_local):
    out = tmp_path / "clip.safetensors"  # DDP: the unused text tower must not stall the gradient sync
    metrics = train_clip(ClipTrainConfig(recipe="render", output=str(out), steps=2, batch_size=8, pool_subjects=12,
                                         views=2, refresh=2, num_workers=2, cpus_per_worker=0.5,
                                         storage_path=str(tmp_path / "runs")))
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"])
    load_clip("tiny", str(out), "cpu")
    # the run's controller (and its dataset actors) end with it: Ray Train's SIGINT handler, which
    # held it, is gone (the session's Ray runs no dashboard: the GCS's actor table)
    from ray._private.state import actors

    deadline = time.time() + 30
    while [a for a in actors().values() if a["ActorClassName"] == "TrainController" and a["State"] != "DEAD"]:
        assert time.time() < deadline, "the run's TrainController outlived it"
        time.sleep(0.2)


def test_local_runner_trains_on_page_pairs_without_ray(tmp_path, capsys):
    import json
    import os

    from ray_suti.cli import main
    from ray_suti.world.crawl import write_shard

    world = WorldConfig(out=str(tmp_path / "world"), pages=20, image_size=32, pages_per_shard=20, preview_pages=0)
    for folder in ("web", "truth"):
        os.makedirs(os.path.join(world.out, folder))
    write_shard(world, 0)
    out = tmp_path / "clip.safetensors"
    assert main(["train-clip", "--local", "--input", str(tmp_path / "world" / "web"), "--output", str(out),
                 "--steps", "2", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"): printed.index("\n}") + 2])
    assert summary["step"] == 2 and summary["pairs"] >= 8 and math.isfinite(summary["loss"])
    load_clip("tiny", str(out), "cpu")


def test_pairs_are_two_different_valid_photos_of_one_page():
    import pandas as pd

    from ray_suti.data.train_clip_pages import page_pairs

    group = pd.DataFrame({"image": [b"a", b"b", b"c", b"broken"], "caption": ["x", "IMG_1.jpg", "", ""],
                          "reason": ["", "", "", "truncated"], "page_key": ["p"] * 4})
    pairs = page_pairs(group, seed=0)
    assert list(pairs["a"]) == [b"a", b"b", b"c"] and all(a != b for a, b in zip(pairs["a"], pairs["b"]))
    assert set(pairs["b"]) <= {b"a", b"b", b"c"} and list(pairs["caption"]) == ["x", "", ""]
    assert page_pairs(group.iloc[[0, 3]], seed=0).empty  # one valid photo makes no pair


def test_same_page_negatives_are_masked_out():
    import torch

    from ray_suti.data.train_clip import contrastive

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    pages = torch.tensor([0, 0, 1, 2])
    masked = contrastive(x, y, 10.0, pages[:, None] == pages[None, :])
    # rows 0 and 1 share a page: the same loss as if each never saw the other as a negative
    logits = 10.0 * x @ y.T
    logits[0, 1] = logits[1, 0] = float("-inf")
    t = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, t) + torch.nn.functional.cross_entropy(logits.T, t)) / 2
    assert torch.allclose(masked, expected) and not torch.allclose(masked, contrastive(x, y, 10.0))


def test_augment_is_a_window_of_the_padded_image_flipped_or_not():
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ray_suti.data.train_clip import augment

    x, rng = torch.randn(12, 3, 8, 8), np.random.default_rng(0)
    same = augment(x, rng, shift=0, brightness=0, noise=0)
    assert all(torch.allclose(o, i, atol=1e-5) or torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(same, x))
    out, padded = augment(x, rng, shift=2, brightness=0, noise=0), F.pad(x, (2,) * 4, mode="replicate")
    windows = [[p[:, dy: dy + 8, dx: dx + 8] for dy in range(5) for dx in range(5)] for p in padded]
    assert all(any(torch.allclose(o, w, atol=1e-5) or torch.allclose(o, w.flip(-1), atol=1e-5) for w in ws)
               for o, ws in zip(out, windows))
    assert len({tuple(o.flatten()[:4].tolist()) for o in out}) > 1
    jittered = augment(x, rng, shift=0, brightness=0.05, noise=0.01)
    assert not torch.allclose(jittered.abs().sum(), same.abs().sum())
