import numpy as np
import pytest
import torch

from ray_suti import SuTIPipeline
from ray_suti.apprentice.dreambooth import DreamBoothConfig, dreambooth_expert, dreambooth_subject, with_identifier
from ray_suti.world import Subject, heldout_seeds, render
from ray_suti.world.oracle import draw_case

from ..conftest import REPO


@pytest.fixture(scope="module")
def pipe():
    p = SuTIPipeline.from_pretrained(str(REPO / "checkpoints" / "tiny-32.safetensors"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def subject():
    seed = heldout_seeds(1)[0]
    word = Subject.from_seed(seed).class_word
    demos, target = draw_case(np.random.default_rng(0), 4)
    return [render(seed, c, 32)[0] for c in demos], [c.prompt(word) for c in demos], word, target.prompt(word)


def test_identifier_goes_before_the_class_word():
    assert with_identifier("a red mug on the beach", "mug", "sks") == "a red sks mug on the beach"
    assert with_identifier("", "mug", "sks") == "a sks mug"
    assert with_identifier("on the beach", "mug", "sks") == "a sks mug, on the beach"
    with pytest.raises(ValueError, match="one lower-case word"):
        DreamBoothConfig(identifier="two words")


def _unet_state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def _photo_loss(pipe, photos, captions, word):
    from ray_suti.model.inputs import subject_tensor

    batch = {"target": subject_tensor(photos, 32),
             "prompt_ids": pipe.tokenize([with_identifier(c, word, "sks") for c in captions])}
    with torch.no_grad():
        return float(np.mean([pipe.model.loss(batch, pipe.model.noise_scheduler(),
                                              generator=torch.Generator().manual_seed(s)) for s in range(8)]))


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_expert_learns_the_photos_and_the_base_weights_come_back(pipe, subject, full):
    photos, captions, word, _ = subject
    before, loss_before = _unet_state(pipe), _photo_loss(pipe, photos, captions, word)
    cfg = DreamBoothConfig(steps=20, full_finetune=full)  # default learning rates (1e-3 LoRA, 5e-5 full)
    with dreambooth_expert(pipe, photos, captions, word, cfg):
        loss_inside = _photo_loss(pipe, photos, captions, word)
    after = _unet_state(pipe)
    assert loss_inside < 0.9 * loss_before  # it fits this subject's photos
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in pipe.model.parameters())


def test_dreambooth_subject_draws_one_image_per_prompt_and_times_both_phases(pipe, subject):
    photos, captions, word, prompt = subject
    cfg = DreamBoothConfig(steps=5, prior_preservation=True, num_class_images=2, sample_steps=5)
    images, seconds = dreambooth_subject(pipe, photos, captions, word, [prompt, prompt + ", as a pencil sketch"], cfg)
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    assert seconds["finetune_s"] > 0 and seconds["sample_s"] > 0
    with pytest.raises(ValueError, match="at least one photo"):
        dreambooth_subject(pipe, [], None, word, [prompt], cfg)
