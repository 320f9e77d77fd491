"""``ray-suti train-clip``: a small CLIP for the embedded default, trained with Ray Train.

Pretrained CLIP weights cannot be downloaded here, and alt text is weak (often empty or
boilerplate), so the main signal is image-image contrast between two photos of one page (the same
subject in different scenes: exactly the identity the cluster filter must see), plus the usual
image-text contrast on the captions that survive cleaning. Pairs are made by grouping the web pairs
by normalised page URL with Ray Data.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

WEIGHTS = "clip.safetensors"


@dataclass(frozen=True)
class ClipTrainConfig:
    input: str = field(default="runs/world/web", metadata={"help": "web-pairs Parquet"})
    output: str = field(default="runs/clip/tiny-clip.safetensors", metadata={"help": "trained weights (safetensors)"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "pairs per step per worker"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    text_weight: float = field(default=0.25, metadata={"help": "weight of the image-text loss"})
    num_workers: int = field(default=1, metadata={"help": "training workers"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per worker"})
    storage_path: str = field(default="runs/train", metadata={"help": "Ray Train storage"})
    seed: int = field(default=0, metadata={"help": "seed"})


def page_pairs(group: pd.DataFrame, seed: int) -> pd.DataFrame:
    """All valid photos of one page -> pairs (a, b) of different photos, each photo once as ``a``."""
    from ..utils.images import inspect_image
    from .captions import clean_caption

    ok = [i for i, d in enumerate(group["image"]) if inspect_image(d)[1] is None]
    if len(ok) < 2:
        return pd.DataFrame({"a": [], "b": [], "caption": []})
    rng = np.random.default_rng([seed, len(group), len(ok)])
    partners = [ok[(j + 1 + rng.integers(len(ok) - 1)) % len(ok)] for j in range(len(ok))]
    return pd.DataFrame({"a": [group["image"].iloc[i] for i in ok], "b": [group["image"].iloc[p] for p in partners],
                         "caption": [clean_caption(group["caption"].iloc[i]) for i in ok]})


def _loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.nn.functional as F
    from open_clip.tokenizer import SimpleTokenizer

    from ..utils.images import inspect_image
    from .clip import TINY_CLIP, load_clip, preprocess

    cfg = ClipTrainConfig(**config)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    clip, size = load_clip("tiny")
    clip.train()
    model = ray.train.torch.prepare_model(clip)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    tokenizer = SimpleTokenizer()
    shard = ray.train.get_dataset_shard("train")
    ctx_len = TINY_CLIP["text_cfg"]["context_length"]
    step = 0
    while step < cfg.steps:
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", drop_last=True,
                                        local_shuffle_buffer_size=4 * cfg.batch_size):
            a = preprocess([inspect_image(x)[0] for x in batch["a"]], size)
            b = preprocess([inspect_image(x)[0] for x in batch["b"]], size)
            has_text = torch.tensor([bool(c) for c in batch["caption"]])
            core = model.module if hasattr(model, "module") else model
            za = F.normalize(core.encode_image(a), dim=-1)
            zb = F.normalize(core.encode_image(b), dim=-1)
            scale = core.logit_scale.exp().clamp(max=100)
            target = torch.arange(len(za))
            loss = (F.cross_entropy(scale * za @ zb.T, target) + F.cross_entropy(scale * zb @ za.T, target)) / 2
            if has_text.sum() > 1:
                zt = F.normalize(core.encode_text(tokenizer(list(batch["caption"][has_text.numpy()]),
                                                            context_length=ctx_len)), dim=-1)
                zi = za[has_text]
                t = torch.arange(len(zt))
                loss = loss + cfg.text_weight * (F.cross_entropy(scale * zi @ zt.T, t)
                                                 + F.cross_entropy(scale * zt @ zi.T, t)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 and step < cfg.steps:
                if ray.train.get_context().get_world_rank() == 0:
                    print(f"clip step={step} loss={float(loss):.4f}", flush=True)
                ray.train.report({"step": step, "loss": float(loss)})
            if step >= cfg.steps:
                break
    with tempfile.TemporaryDirectory() as tmp:  # the weights travel as a Ray Train checkpoint, so
        checkpoint = None  # workers on other nodes and s3:// storage work alike
        if ray.train.get_context().get_world_rank() == 0:
            from safetensors.torch import save_file

            core = model.module if hasattr(model, "module") else model
            save_file({k: v.detach().contiguous() for k, v in core.state_dict().items()},
                      os.path.join(tmp, WEIGHTS))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            print(f"clip step={step} loss={float(loss):.4f}", flush=True)
        ray.train.report({"step": step, "loss": float(loss)}, checkpoint=checkpoint)


def train_clip(cfg: ClipTrainConfig) -> dict:
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..utils.ray_utils import init_ray
    from .builder import WEB_COLUMNS, check_shards, validate_records

    files, fs, _ = check_shards(cfg.input, tolerate=True)
    init_ray()
    ds = ray.data.read_parquet(files, filesystem=fs, columns=list(WEB_COLUMNS), num_cpus=0.25)
    ds = ds.map_batches(validate_records, fn_kwargs={"min_side": 16}, batch_format="pandas", num_cpus=0.25)
    ds = ds.filter(lambda r: r["page_key"] != "")
    ds = ds.groupby("page_key").map_groups(page_pairs, fn_kwargs={"seed": cfg.seed}, batch_format="pandas",
                                           num_cpus=0.25)
    trainer = TorchTrainer(
        _loop, train_loop_config=asdict(cfg), datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="train-clip", storage_path=os.path.abspath(cfg.storage_path)),
        torch_config=TorchConfig(backend="gloo"),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        shutil.copyfile(os.path.join(d, WEIGHTS), cfg.output)
    return result.metrics
