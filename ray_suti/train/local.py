"""Single-process training without Ray or DeepSpeed, on one GPU or the CPU.

For a lone GPU box that has neither installed, and for debugging. It shares the model, loss, batch
preparation, optimizer groups, EMA and checkpoint format with the Ray trainer (``loop.py``); only
the data feed (a shuffled pyarrow stream through DataLoader workers) and the optimizer step differ.

    python -m ray_suti.train.local --mode suti --data runs/oracle --steps 5000 --export-file m.safetensors
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..config import add_dataclass_args, from_args
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .data import Collate, columns
from .loop import LossModule, continued_step, ema_update, set_lr, start_pipeline, trainable_groups


class ParquetStream(torch.utils.data.IterableDataset):
    """Endless shuffled batches from Parquet files; each DataLoader worker reads its own files."""

    def __init__(self, cfg: TrainConfig, collate: Collate):
        self.cfg, self.collate = cfg, collate
        if not self.files():
            raise FileNotFoundError(f"no Parquet files in {cfg.data}")

    def files(self) -> list[str]:
        # Listed again on every pass: a generator may still be adding shards (train_tiny32.sh).
        return sorted(glob.glob(os.path.join(self.cfg.data, "*.parquet")))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.cfg.seed, wid, int(time.time())])
        self.collate.rng = np.random.default_rng([self.cfg.seed, wid, 1])
        bs, pending = self.cfg.batch_size, None
        while True:
            files = self.files()
            for path in rng.permutation(files[wid::n] or files):
                table = pq.read_table(path, columns=columns(self.cfg.mode, self.cfg.controls))
                pending = table if pending is None else pa.concat_tables([pending, table])
                order = rng.permutation(pending.num_rows)
                full = len(order) // bs * bs
                for i in range(0, full, bs):
                    rows = pending.take(order[i: i + bs]).to_pydict()
                    batch = self.collate({k: np.array(v, dtype=object) for k, v in rows.items()})
                    if batch["target"].shape[0]:
                        yield batch
                pending = pending.take(order[full:])  # too few for a batch: carried into the next file's


def train_local(cfg: TrainConfig, loader_workers: int = 4, command: str = "", max_minutes: float = 0.0) -> dict:
    """Trains to ``cfg.steps`` (or until ``max_minutes`` pass, for leased machines), then exports."""
    deadline = time.time() + max_minutes * 60 if max_minutes else float("inf")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu else "cpu")
    torch.set_num_threads(cfg.threads)
    pipe = start_pipeline(cfg)
    model = pipe.model.to(device).train()
    step = start = continued_step(cfg)
    named, groups = trainable_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    ema = {n: p.detach().float().clone() for n, p in named}
    loss_module = LossModule(model, cfg)
    collate = Collate(cfg, pipe.tokenizer, model.config.image_size, model.config.max_text_len, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(ParquetStream(cfg, collate), batch_size=None, num_workers=loader_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=loader_workers > 0)
    probe = None
    if cfg.mode == "suti":
        from .loop import demo_gain, probe_batch

        probe = probe_batch(cfg, collate)
    losses, t0, s0 = [], time.time(), step
    for batch in loader:
        if step >= cfg.steps or time.time() > deadline:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        set_lr(optimizer, cfg, step, start)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        optimizer.step()
        step += 1
        ema_update(ema, named, cfg.ema_decay, step)
        losses.append(loss.item())
        if step % cfg.report_every == 0 or step == cfg.steps:
            line = {"step": step, "loss": round(float(np.mean(losses)), 4), "grad_norm": round(float(grad_norm), 3),
                    "samples_per_s": round(cfg.batch_size * (step - s0) / (time.time() - t0), 1)}
            if probe is not None and cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == cfg.steps):
                line["demo_gain"] = round(demo_gain(model, probe, device), 4)
            print(json.dumps(line), flush=True)
            losses, t0, s0 = [], time.time(), step
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or time.time() > deadline:
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("vae.")}
            save_checkpoint(os.path.join(cfg.storage_path, cfg.name, f"checkpoint_{step:07d}"), weights,
                            {n: v.cpu() for n, v in ema.items()}, {"step": step, "train_config": asdict(cfg)})
    with torch.no_grad():  # export the EMA weights
        for n, p in named:
            p.copy_(ema[n].to(p.dtype))
    pipe.model.to("cpu")
    if cfg.export:
        pipe.save_pretrained(cfg.export)
    if cfg.export_file:
        pipe.save_single_file(cfg.export_file, metadata={"step": step, "mode": cfg.mode, "command": command,
                                                         "train_config": json.dumps(asdict(cfg))})
    if cfg.export_adapter:
        pipe.save_suti_adapter(cfg.export_adapter)
    return {"step": step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop and export after this long (0: no limit)")
    args = parser.parse_args(argv)
    cfg = from_args(TrainConfig, args)
    command = "python -m ray_suti.train.local " + " ".join(sys.argv[1:] if argv is None else argv)
    print(train_local(cfg, args.loader_workers, command, args.max_minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
