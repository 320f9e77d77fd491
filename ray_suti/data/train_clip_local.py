"""Single-process ``train-clip`` without Ray, on one GPU or the CPU.

For a lone GPU box without Ray (as ``ray_suti/train/local.py`` is for the SuTI trainer). Same
config, pairs (``page_pairs``), augmentation and loss (``pair_loss``) as the Ray Train job; only
the feed differs: Parquet web pairs are read with pyarrow, grouped with pandas and decoded once
into one tensor on the device, so a step costs no decoding.

    python -m ray_suti.data.train_clip_local --input runs/world/web --output clip.safetensors --steps 8000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from ..config import add_dataclass_args, from_args
from ..utils.images import MIN_SIDE, inspect_image
from .builder import check_shards, validate_records
from .clip import load_clip, preprocess
from .train_clip import ClipTrainConfig, lr_at, page_pairs, pair_loss


def load_pairs(cfg: ClipTrainConfig) -> pd.DataFrame:
    """Web-pairs Parquet -> page pairs (columns a, b, caption, page), as the Ray job makes them."""
    files, fs, _ = check_shards(cfg.input, tolerate=True)
    if any(not f.endswith(".parquet") for f in files):
        raise ValueError("the single-process trainer reads Parquet web pairs only; use `ray-suti train-clip` for tars")
    records = pd.concat([pq.read_table(f, filesystem=fs, columns=["page_url", "caption", "image"]).to_pandas()
                         for f in files], ignore_index=True)
    records = validate_records(records, min_side=MIN_SIDE)
    records = records[(records["page_key"] != "") & (records["reason"] == "")]
    return pd.concat([page_pairs(g, cfg.seed) for _, g in records.groupby("page_key", sort=True)], ignore_index=True)


def save_weights(model, path: str) -> None:
    """fp16 safetensors (``load_clip`` loads it into fp32 parameters)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().half().contiguous().cpu() for k, v in model.state_dict().items()}, path)


def train_clip_local(cfg: ClipTrainConfig, use_gpu: bool = True, max_minutes: float = 0.0,
                     snapshot_every: int = 0) -> dict:
    """Trains to ``cfg.steps`` or until ``max_minutes`` pass, then saves. With a time limit the cosine
    decay follows whichever ends first, so a leased machine's run still ends annealed."""
    from open_clip.tokenizer import SimpleTokenizer

    deadline = time.time() + max_minutes * 60 if max_minutes else float("inf")
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pairs = load_pairs(cfg)
    clip, size = load_clip("tiny", device=device)
    clip.train()
    decode = lambda col: preprocess([inspect_image(x)[0] for x in col], size).to(device)  # noqa: E731
    a, b = decode(pairs["a"]), decode(pairs["b"])  # (N, 3, S, S) each
    pages, captions = pairs["page"].to_numpy(), pairs["caption"].to_numpy()
    print(f"clip pairs={len(pairs)} pages={pairs['page'].nunique()} device={device}", flush=True)
    if len(pairs) < cfg.batch_size:
        raise ValueError(f"{len(pairs)} page pairs is fewer than one batch of {cfg.batch_size}")
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=0.05)
    tokenizer, step, losses, t0 = SimpleTokenizer(), 0, [], time.time()
    budget = deadline - t0

    def lr_now() -> float:  # the schedule's step, stretched to the time limit when that comes first
        return lr_at(cfg, step, max(step / cfg.steps, (time.time() - t0) / budget))

    while step < cfg.steps and time.time() < deadline:
        order = rng.permutation(len(pairs))
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            index = torch.from_numpy(idx).to(device)
            batch = {"a": a[index], "b": b[index], "page": pages[idx], "caption": captions[idx]}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = pair_loss(clip, cfg, rng, batch, tokenizer, size, device)
            for group in opt.param_groups:
                group["lr"] = lr_now()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % cfg.report_every == 0:
                print(json.dumps({"clip_step": step, "loss": round(float(np.mean(losses)), 4), "lr": f"{lr_now():.2e}",
                                  "steps_per_s": round(step / (time.time() - t0), 2)}), flush=True)
                losses = []
            if snapshot_every and step % snapshot_every == 0 and step < cfg.steps:
                save_weights(clip, cfg.output.replace(".safetensors", f"-step{step}.safetensors"))
            if step >= cfg.steps or time.time() > deadline:
                break
    save_weights(clip, cfg.output)
    return {"step": step, "pairs": len(pairs), "minutes": round((time.time() - t0) / 60, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, ClipTrainConfig)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this long (0: no limit)")
    parser.add_argument("--snapshot-every", type=int, default=0, help="also save OUTPUT-stepN.safetensors every N steps")
    args = parser.parse_args(argv)
    print(train_clip_local(from_args(ClipTrainConfig, args), not args.cpu, args.max_minutes, args.snapshot_every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
