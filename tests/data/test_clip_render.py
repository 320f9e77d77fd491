"""Shift-averaged embeddings and the rendered-page CLIP trainer (issue 5)."""
import numpy as np
import torch
from PIL import Image

from ray_suti.data.clip import embed_images, load_clip, preprocess
from ray_suti.data.train_clip_render import RenderedPool, _reupload, _to_tensor, junk_images, main


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
    x = _to_tensor(a)
    y = _reupload(x, rng)
    assert y.shape == x.shape and 0 < (y - x).abs().mean() < 1
    assert junk_images(rng, 2, 32).shape == (2, 32, 32, 3)


def test_trainer_runs_a_few_steps_and_writes_weights_the_builder_loads(tmp_path):
    out = tmp_path / "clip.safetensors"
    assert main(["--output", str(out), "--steps", "2", "--batch-size", "8", "--pool-subjects", "12",
                 "--views", "2", "--refresh", "2"]) == 0
    load_clip("tiny", str(out))
