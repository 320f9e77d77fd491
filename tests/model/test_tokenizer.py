"""The offline CLIP tokenizer: OpenAI's vocabulary and ids, built without importing open_clip."""
import numpy as np

from ray_suti.model.tokenizer import clip_tokenizer

from ..conftest import model_libraries_loaded_by


def test_ids_match_open_clips_tokenizer_up_to_the_padding():
    from open_clip.tokenizer import SimpleTokenizer

    texts = ["a photo of a sks dog on the beach", "Ünïcødé – emoji 🐶, CAPS and   spaces", "", "x " * 100]
    ours = clip_tokenizer(77)(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    theirs = SimpleTokenizer()(texts, context_length=77).numpy()
    for a, b in zip(ours, theirs):
        n = int(np.argmax(b == 49407)) + 1  # through the end-of-text token; the paddings differ
        np.testing.assert_array_equal(a[:n], b[:n])


def test_building_it_imports_neither_open_clip_nor_torch():
    # open_clip's package import pulls in torch and its model zoo: seconds in every process that only tokenizes
    assert model_libraries_loaded_by("from ray_suti.model.tokenizer import clip_tokenizer; clip_tokenizer(77)") == [
        "transformers"]
