"""An offline CLIP tokenizer: the BPE vocabulary ships inside open_clip, so no hub download.

It produces the same ids as OpenAI's CLIP tokenizer (and open_clip's ``SimpleTokenizer``).
"""
from __future__ import annotations

import functools
import gzip

from transformers import CLIPTokenizer


@functools.lru_cache(maxsize=4)
def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    words = list(bytes_to_unicode().values())
    words += [w + "</w>" for w in words] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, model_max_length=max_length)
