"""Shift-averaged embeddings and ``train-clip --recipe render`` (pages rendered on the fly)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ray_suti.cli import main
from ray_suti.data.clip import embed_images, load_clip, preprocess
from ray_suti.data.train_clip import ClipTrainConfig, lr_at
from ray_suti.data.train_clip_render import RenderedPool, junk_images, reupload, to_tensor


def test_one_shift_is_the_plain_embedding_and_more_are_unit_length():
    clip, size = load_clip("tiny")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(3)]
    plain = torch.nn.functional.normalize(clip.encode_image(preprocess(images, size)).detach(), dim=-1).numpy()
    assert np.allclose(embed_images(clip, images, size), plain, atol=1e-5)
    avg = embed_images(clip, images, size, shifts=3)
    assert avg.shape == plain.shape and np.allclose(np.linalg.norm(avg, axis=1), 1, atol=1e-5)
    assert not np.allclose(avg, plain)


def test_pool_pairs_are_two_renders_of_one_subject_and_views_match_the_crawl():
    rng = np.random.default_rng(0)
    pool = RenderedPool(rng, subjects=6, views=3, size=32, skill_probs={}, jitter=0.03)
    a, b = pool.pairs(4)
    assert a.shape == b.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert not any(np.array_equal(x, y) for x, y in zip(a, b))
    x = to_tensor(a)
    y = reupload(x, rng)
    assert y.shape == x.shape and 0 < (y - x).abs().mean() < 1
    assert junk_images(rng, 2, 32).shape == (2, 32, 32, 3)


def test_train_clip_render_writes_weights_load_clip_loads(tmp_path, capsys):
    out = tmp_path / "clip.safetensors"
    assert main(["train-clip", "--recipe", "render", "--local", "--output", str(out), "--steps", "3",
                 "--batch-size", "8", "--pool-subjects", "12", "--views", "2", "--refresh", "2",
                 "--report-every", "2", "--snapshot-every", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"): printed.index("\n}") + 2])
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    assert '"clip_step": 2' in printed and (tmp_path / "clip-step2.safetensors").exists()
    trained = load_clip("tiny", str(out), "cpu")[0].state_dict()
    untrained = load_clip("tiny")[0].state_dict()
    assert any(not torch.equal(trained[k], untrained[k]) for k in untrained)


def test_config_takes_the_recipes_defaults_and_refuses_what_it_cannot_run(capsys):
    assert (ClipTrainConfig().lr, ClipTrainConfig(recipe="render").lr) == (5e-4, 3e-4)
    assert ClipTrainConfig(recipe="render").seed == 11 and ClipTrainConfig(recipe="render", seed=12).seed == 12
    with pytest.raises(ValueError, match="unknown recipe 'crawl': use pages .* or render"):
        ClipTrainConfig(recipe="crawl")
    with pytest.raises(SystemExit, match="error: unknown recipe 'crawl'"):
        main(["train-clip", "--recipe", "crawl"])
    with pytest.raises(ValueError, match="--max-minutes: only with --local"):
        ClipTrainConfig(max_minutes=5)
    with pytest.raises(ValueError, match="--text-weight needs --recipe pages"):
        ClipTrainConfig(recipe="render", local=True, text_weight=0.5)
    with pytest.raises(ValueError, match="rendered subjects"):
        ClipTrainConfig(recipe="render", pool_subjects=10, refresh=2, batch_size=64)


def test_one_schedule_warms_up_then_decays_by_steps_or_by_time():
    cfg = ClipTrainConfig(lr=1e-3, warmup_steps=10, steps=100)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)  # warm-up 1/10
    assert lr_at(cfg, 9) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert lr_at(cfg, 50) == pytest.approx(5e-4) and lr_at(cfg, 100) == pytest.approx(0)
    assert lr_at(cfg, 20, progress=0.5) == pytest.approx(5e-4)  # a time limit ahead of the steps
