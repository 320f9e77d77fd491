"""The Ray Train runner: DeepSpeed ZeRO over a SuTI model, each worker fed by a Ray Data shard.

The step itself (model, loss, groups, EMA, seeding, restoring) is ``step.py``'s, shared with the
one-process runner. Ray Data reads, decodes, tokenizes and collates ahead of the workers
(``trainer.py``, ``data.Prepare``); a worker starts reading its shard (``iter_torch_batches``, in a
thread: ``ReadAhead``) before it sets up DeepSpeed and the model, and only draws its demos and
dropouts as index operations (``Collate.draw``). Every worker runs the same number of steps (Ray
Train splits the data into equal shards, and each worker loops over its shard) and reports at the
same steps. A checkpoint is
rank 0's weights, EMA and state file plus every rank's DeepSpeed optimizer partition; after a
failure Ray Train restarts the workers, ``ray.train.get_checkpoint()`` hands back the last
checkpoint, and training goes on with Adam's moments, the warm-up and each worker's position in its
shard (raw batches consumed) as they were.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import resource
import tempfile
import threading
import time

import numpy as np
import torch

from .checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, load_checkpoint, save_checkpoint, trainable_state
from .config import TrainConfig
from .data import batch_rows
from .step import (LossModule, check_ema, continued_step, demo_gain, ema_update, make_collate, probe_batch,
                   restore_weights, seed_step, set_lr, start_pipeline, trainable_groups)

TORCH_EXTENSIONS_DIR = os.path.expanduser("~/.cache/ray-suti/torch_extensions")
SMALL_SHARD_ROWS = 4096  # a worker's shard this small is read once and replayed from memory


def deepspeed_config(cfg: TrainConfig) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.use_gpu},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW (no JIT-compiled optimizer on CPU)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_cpu_inference_comm_op() -> None:
    """On CPU, DeepSpeed's comm backend compiles a shared-memory all-reduce kernel at start-up
    (tens of seconds of C++ on a new machine or virtualenv) that only ``inference_all_reduce``
    calls; training reduces through torch.distributed (gloo). Marking the op unavailable skips the
    build."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _gathered(params, stage: int):
    if stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def raw_batches(shard, cfg: TrainConfig, rank: int):
    """The worker's rows, epoch after epoch, shuffled locally with a seed of (seed, rank, epoch): torch
    tensors prepared by Ray Data, or raw numpy columns with ``--decode-in-worker``. A shard of at most
    ``SMALL_SHARD_ROWS`` rows is kept after its first epoch and replayed in a new order each time:
    re-reading a few rows costs a Ray Data execution (seconds) per epoch."""
    epoch, kept, rows = 0, [], 0
    while True:
        shuffle = dict(batch_size=cfg.batch_size, prefetch_batches=2, local_shuffle_buffer_size=cfg.shuffle_buffer,
                       local_shuffle_seed=cfg.seed + 1000 * epoch + 7919 * rank)
        for raw in (shard.iter_batches(batch_format="numpy", **shuffle) if cfg.decode_in_worker
                    else shard.iter_torch_batches(**shuffle)):
            rows += len(next(iter(raw.values())))
            if rows <= SMALL_SHARD_ROWS:
                kept.append(raw)
            yield raw
        epoch += 1
        if 0 < rows <= SMALL_SHARD_ROWS:
            break
        kept, rows = [], 0
    rng = np.random.default_rng([cfg.seed, rank])
    while True:
        for i in rng.permutation(len(kept)):
            yield kept[i]


class ReadAhead:
    """Iterates ``items`` in a thread, at most ``depth`` items ahead of the reader; the thread's
    error is raised in the reader. ``close()`` stops the thread at its next item."""

    _END = object()

    def __init__(self, items, depth: int = 2):
        self._queue, self._stop = queue.Queue(depth), threading.Event()
        threading.Thread(target=self._fill, args=(items,), daemon=True, name="read-ahead").start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _fill(self, items) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as error:  # noqa: BLE001 (handed to the reader)
            self._put((None, error))

    def __iter__(self):
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig(**config)
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    torch.set_num_threads(cfg.threads)
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # Ray Data starts on the shard now, beside the set-up below (DeepSpeed, the model stack, the
    # pipeline): read after it, its coordinator's start and first read added ~8 s to a short run.
    rows = ReadAhead(raw_batches(ray.train.get_dataset_shard("train"), cfg, rank))
    try:
        _train(cfg, config, rows, ctx)
    finally:
        rows.close()


def _train(cfg: TrainConfig, config: dict, rows: ReadAhead, ctx) -> None:
    import deepspeed
    import ray.train

    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.use_gpu else torch.device("cpu")
    if not cfg.use_gpu:
        skip_cpu_inference_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")

    pipe = start_pipeline(cfg)
    model = pipe.model
    named, groups = trainable_groups(model, cfg)
    step = warm_from = continued_step(cfg)
    ema, state, ckpt_dir = None, {}, None
    # Ray's own checkpoint after a restart wins; else --resume-from (a folder or a URI, downloaded)
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    with contextlib.ExitStack() as stack:
        if ckpt is not None:
            ckpt_dir = stack.enter_context(ckpt.as_directory())
            weights, ema, state = load_checkpoint(ckpt_dir)
            restore_weights(model, weights, cfg.resume_from or "the run's last checkpoint")
            check_ema(ema, named, cfg.resume_from or "the run's last checkpoint")
            step = warm_from = state["step"]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        engine, optimizer, _, _ = deepspeed.initialize(model=LossModule(model, cfg).to(device), optimizer=optimizer,
                                                       config=deepspeed_config(cfg))
        restored = ckpt_dir is not None and _load_optimizer(engine, ckpt_dir, state, world)
        if restored:  # Adam's moments carry on, and so does the warm-up
            warm_from = state.get("warm_from", 0)
    resumed_from = step
    position = state.get("data_positions", {}).get(str(rank), 0) if restored else 0
    # The EMA follows each parameter on rank 0 or, under ZeRO-3, each rank's own partition of it:
    # nothing is gathered per step, and the whole EMA only when a checkpoint is written.
    sharded = cfg.zero_stage == 3
    followed = lambda: [(n, p.ds_tensor) for n, p in named] if sharded else named  # noqa: E731 (looked up anew)
    if ema is not None and (sharded or rank == 0):
        ema = {n: (_partition(ema[n], p, rank, world) if sharded else ema[n]).to(t.device)
               for (n, p), (_, t) in zip(named, followed())}
    elif sharded or rank == 0:
        ema = {n: t.detach().float().clone() for n, t in followed()}  # on the worker's device

    collate = make_collate(cfg, pipe, seed=cfg.seed)
    probe = probe_batch(cfg, collate) if cfg.mode == "suti" else None

    def batches():
        """(collated batch of exactly ``batch_size`` rows, raw batches consumed), forever: the rows
        an epoch leaves over are carried into the next, so a shard smaller than a batch still trains
        (with drop_last it yielded nothing and the run never ended)."""
        carry, consumed = None, position
        for raw in itertools.islice(rows, position, None):  # a resumed run's place in its shard
            collate.rng = np.random.default_rng([cfg.seed, rank, consumed])  # per raw batch: resumable
            batch, consumed = (collate(raw) if cfg.decode_in_worker else collate.draw(raw)), consumed + 1
            if carry is not None:
                batch = {k: torch.cat([carry[k], v]) for k, v in batch.items()}
            while batch_rows(batch) >= cfg.batch_size:
                yield {k: v[:cfg.batch_size] for k, v in batch.items()}, consumed
                batch = {k: v[cfg.batch_size:] for k, v in batch.items()}
            carry = batch

    losses, last_time, last_step, last_batch = [], time.time(), step, None
    dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
    for batch, position in batches():
        if step >= cfg.steps:
            break
        if batch_rows(batch) == 0:  # every row broken: reuse the last batch, never skip a
            batch = last_batch  # collective step
        last_batch = batch
        batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
        seed_step(cfg, step, rank)
        set_lr(optimizer, cfg, step, warm_from)
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        step += 1
        losses.append(loss.item())
        if sharded or rank == 0:
            ema_update(ema, followed(), cfg.ema_decay, step)

        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if step % cfg.report_every and not checkpoint_now:
            continue
        elapsed = time.time() - last_time
        metrics = {"step": step, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": world * cfg.batch_size * (step - last_step) / max(elapsed, 1e-9),
                   "grad_norm": float(engine.get_global_grad_norm() or 0.0), "resumed_from": resumed_from,
                   "optimizer_restored": bool(restored),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if probe is not None and cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == cfg.steps):
            metrics["demo_gain"] = demo_gain(engine.module.model, probe, device)
        losses, last_time, last_step = [], time.time(), step
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                  flush=True)
        if not checkpoint_now:
            ray.train.report(metrics)
            continue
        with _gathered([p for _, p in model.named_parameters()], cfg.zero_stage):
            weights = trainable_state(model) if rank == 0 else None
        whole_ema = _gather_ema(ema, named, rank, world, device) if sharded else ema
        positions = [None] * world  # every worker's place in its own shard
        torch.distributed.all_gather_object(positions, position)
        with tempfile.TemporaryDirectory() as tmp:
            # every rank writes its optimizer partition; Ray Train merges the ranks' folders
            engine.save_checkpoint(os.path.join(tmp, DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                                   exclude_frozen_parameters=True)
            if rank == 0:
                save_checkpoint(tmp, weights, {n: whole_ema[n].cpu() for n, _ in named},
                                {"step": step, "warm_from": warm_from, "world_size": world,
                                 "data_positions": {str(r): p for r, p in enumerate(positions)},
                                 "suti_config": model.config.to_dict(), "train_config": config})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _partition(whole: torch.Tensor, param, rank: int, world: int) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a whole tensor: DeepSpeed gives rank r the r-th of ``world``
    equal chunks of the flattened parameter, the last zero-padded."""
    size = param.ds_tensor.ds_numel
    flat = torch.zeros(size * world, dtype=torch.float32)
    flat[: whole.numel()] = whole.flatten().float()
    return flat[rank * size: (rank + 1) * size].clone()


def _gather_ema(ema: dict, named: list, rank: int, world: int, device) -> dict | None:
    """Every rank's EMA partitions -> the whole EMA on rank 0, which writes it (None elsewhere)."""
    out = {}
    for n, p in named:
        part = ema[n].to(device)  # NCCL gathers device tensors (the partitions may be offloaded)
        parts = [torch.empty_like(part) for _ in range(world)] if rank == 0 else None
        torch.distributed.gather(part, parts, dst=0)
        if rank == 0:
            out[n] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
    return out if rank == 0 else None


def _load_optimizer(engine, ckpt_dir: str, state: dict, world: int) -> bool:
    """DeepSpeed's optimizer partitions of a checkpoint written by as many workers -> True, else
    False (an older checkpoint without them, or another world size: Adam starts afresh, warmed up)."""
    folder = os.path.join(ckpt_dir, DEEPSPEED_DIR)
    if not os.path.isdir(os.path.join(folder, DEEPSPEED_TAG)) or state.get("world_size") != world:
        return False
    path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG, load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    return path is not None
