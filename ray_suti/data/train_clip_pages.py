"""The ``pages`` recipe of ``ray-suti train-clip``: page pairs of crawled web pairs.

A page pair is two different valid photos of one page (``page_pairs``). The loss (``pair_loss``)
is page contrast (same-page pairs masked out of the negatives) plus instance contrast (two
augmented views of one photo) plus, optionally, image-text contrast on the captions that survive
cleaning. The Ray Train job groups the web pairs by normalised page URL with Ray Data
(``page_dataset``); ``--local`` groups them with pandas and decodes them once into one tensor on
the device (``tensor_losses``), so a step costs no decoding.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .train_clip import ClipTrainConfig, augment, contrastive


def page_pairs(group: pd.DataFrame, seed: int) -> pd.DataFrame:
    """All valid photos of one page -> pairs (a, b) of different photos, each photo once as ``a``."""
    from .captions import clean_caption

    group = group[group["reason"] == ""]
    if len(group) < 2:
        return pd.DataFrame({"a": [], "b": [], "caption": [], "page": []})
    n = len(group)
    rng = np.random.default_rng([seed, n, sum(map(ord, group["page_key"].iloc[0]))])
    partners = [(j + 1 + int(rng.integers(n - 1))) % n for j in range(n)]
    return pd.DataFrame({"a": list(group["image"]), "b": [group["image"].iloc[p] for p in partners],
                         "caption": [clean_caption(c) for c in group["caption"]],
                         "page": [group["page_key"].iloc[0]] * n})


def pair_loss(model, cfg: ClipTrainConfig, rng: np.random.Generator, batch: dict, tokenizer, size: int,
              device: str = "cpu"):
    """The loss on a batch of page pairs: ``a``, ``b`` (encoded images or
    (N, 3, S, S) normalised tensors), ``page`` and ``caption`` columns."""
    import torch

    from ..utils.images import inspect_image
    from .clip import TINY_CLIP, preprocess

    def images(col):
        if isinstance(col, torch.Tensor):
            return col.to(device)
        return preprocess([inspect_image(x)[0] for x in col], size).to(device)

    a, b = images(batch["a"]), images(batch["b"])
    pages = pd.factorize(np.asarray(batch["page"]))[0]
    same_page = torch.from_numpy(pages[:, None] == pages[None, :])
    views = [augment(a, rng), augment(b, rng)] + ([augment(a, rng)] if cfg.instance_weight else [])
    captions = np.asarray(batch["caption"], dtype=object)
    has_text = np.array([bool(c) for c in captions])
    use_text = bool(cfg.text_weight) and has_text.sum() > 1
    text = None
    if use_text:
        text = tokenizer(list(captions[has_text]), context_length=TINY_CLIP["text_cfg"]["context_length"]).to(device)
    # One forward through the (DDP-)wrapped model, so gradients are synchronised across workers.
    feats, zt, scale = model(image=torch.cat(views), text=text)[:3]
    za, zb, *za2 = feats.split(len(a))
    scale = scale.clamp(max=100)
    loss = contrastive(za, zb, scale, same_page)
    if cfg.instance_weight:
        loss = loss + cfg.instance_weight * contrastive(za, za2[0], scale)
    if use_text:
        keep = torch.from_numpy(has_text)
        loss = loss + cfg.text_weight * contrastive(za[keep.to(device)], zt, scale, same_page[keep][:, keep])
    return loss


def load_pairs(cfg: ClipTrainConfig) -> pd.DataFrame:
    """Web-pairs Parquet -> page pairs (columns a, b, caption, page), as the Ray job makes them."""
    import pyarrow.parquet as pq

    from ..utils.images import MIN_SIDE
    from .builder import check_shards, validate_records

    files, fs, _ = check_shards(cfg.input, tolerate=True)
    if any(not f.endswith(".parquet") for f in files):
        raise ValueError("--local reads Parquet web pairs only; drop --local (the Ray job) for tars")
    records = pd.concat([pq.read_table(f, filesystem=fs, columns=["page_url", "caption", "image"]).to_pandas()
                         for f in files], ignore_index=True)
    records = validate_records(records, min_side=MIN_SIDE)
    records = records[(records["page_key"] != "") & (records["reason"] == "")]
    return pd.concat([page_pairs(g, cfg.seed) for _, g in records.groupby("page_key", sort=True)], ignore_index=True)


def _tensor_batches(pairs: pd.DataFrame, a, b, cfg: ClipTrainConfig, rng: np.random.Generator):
    """Endless shuffled epochs of batches from decoded pairs (``a``, ``b``: (N, 3, S, S) on the device)."""
    import torch

    pages, captions = pairs["page"].to_numpy(), pairs["caption"].to_numpy()
    while True:
        order = rng.permutation(len(pairs))
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            index = torch.from_numpy(idx).to(a.device)
            yield {"a": a[index], "b": b[index], "page": pages[idx], "caption": captions[idx]}


def _shard_batches(shard, cfg: ClipTrainConfig):
    """Endless epochs of a Ray Train worker's shard of page pairs."""
    epoch = 0
    while True:
        yield from shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", drop_last=True,
                                      local_shuffle_buffer_size=8 * cfg.batch_size, local_shuffle_seed=cfg.seed + epoch)
        epoch += 1



def page_dataset(files: list[str], fs, cfg: ClipTrainConfig):
    """Checked web-pair shards -> a Ray Dataset of page pairs (Ray must be running)."""
    from ..utils.images import MIN_SIDE
    from .builder import read_web_pairs, validate_records

    ds = read_web_pairs(files, fs, num_cpus=0.25)
    ds = ds.map_batches(validate_records, fn_kwargs={"min_side": MIN_SIDE}, batch_format="pandas", num_cpus=0.25)
    ds = ds.filter(lambda r: r["page_key"] != "" and r["reason"] == "")
    return ds.groupby("page_key").map_groups(page_pairs, fn_kwargs={"seed": cfg.seed}, batch_format="pandas",
                                             num_cpus=0.25)


def shard_losses(model, cfg: ClipTrainConfig, rng: np.random.Generator, size: int, shard):
    """A Ray Train worker's shard of page pairs -> a callable giving the next step's loss."""
    from open_clip.tokenizer import SimpleTokenizer

    batches, tokenizer = _shard_batches(shard, cfg), SimpleTokenizer()
    return lambda: pair_loss(model, cfg, rng, next(batches), tokenizer, size)


def tensor_losses(model, cfg: ClipTrainConfig, rng: np.random.Generator, size: int, device: str = "cpu"):
    """Reads and decodes the page pairs -> (a callable giving the next step's loss, pair and page counts)."""
    from open_clip.tokenizer import SimpleTokenizer

    from ..utils.images import inspect_image
    from .clip import preprocess

    pairs = load_pairs(cfg)
    if len(pairs) < cfg.batch_size:
        raise ValueError(f"{len(pairs)} page pairs is fewer than one batch of {cfg.batch_size}")
    decode = lambda col: preprocess([inspect_image(x)[0] for x in col], size).to(device)  # noqa: E731
    batches, tokenizer = _tensor_batches(pairs, decode(pairs["a"]), decode(pairs["b"]), cfg, rng), SimpleTokenizer()
    stats = {"pairs": len(pairs), "pages": int(pairs["page"].nunique())}
    return (lambda: pair_loss(model, cfg, rng, next(batches), tokenizer, size, device)), stats
