"""Spatial controls: their own encoders, an exact no-op when fresh or absent, per-row in a batch."""
import dataclasses

import numpy as np
import pytest
import torch

from ray_suti import SuTIPipeline
from ray_suti.model import SuTIInputError, SuTIModel
from ray_suti.model.controls import box_map, keypoint_maps, residual_layout
from ray_suti.world import Context, render

ALL = ("box", "keypoints", "edges")
BOX, KEYPOINTS = [0.1, 0.2, 0.6, 0.9], [[0.35, 0.2], [0.6, 0.55]]


def controlled_pipe(trained: bool) -> SuTIPipeline:
    config = dataclasses.replace(SuTIPipeline.from_preset("tiny-32").suti_config, controls=ALL)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe = SuTIPipeline.from_model(SuTIModel(config))
        if trained:  # as after training: the zero-initialised outputs are open
            for p in pipe.suti.control_encoders.parameters():
                torch.nn.init.normal_(p, std=0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(pipe, prompts=("a toy",), **controls):
    demos = [render(21, Context(scene="beach"), 32)[0]]
    return pipe(list(prompts), demos, num_inference_steps=3, generator=[torch.Generator().manual_seed(0) for _ in prompts],
                output_type="np", **controls).images


def test_maps_mark_the_box_and_the_keypoints():
    m = box_map(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), 8)[0, 0]
    assert m[4:, 2:6].all() and m.sum() == 16  # rows 4-7, columns 2-5
    heat = keypoint_maps(torch.tensor([[[0.0625, 0.0625], [0.9375, 0.5625]]]), 8)[0]
    assert heat[0].argmax() == 0 and heat[1].argmax() == 4 * 8 + 7


def test_residuals_match_every_skip_connection_of_the_unet():
    pipe = controlled_pipe(trained=True)
    layout, mid = residual_layout(pipe.unet.config)
    from ray_suti.model.controls import Controls

    controls = Controls({"box": torch.rand(2, 1, 32, 32)}, {"box": torch.tensor([True, False])})
    down, mid_res = pipe.suti.encode_controls(controls)
    assert [r.shape[1] for r in down] == [c for c, _ in layout] and mid_res.shape[1] == mid[0]
    assert all(r[1].abs().sum() == 0 for r in down)  # the row without the control gets nothing


def test_fresh_encoders_change_nothing_and_trained_ones_act_per_row():
    fresh = controlled_pipe(trained=False)
    plain = gen(fresh)
    assert np.array_equal(plain, gen(fresh, box=BOX, keypoints=KEYPOINTS, edges=np.zeros((32, 32))))
    trained = controlled_pipe(trained=True)
    assert np.array_equal(plain, gen(trained))  # no control given: exactly the model without them
    both = gen(trained, prompts=("a toy", "a toy"), box=[BOX, None])
    assert not np.allclose(both[0], plain[0], atol=1e-3)  # the boxed row moved
    np.testing.assert_allclose(both[1], plain[0], atol=1e-5)  # the other row did not (batch-size float noise only)
    for name, value in (("keypoints", KEYPOINTS), ("edges", np.eye(32))):
        assert not np.allclose(gen(trained, **{name: value}), plain, atol=1e-3), name


@pytest.mark.parametrize("controls, match", [
    (dict(box=[0.6, 0.2, 0.1, 0.9]), "x0 < x1"),
    (dict(box=[0.1, 0.2, 0.6]), "box must be"),
    (dict(box=[0.1, 0.2, 0.6, 1.5]), "box must be"),
    (dict(keypoints=[[0.1, 0.2]]), "keypoints must be"),
    (dict(edges=b"not an image"), "not a readable image"),
    (dict(edges=np.full((32, 32), 2.0)), "edges must be"),
    (dict(box=[BOX, BOX, BOX]), "3 box values for 1 prompts"),
])
def test_bad_controls_are_clear_errors(controls, match):
    with pytest.raises(SuTIInputError, match=match):
        gen(controlled_pipe(trained=False), **controls)


def test_a_checkpoint_without_controls_refuses_them_and_saved_ones_keep_them(tmp_path):
    with pytest.raises(SuTIInputError, match="no 'box' control"):
        gen(SuTIPipeline.from_preset("tiny-32"), box=BOX)
    trained = controlled_pipe(trained=True)
    trained.save_single_file(str(tmp_path / "c.safetensors"), dtype=torch.float32)
    loaded = SuTIPipeline.from_pretrained(str(tmp_path / "c.safetensors"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.controls == ALL
    np.testing.assert_allclose(gen(loaded, box=BOX), gen(trained, box=BOX), atol=1e-5)


def test_a_models_controls_are_read_from_its_configs(tmp_path):
    """``controls_of`` (what a driver checks before any work) says what the loaded pipeline says,
    for a preset, a single file and a diffusers folder."""
    from ray_suti.model.loading import controls_of

    pipe = controlled_pipe(trained=False)
    pipe.save_single_file(str(tmp_path / "m.safetensors"))
    pipe.save_pretrained(str(tmp_path / "m"))
    assert controls_of(str(tmp_path / "m.safetensors")) == controls_of(str(tmp_path / "m")) == pipe.controls == ALL
    assert controls_of("tiny-32") == SuTIPipeline.from_preset("tiny-32").controls == ()
