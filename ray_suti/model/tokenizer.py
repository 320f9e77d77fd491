"""An offline CLIP tokenizer: the BPE vocabulary ships inside open_clip, so no hub download.

It produces the same ids as OpenAI's CLIP tokenizer (and open_clip's ``SimpleTokenizer``), but for
control characters, which it keeps as tokens where theirs drop them. The vocabulary file is found
without importing open_clip, whose package import pulls in torch and its model zoo (seconds of CPU
in every Ray Data task and replica that only tokenizes).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os

from transformers import CLIPTokenizer


def _bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise ImportError("the CLIP tokenizer's vocabulary comes with open_clip: pip install open_clip_torch")
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # the unprintable bytes go to code points from 256 on
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=4)
def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    words = list(_bytes_to_unicode().values())
    words += [w + "</w>" for w in words] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, model_max_length=max_length)
