import copy
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ray_suti import SuTIPipeline
from ray_suti.model import SuTIInputError
from ray_suti.model.pipeline import guidance_branches, load_pipeline
from ray_suti.model.tokenizer import clip_tokenizer
from ray_suti.world import Context, render

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    p = SuTIPipeline.from_preset("tiny-32")
    g = torch.Generator().manual_seed(3)
    for n in p.suti.neighbours.values():  # as after training: demos matter
        n.to_out.weight.data = torch.randn(n.to_out.weight.shape, generator=g) * 0.2
    p.set_progress_bar_config(disable=True)
    return p


def _subject(seed=21, k=3):
    contexts = [Context(scene="beach"), Context(), Context(scene="snow"), Context(scene="grass"), Context(scene="room")]
    return [render(seed, c, 64)[0] for c in contexts[:k]]


def _gen(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 4)
    return pipe("a toy on the grass", kw.pop("subject", _subject()), generator=torch.Generator().manual_seed(seed),
                output_type="np", **kw).images


def test_same_seed_same_image_and_other_seed_differs(pipe):
    a, b, c = _gen(pipe, 0), _gen(pipe, 0), _gen(pipe, 1)
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_cached_and_uncached_demo_features_give_the_same_image(pipe):
    for gt, gs in ((3.0, 3.0), (4.0, 2.0)):  # two and three guidance branches
        cached = _gen(pipe, guidance_scale_text=gt, guidance_scale_subject=gs)
        uncached = _gen(pipe, guidance_scale_text=gt, guidance_scale_subject=gs, cache_demo_features=False)
        np.testing.assert_allclose(cached, uncached, atol=1e-6)


def test_subject_and_text_guidance_are_separate(pipe):
    base = _gen(pipe, guidance_scale_text=3.0, guidance_scale_subject=3.0)
    more_subject = _gen(pipe, guidance_scale_text=3.0, guidance_scale_subject=6.0)
    assert np.abs(base - more_subject).max() > 1e-3
    assert guidance_branches(3.0, 3.0, True) == [(3.0, True, True), (-2.0, False, False)]
    assert guidance_branches(3.0, 1.0, True) == [(3.0, True, True), (-2.0, False, True)]
    assert len(guidance_branches(4.0, 2.0, True)) == 3
    assert guidance_branches(1.0, 1.0, True) == [(1.0, True, True)]


def test_demos_change_the_image(pipe):
    a = _gen(pipe, subject=_subject(21))
    b = _gen(pipe, subject=_subject(33))
    assert np.abs(a - b).max() > 1e-3


def test_precomputed_subject_features_match_photos(pipe):
    feats = pipe.encode_subject(_subject())
    a = _gen(pipe)
    b = _gen(pipe, subject=feats)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_switching_samplers_keeps_the_trained_noise_schedule(pipe):
    p = copy.copy(pipe).set_scheduler("dpm++")
    assert type(p.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert p.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type == "v_prediction"
    assert p.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="unknown scheduler"):
        p.set_scheduler("euler-magic")


def test_dpm_solver_and_batches_of_prompts_with_their_own_subjects(pipe):
    p = copy.copy(pipe).set_scheduler("dpm++")
    out = p(["a toy", "a mug in the snow"], [_subject(21, 2), _subject(33, 4)], num_inference_steps=3,
            num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert len(out) == 4 and out[0].size == (32, 32)


@pytest.mark.parametrize("call,match", [
    (lambda p: p("a toy", []), "1 to 5 subject images"),
    (lambda p: p("a toy", _subject(k=5) + _subject(k=1)), "1 to 5 subject images"),
    (lambda p: p("", _subject()), "non-empty"),
    (lambda p: p("   ", _subject()), "non-empty"),
    (lambda p: p("a toy", _subject(), num_inference_steps=0), "num_inference_steps"),
    (lambda p: p("a toy", [b"not an image"]), "not a readable image"),
    (lambda p: p("a toy", _subject(), subject_captions=["one"]), "captions for 3"),
])
def test_bad_requests_get_clear_errors(pipe, call, match):
    with pytest.raises(SuTIInputError, match=match):
        call(pipe)


def test_save_and_load_round_trip_without_unpickling(pipe, tmp_path, monkeypatch):
    pipe.save_pretrained(tmp_path / "ckpt")
    files = [f for _, _, fs in os.walk(tmp_path / "ckpt") for f in fs]
    assert all(f.endswith((".safetensors", ".json")) for f in files), files

    def no_pickle(*a, **k):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = SuTIPipeline.from_pretrained(str(tmp_path / "ckpt"))
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_gen(pipe), _gen(loaded))


def test_save_and_load_through_uris(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_SUTI_CACHE", str(tmp_path / "cache"))
    folder, single = (tmp_path / "uri-ckpt").as_uri(), (tmp_path / "m.safetensors").as_uri()
    pipe.save_pretrained(folder)
    pipe.save_single_file(single, metadata={"step": 3})
    assert (tmp_path / "uri-ckpt" / "model_index.json").is_file() and (tmp_path / "m.safetensors").is_file()
    assert SuTIPipeline.single_file_metadata(single)["step"] == "3"
    for loaded in (SuTIPipeline.from_pretrained(folder), load_pipeline(single)):  # fetched into the cache
        loaded.set_progress_bar_config(disable=True)
        assert _gen(loaded).shape == _gen(pipe).shape
    np.testing.assert_array_equal(_gen(pipe), _gen(SuTIPipeline.from_pretrained(folder)))
    assert len(os.listdir(tmp_path / "cache")) == 2


def _sd_shaped_folder(path):
    """A tiny Stable-Diffusion-layout folder written with save_pretrained, as a real one is."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16)
    unet.save_pretrained(path / "unet")
    text.save_pretrained(path / "text_encoder")
    vae.save_pretrained(path / "vae")
    clip_tokenizer(77).save_pretrained(path / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon").save_pretrained(path / "scheduler")
    return unet


def test_from_base_loads_a_stable_diffusion_folder(tmp_path):
    base = _sd_shaped_folder(tmp_path / "sd")
    p = SuTIPipeline.from_base(str(tmp_path / "sd"), neighbour_levels=(0, 1), neighbour_heads=4)
    config = p.suti_config
    assert config.latent and config.image_size == 16 and config.prediction_type == "epsilon"
    assert len(p.suti.neighbours) > 0
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    demos = p.model.encode_demos(torch.rand(1, 2, 3, 16, 16) * 2 - 1, p.tokenize(["", ""]).view(1, 2, -1))
    with torch.no_grad():
        np.testing.assert_allclose(p.model(x, 10, text, demos), base(x, 10, encoder_hidden_states=text).sample,
                                   atol=1e-5)
    p.set_progress_bar_config(disable=True)
    image = p("a dog", _subject(k=2), num_inference_steps=2).images[0]
    assert image.size == (16, 16)
    p.save_pretrained(str(tmp_path / "suti"))
    again = SuTIPipeline.from_pretrained(str(tmp_path / "suti"))
    assert again.suti_config == p.suti_config
