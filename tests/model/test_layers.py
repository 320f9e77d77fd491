import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from ray_suti.model import SuTIModel, get_preset
from ray_suti.model.layers import DemoFeatures

torch.set_num_threads(1)
CFG = get_preset("tiny-32")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SuTIModel(CFG).eval()


def _inputs(b=2, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = CFG.image_size
    return dict(
        sample=torch.randn(b, 3, s, s, generator=g),
        t=torch.randint(0, 1000, (b,), generator=g),
        text=torch.randn(b, CFG.max_text_len, CFG.unet["cross_attention_dim"], generator=g),
        demo_images=torch.rand(b, k, 3, s, s, generator=g) * 2 - 1,
        demo_text=torch.randn(b, k, CFG.max_text_len, CFG.unet["cross_attention_dim"], generator=g),
    )


def _activate(model: SuTIModel, seed=1) -> SuTIModel:
    """A copy whose neighbour output projections are non-zero, as after training."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for n in m.suti.neighbours.values():
        n.to_out.weight.data = torch.randn(n.to_out.weight.shape, generator=g) * 0.2
    return m


def test_fresh_suti_equals_its_base_unet_with_demos_given(model):
    base = UNet2DConditionModel(**CFG.unet).eval()
    base.load_state_dict(model.unet.state_dict())
    x = _inputs()
    with torch.no_grad():
        demos = model.suti.encode_demos(model.unet, x["demo_images"], x["demo_text"])
        ours = model(x["sample"], x["t"], x["text"], demos)
        theirs = base(x["sample"], x["t"], encoder_hidden_states=x["text"]).sample
    assert demos.tokens[1].shape == (2, 3 * 16 * 16, 64) and demos.tokens[2].shape == (2, 3 * 8 * 8, 128)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_one_step_opens_the_neighbour_path(model):
    m = copy.deepcopy(model).train()
    s = CFG.image_size
    g = torch.Generator().manual_seed(0)
    batch = dict(target=torch.rand(4, 3, s, s, generator=g) * 2 - 1,
                 prompt_ids=torch.randint(0, 49406, (4, CFG.max_text_len), generator=g),
                 demo_images=torch.rand(4, 2, 3, s, s, generator=g) * 2 - 1,
                 demo_caption_ids=torch.randint(0, 49406, (4, 2, CFG.max_text_len), generator=g),
                 demo_valid=torch.ones(4, 2, dtype=torch.bool))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.loss(batch, m.noise_scheduler(), generator=g).backward()
    grads = [n.to_out.weight.grad for n in m.suti.neighbours.values()]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    opt.step()
    m.eval()
    x = _inputs()
    with torch.no_grad():
        demos = m.suti.encode_demos(m.unet, x["demo_images"], x["demo_text"])
        with_demos = m(x["sample"], x["t"], x["text"], demos)
        without = m(x["sample"], x["t"], x["text"], None)
    assert (with_demos - without).abs().max().item() > 1e-4


def test_examples_in_a_batch_do_not_see_each_others_demos(model):
    m = _activate(model)
    x = _inputs()
    other = _inputs(seed=7)
    changed = x["demo_images"].clone()
    changed[1] = other["demo_images"][1]
    with torch.no_grad():
        a = m(x["sample"], x["t"], x["text"], m.suti.encode_demos(m.unet, x["demo_images"], x["demo_text"]))
        b = m(x["sample"], x["t"], x["text"], m.suti.encode_demos(m.unet, changed, x["demo_text"]))
    assert torch.allclose(a[0], b[0], atol=1e-6)  # example A unchanged
    assert (a[1] - b[1]).abs().max() > 1e-3  # example B did change


@pytest.mark.parametrize("k", range(1, CFG.max_demos + 1))
def test_any_number_of_demos_and_padding_is_invisible(model, k):
    m = _activate(model)
    x = _inputs(b=1, k=k)
    pad = torch.cat([x["demo_images"], torch.zeros(1, CFG.max_demos - k, 3, 32, 32)], 1)
    pad_text = torch.cat([x["demo_text"], torch.zeros(1, CFG.max_demos - k, *x["demo_text"].shape[2:])], 1)
    valid = torch.arange(CFG.max_demos)[None] < k
    with torch.no_grad():
        exact = m(x["sample"], x["t"], x["text"], m.suti.encode_demos(m.unet, x["demo_images"], x["demo_text"]))
        padded = m(x["sample"], x["t"], x["text"], m.suti.encode_demos(m.unet, pad, pad_text, valid))
        none = m(x["sample"], x["t"], x["text"], None)
    assert (exact - padded).abs().max() < 1e-5
    assert (exact - none).abs().max() > 1e-4


def test_too_many_demos_and_mismatched_batches_are_refused(model):
    x = _inputs(b=1, k=CFG.max_demos + 1)
    with pytest.raises(ValueError, match="at most"):
        model.suti.encode_demos(model.unet, x["demo_images"], x["demo_text"])
    y = _inputs(b=2, k=1)
    demos = model.suti.encode_demos(model.unet, y["demo_images"], y["demo_text"])
    with pytest.raises(ValueError, match="demo features for 2"):
        model(y["sample"][:1], y["t"][:1], y["text"][:1], demos)


def test_dropped_demos_equal_no_demos(model):
    m = _activate(model)
    x = _inputs()
    with torch.no_grad():
        demos = m.suti.encode_demos(m.unet, x["demo_images"], x["demo_text"])
        dropped = m(x["sample"], x["t"], x["text"], demos.with_valid(torch.tensor([False, True])))
        none = m(x["sample"], x["t"], x["text"], None)
        full = m(x["sample"], x["t"], x["text"], demos)
    assert torch.allclose(dropped[0], none[0], atol=1e-6)
    assert torch.allclose(dropped[1], full[1], atol=1e-6)
    assert isinstance(DemoFeatures.cat([demos, demos]), DemoFeatures)


def test_cosine_attention_starts_as_the_base_and_is_sharper_than_dot_products():
    """Cosine neighbour attention is still an exact no-op when fresh, and its learnt temperature
    makes attention far from uniform from the start (plain dot products of fresh projections
    average the demos)."""
    import dataclasses
    import math

    torch.manual_seed(0)
    cos_model = SuTIModel(dataclasses.replace(CFG, neighbour_cosine=True)).eval()
    x = _inputs()
    demos = cos_model.encode_demos(x["demo_images"], torch.zeros(2, 3, CFG.max_text_len, dtype=torch.long))
    with torch.no_grad():
        with_demos = cos_model(x["sample"], x["t"], x["text"], demos)
        without = cos_model(x["sample"], x["t"], x["text"], None)
    assert torch.allclose(with_demos, without, atol=1e-6)
    entropies = {}
    for cosine in (False, True):
        torch.manual_seed(0)
        m = SuTIModel(dataclasses.replace(CFG, neighbour_cosine=cosine)).eval()
        att = next(iter(m.suti.neighbours.values())).requires_grad_(False)
        d = torch.randn(2, 3 * 64, att.norm_kv.normalized_shape[0])  # tokens of an 8x8 level, 3 demos
        k, _ = att.keys_values(d, 64)
        q = att.to_q(att.norm_q(torch.randn(2, 64, att.to_q.in_features))).view(2, 64, att.heads, -1).transpose(1, 2)
        if cosine:
            logits = torch.nn.functional.normalize(q, dim=-1) @ k.transpose(-1, -2) * att.logit_scale.exp()[:, None, None]
        else:
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        p = logits.softmax(-1)
        entropies[cosine] = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(p.shape[-1]))
    assert entropies[True] < entropies[False] - 0.05, entropies
