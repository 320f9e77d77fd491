"""The driver side: Ray Data over the Parquet shards, a TorchTrainer, and the export of the result."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace

from .config import TrainConfig


def _storage(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray Train workers run in another working directory, where
    ``--init-from checkpoints/x.safetensors`` would not be found. URIs are left alone."""
    fields = ("data", "latents", "init_from", "resume_from", "storage_path", "export", "export_file", "export_adapter")
    return replace(cfg, **{f: _storage(getattr(cfg, f)) for f in fields if getattr(cfg, f)})


def export_checkpoint(checkpoint_dir: str, cfg: TrainConfig, command: str = "") -> dict:
    """EMA weights of a training checkpoint -> the ``from_pretrained`` folder and/or one file
    (local paths or URIs)."""
    from .checkpoint import load_checkpoint
    from .step import restore_weights, start_pipeline

    weights, ema, state = load_checkpoint(checkpoint_dir)
    pipe = start_pipeline(cfg)
    restore_weights(pipe.model, {**weights, **ema}, checkpoint_dir)
    if cfg.export:
        pipe.save_pretrained(cfg.export)
    if cfg.export_file:
        pipe.save_single_file(cfg.export_file, metadata={"step": state["step"], "mode": cfg.mode, "command": command,
                                                         "train_config": json.dumps(asdict(cfg))})
    if cfg.export_adapter:
        pipe.save_suti_adapter(cfg.export_adapter)
    return state


def prepare_batch(batch: dict, prepare) -> dict:
    return prepare(batch)


def prepared_ahead(dataset, cfg: TrainConfig):
    """Decoding, tokenizing and collating (``prepare.Prepare``) in Ray Data tasks, ahead of the trainers.
    Tasks, not an actor pool: actors hold their CPUs, which Ray Data's file listing (1 CPU a task) then
    waits for on a small cluster. The Prepare object travels once, through ``fn_kwargs``, its tokenizer as the checkpoint's name."""
    from ..model.loading import image_size_of
    from .prepare import Prepare

    checkpoint = cfg.init_from or cfg.preset
    prepare = Prepare(cfg, checkpoint, image_size_of(checkpoint))
    return dataset.map_batches(prepare_batch, fn_kwargs={"prepare": prepare}, batch_size=cfg.batch_size,
                               batch_format="numpy", num_cpus=cfg.data_cpus)


def run_training(cfg: TrainConfig, command: str = "") -> dict:
    """Fits on the Ray cluster in RAY_ADDRESS (or an embedded one); returns a summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..utils.ray_utils import fit, init_ray, read_parquet
    from .loop import train_loop_per_worker
    from .step import continued_step, training_data

    start = continued_step(cfg)
    if start >= cfg.steps and not cfg.resume_from:
        raise ValueError(f"--steps {cfg.steps} ends before the start: {cfg.init_from} carries step {start} on "
                         f"(steps count from it; e.g. --steps {start + cfg.steps})")
    init_ray()
    cfg = with_absolute_paths(cfg)
    folder, names = training_data(cfg)
    dataset = read_parquet(folder, num_cpus=cfg.data_cpus).select_columns(names)
    if not cfg.decode_in_worker:
        dataset = prepared_ahead(dataset, cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=cfg.name, storage_path=_storage(cfg.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": dataset},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
    )
    start = time.time()
    result = fit(trainer)
    summary = {"metrics": result.metrics, "minutes": round((time.time() - start) / 60, 2),
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if result.checkpoint and (cfg.export or cfg.export_file):
        with result.checkpoint.as_directory() as d:
            export_checkpoint(d, cfg, command)
    return summary
