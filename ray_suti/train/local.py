"""Single-process training without Ray or DeepSpeed, on one GPU or the CPU.

For a lone GPU box that has neither installed, and for debugging. The model, loss, optimizer groups,
EMA, per-step seeding and checkpoint format are ``step.py``'s, shared with the Ray trainer
(``loop.py``); only the data feed (a shuffled Parquet stream through DataLoader workers) and the
optimizer step (plain torch) are this runner's. The stream is the same for the same seed, and a
checkpoint records how many batches were consumed, so ``--resume-from`` continues exactly where a
killed run stopped: same batches, same noise, same optimizer state.

    python -m ray_suti.train.local --mode suti --data runs/oracle --steps 5000 --export-file m.safetensors
"""
from __future__ import annotations

import argparse
import glob
import itertools
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
from .checkpoint import load_checkpoint, load_optimizer, save_checkpoint, trainable_state
from .config import TrainConfig
from .data import Collate, batch_rows
from .step import (LossModule, check_ema, continued_step, demo_gain, ema_update, load_optimizer_state, make_collate,
                   optimizer_state, probe_batch, restore_weights, seed_step, set_lr, start_pipeline, trainable_groups,
                   training_data)


class ParquetStream(torch.utils.data.IterableDataset):
    """Endless shuffled batches from Parquet files, the same sequence for the same seed, starting at
    batch ``start``. The sequence is planned from the files' row counts alone; DataLoader worker w
    of n reads and collates batches start+w, start+w+n, ..., which the DataLoader yields in order."""

    def __init__(self, cfg: TrainConfig, collate: Collate, start: int = 0):
        self.cfg, self.collate, self.start = cfg, collate, start
        self._rows: dict[str, int] = {}
        self.folder, self.columns = training_data(cfg)
        if not self.files():
            raise FileNotFoundError(f"no Parquet files in {self.folder}")

    def files(self) -> list[str]:
        # Listed again on every pass: a generator may still be adding shards (train_tiny32.sh).
        return sorted(glob.glob(os.path.join(self.folder, "*.parquet")))

    def plans(self):
        """Each batch as [(file, row)], forever: every pass visits the files in a new order and the
        rows in a new order, rows too few for a batch carried into the next file's."""
        bs, carry = self.cfg.batch_size, []
        for epoch in itertools.count():
            rng = np.random.default_rng([self.cfg.seed, epoch])
            files = self.files()
            for path in (files[i] for i in rng.permutation(len(files))):
                if path not in self._rows:
                    self._rows[path] = pq.ParquetFile(path).metadata.num_rows
                rows = carry + [(path, r) for r in range(self._rows[path])]
                rows = [rows[i] for i in rng.permutation(len(rows))]
                full = len(rows) // bs * bs
                for i in range(0, full, bs):
                    yield rows[i: i + bs]
                carry = rows[full:]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        tables: dict[str, pa.Table] = {}
        for index, plan in enumerate(self.plans()):
            if index < self.start or (index - self.start) % n != wid:
                continue
            tables = {p: tables.get(p) or pq.read_table(p, columns=self.columns)
                      for p in dict.fromkeys(p for p, _ in plan)}  # only the files this batch reads
            rows = pa.concat_tables([tables[p].slice(r, 1) for p, r in plan]).to_pydict()
            self.collate.rng = np.random.default_rng([self.cfg.seed, index])  # per batch: skipping keeps it
            batch = self.collate({k: np.array(v, dtype=object) for k, v in rows.items()})
            if batch_rows(batch):
                yield batch


def train_local(cfg: TrainConfig, loader_workers: int = 4, command: str = "", max_minutes: float = 0.0) -> dict:
    """Trains to ``cfg.steps`` (or until ``max_minutes`` pass, for leased machines), then exports."""
    deadline = time.time() + max_minutes * 60 if max_minutes else float("inf")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu else "cpu")
    torch.set_num_threads(cfg.threads)
    pipe = start_pipeline(cfg)
    model = pipe.model.to(device).train()
    step = warm_from = continued_step(cfg)
    named, groups = trainable_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    ema, position = None, 0
    if cfg.resume_from:
        weights, ema, state = load_checkpoint(cfg.resume_from)
        restore_weights(model, weights, cfg.resume_from)
        check_ema(ema, named, cfg.resume_from)
        step, position = state["step"], state.get("data_position", 0)
        saved = load_optimizer(cfg.resume_from)
        if saved is not None:  # Adam's moments carry on, and so does the warm-up
            load_optimizer_state(optimizer, named, saved, cfg.resume_from)
            warm_from = state.get("warm_from", 0)
        else:
            warm_from = step
        print(f"resumed from {cfg.resume_from}: step {step}, batch {position}, optimizer state "
              f"{'restored' if saved is not None else 'not saved there (warm-up again)'}", file=sys.stderr)
    ema = {n: p.detach().float().clone() for n, p in named} if ema is None else {n: v.to(device) for n, v in ema.items()}
    loss_module = LossModule(model, cfg)
    collate = make_collate(cfg, pipe, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(ParquetStream(cfg, collate, start=position), batch_size=None,
                                         num_workers=loader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=loader_workers > 0)
    probe = probe_batch(cfg, collate) if cfg.mode == "suti" else None
    losses, t0, s0 = [], time.time(), step
    for batch in loader:
        if step >= cfg.steps or time.time() > deadline:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        seed_step(cfg, step)
        set_lr(optimizer, cfg, step, warm_from)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        optimizer.step()
        step, position = step + 1, position + 1
        ema_update(ema, named, cfg.ema_decay, step)
        losses.append(loss.item())
        if step % cfg.report_every == 0 or step == cfg.steps:
            line = {"step": step, "loss": round(float(np.mean(losses)), 7), "grad_norm": round(float(grad_norm), 4),
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": round(cfg.batch_size * (step - s0) / (time.time() - t0), 1)}
            if probe is not None and cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == cfg.steps):
                line["demo_gain"] = round(demo_gain(model, probe, device), 4)
            print(json.dumps(line), flush=True)
            losses, t0, s0 = [], time.time(), step
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or time.time() > deadline:
            save_checkpoint(os.path.join(cfg.storage_path, cfg.name, f"checkpoint_{step:07d}"), trainable_state(model),
                            {n: v.cpu() for n, v in ema.items()},
                            {"step": step, "warm_from": warm_from, "data_position": position,
                             "suti_config": model.config.to_dict(), "train_config": asdict(cfg)},
                            optimizer=optimizer_state(optimizer, named))
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
