import numpy as np
import pytest

from ray_suti.apprentice.prompts import (LLMPromptWriter, TemplatePromptWriter, WorldPromptWriter, make_prompt_writer,
                                         skills_of, target_context)
from ray_suti.world.contexts import SKILLS


@pytest.mark.parametrize("writer", [WorldPromptWriter(), TemplatePromptWriter()], ids=["world", "templates"])
def test_prompts_name_the_class_cover_every_skill_and_mixes_and_avoid_the_captions(writer):
    rng = np.random.default_rng(0)
    captions = ["a mug on the beach", "a mug in the snow"]
    prompts = [p for _ in range(40) for p in writer.write("mug", captions, 5, rng)]
    assert len(prompts) == 200
    assert all("mug" in p.text.replace(",", " ").split() and p.text not in captions and p.skills for p in prompts)
    assert {s for p in prompts for s in p.skills} == set(SKILLS)
    assert sum(len(p.skills) >= 2 for p in prompts) > 40  # compositions of skills, not just one at a time
    one_call = writer.write("mug", captions, 8, rng)
    assert len({p.text for p in one_call}) == 8  # no repeats within a cluster


def test_world_prompts_carry_the_context_whose_prompt_and_skills_they_are():
    for p in WorldPromptWriter().write("robot", [], 20, np.random.default_rng(1)):
        ctx = target_context(p)
        assert ctx.prompt("robot") == p.text and tuple(ctx.skills) == p.skills


def test_skills_of_free_text():
    assert skills_of("a dog wearing sunglasses on the beach, in the style of Van Gogh") == [
        "recontext", "stylize", "accessorize"]
    assert skills_of("a blue dog seen from above") == ["recolor", "view"]
    assert skills_of("a dog") == ["recontext"]


def test_llm_writer_keeps_lines_that_name_the_class_and_fills_the_rest_from_the_grammar(tmp_path):
    from transformers import BertTokenizer, GPT2Config, GPT2LMHeadModel

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a dog on the beach in snow red blue hat".split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=2, eos_token_id=3)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    writer = make_prompt_writer(str(tmp_path / "lm"))
    assert isinstance(writer, LLMPromptWriter)
    lines = writer.generate("dog", 4, seed=0)
    assert lines and all(set(line.split()) <= set(words) for line in lines)  # the model's own words
    prompts = writer.write("dog", ["a dog"], 6, np.random.default_rng(0))
    assert len(prompts) == 6 and all("dog" in p.text.split() and p.text != "a dog" for p in prompts)
    assert 0 <= writer.replaced <= 6


def test_unknown_writer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a local model folder"):
        make_prompt_writer(str(tmp_path / "nowhere"))
