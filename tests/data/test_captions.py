import pytest
from PIL import Image

from ray_suti.data.captions import AltTextCaptioner, ModelCaptioner, make_captioner

WORDS = "a the toy mug robot creature small large red blue on in beach snow forest city room".split()


def save_tiny_captioner(path) -> set:
    """A tiny GIT image-to-text model with its processor, saved offline; returns its vocabulary."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    torch.manual_seed(0)  # random weights: the same ones whatever ran before in this process

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                             tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}))
    config = GitConfig(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8),
                       vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    GitForCausalLM(config).save_pretrained(path)
    processor.save_pretrained(path)
    return set(WORDS)


def test_alt_text_captioner_cleans_and_keeps_one_caption_per_image():
    assert AltTextCaptioner()([None, None], ["  a red  mug ", "IMG_0001.jpg"]) == ["a red mug", ""]


def test_model_captioner_writes_a_caption_per_image_from_the_model(tmp_path):
    words = save_tiny_captioner(tmp_path / "git")
    captioner = make_captioner(str(tmp_path / "git"))
    assert isinstance(captioner, ModelCaptioner)
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (32, 32)), Image.new("RGBA", (64, 64))]
    captions = captioner(images, ["alt one", "alt two", "alt three"])
    assert len(captions) == 3
    for c in captions:
        assert c and set(c.split()) <= words  # the model's words, not the alt text
    assert captioner([], []) == []


def test_unknown_captioner_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'alt' or a transformers model folder"):
        make_captioner(str(tmp_path / "nowhere"))
