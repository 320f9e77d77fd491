"""Stage 3b, encode: the VAE latents of every target and demo and the text-encoder states of every
prompt and caption, computed once so training runs neither encoder (latent models, whose text
encoder is frozen; the Anyscale Stable Diffusion recipe).

    ICL-V2 shards -> Ray Data read_parquet (with each row's file)
        -> map_batches(LatentEncoder) on an actor pool (a GPU each when asked)
        -> the driver gathers each input file's rows -> <output>/<same name>.parquet, written whole
    + null_prompt.safetensors (the empty prompt's states, what text dropout trains with) + encoder.json

An output file exists only complete, and a rerun skips the input files that have one, so a killed
run plus a rerun equals a clean run. Input and output may be local paths or URIs.

    ray job submit -- python jobs/encode.py --examples s3://bucket/apprentice/examples --output s3://bucket/latents
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..train.prepare import CONTROL_COLUMNS
from ..utils import storage


@dataclass(frozen=True)
class EncodeConfig:
    examples: str = field(default="runs/oracle", metadata={"help": "ICL-V2 Parquet folder (or URI) to encode"})
    output: str = field(default="runs/latents", metadata={"help": "output folder (or URI): one Parquet per input file"})
    checkpoint: str = field(default="tiny-latent", metadata={"help": "the latent model whose VAE and text encoder to use"})
    batch_size: int = field(default=32, metadata={"help": "rows per encoder call"})
    actors: int = field(default=1, metadata={"help": "encoder actors"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per encoder actor"})
    dtype: str = field(default="fp16", metadata={"help": "stored precision: fp16 (half the bytes) or fp32"})

    def __post_init__(self):
        if self.dtype not in ("fp16", "fp32"):
            raise ValueError(f"dtype must be fp16 or fp32, got {self.dtype!r}")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError("batch_size and actors must be at least 1")


def output_schema(controls: list[str]) -> pa.Schema:
    fields = [("example_id", pa.string()), ("target_latent", pa.binary()), ("prompt_states", pa.binary()),
              ("demo_latents", pa.list_(pa.binary())), ("demo_caption_states", pa.list_(pa.binary())),
              ("skipped", pa.string())]  # "" or why the row has no tensors (it trains on nothing)
    from ..schemas import ICL_V2_SCHEMA

    return pa.schema(fields + [(c, ICL_V2_SCHEMA.field(c).type) for c in controls])


class LatentEncoder:
    """Ray Data actor: ICL-V2 rows -> cached tensors, with the model's own checks and resizing."""

    def __init__(self, cfg: EncodeConfig):
        import torch

        from ..model.pipeline import load_pipeline
        from ..train.config import TrainConfig
        from ..train.prepare import Prepare

        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(cfg.checkpoint)
        if pipe.vae is None:
            raise ValueError(f"{cfg.checkpoint} is a pixel model: cached latents are for latent models")
        self.model = pipe.model.to(self.device).eval()
        self.dtype = np.float16 if cfg.dtype == "fp16" else np.float32
        size, max_len = self.model.config.image_size, self.model.config.max_text_len
        self.prepare = Prepare(TrainConfig(), pipe.tokenizer, size, max_len)  # training's decoding and tokenizing

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..train.data import as_tensors, pixels_to_float, to_bytes

        p = as_tensors(self.prepare(batch))
        n, target_ok = len(p["target_ok"]), p["target_ok"]
        ok = target_ok & p["demo_ok"].any(1)
        demo_ok = p["demo_ok"] & ok[:, None]
        images = torch.cat([p["target"][ok], p["demo_images"][demo_ok]])  # targets, then each row's demos in order
        ids = torch.cat([p["prompt_ids"][ok], p["demo_caption_ids"][demo_ok]])
        with torch.no_grad():
            latents = self.model.to_model_space(pixels_to_float(images).to(self.device)) if len(images) else []
            states = self.model.encode_text(ids.to(self.device)) if len(ids) else []
        out = {k: [None] * n for k in ("target_latent", "prompt_states", "demo_latents", "demo_caption_states")}
        out["skipped"] = ["" if ok[i] else ("broken_target" if not target_ok[i] else "no_readable_demo")
                          for i in range(n)]
        cursor = int(ok.sum())
        for j, i in enumerate(torch.nonzero(ok).flatten().tolist()):
            k = int(demo_ok[i].sum())
            out["target_latent"][i], out["prompt_states"][i] = to_bytes(latents[j], self.dtype), to_bytes(states[j], self.dtype)
            out["demo_latents"][i] = [to_bytes(t, self.dtype) for t in latents[cursor: cursor + k]]
            out["demo_caption_states"][i] = [to_bytes(t, self.dtype) for t in states[cursor: cursor + k]]
            cursor += k
        out.update({"example_id": batch["example_id"], "path": batch["path"]})
        out.update({c: batch[c] for c in CONTROL_COLUMNS.values() if c in batch})
        return out


def write_reference(cfg: EncodeConfig) -> dict:
    """null_prompt.safetensors and encoder.json: what training needs beside the rows."""
    import torch
    from safetensors.torch import save

    from ..model.pipeline import load_pipeline

    model = load_pipeline(cfg.checkpoint).model.eval()
    if model.vae is None:
        raise ValueError(f"{cfg.checkpoint} is a pixel model: cached latents are for latent models")
    with torch.no_grad():
        null = model.encode_text(model.null_prompt_ids(1))[0].float().contiguous()
        latent = model.to_model_space(torch.zeros(1, 3, model.config.image_size, model.config.image_size))[0]
    info = {"checkpoint": cfg.checkpoint, "dtype": cfg.dtype, "latent_shape": list(latent.shape),
            "text_states_shape": list(null.shape), "image_size": model.config.image_size}
    storage.write_bytes(storage.join(cfg.output, "null_prompt.safetensors"), save({"null_prompt": null}))
    storage.write_bytes(storage.join(cfg.output, "encoder.json"), json.dumps(info, indent=2).encode())
    return info


def run_encode(cfg: EncodeConfig, progress: bool = True) -> dict:
    from ray.data import ActorPoolStrategy
    from ..utils.progress import bar as progress_bar

    from ..utils.ray_utils import init_ray, read_parquet

    from ..model.loading import resolve_checkpoint

    cfg = replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))  # actors need not share our directory
    fs, files = storage.list_files(cfg.examples, ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet files in {cfg.examples}")
    name = lambda p: p.rsplit("/", 1)[-1]  # noqa: E731  (files are matched by name: the folder is flat)
    done = {name(p) for p in storage.list_files(cfg.output, ".parquet")[1]}
    todo = [p for p in files if name(p) not in done]
    t0, info = time.time(), write_reference(cfg)
    rows_of = {name(p): pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in todo}
    stats = {"files": len(files), "files_already_done": len(files) - len(todo), "rows": 0, "skipped": {}}
    if todo:
        init_ray()
        controls = [c for c in CONTROL_COLUMNS.values() if c in pq.read_schema(fs.open_input_file(todo[0])).names]
        schema = output_schema(controls)
        scheme = cfg.examples.split("://")[0] + "://" if storage.is_uri(cfg.examples) else ""
        ds = read_parquet([scheme + p for p in todo], include_paths=True).select_columns([
            "example_id", "demo_images", "demo_captions", "target_image", "target_prompt", *controls, "path"])
        ds = ds.map_batches(LatentEncoder, fn_constructor_args=(cfg,), batch_size=cfg.batch_size, batch_format="numpy",
                            compute=ActorPoolStrategy(size=cfg.actors), num_gpus=cfg.num_gpus or None)
        pending: dict[str, list] = {}
        bar = progress_bar(total=sum(rows_of.values()), desc="encode examples", unit="row", disable=not progress)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for path in set(batch.column("path").to_pylist()):
                key = name(path)
                pending.setdefault(key, []).append(batch.filter(pc.equal(batch.column("path"), path)).drop_columns(["path"]))
                if sum(t.num_rows for t in pending[key]) < rows_of[key]:
                    continue
                table = pa.concat_tables([t.select(schema.names).cast(schema) for t in pending.pop(key)])
                buf = io.BytesIO()  # the file is complete: written whole
                pq.write_table(table, buf)
                storage.write_bytes(storage.join(cfg.output, key), buf.getvalue())
                for reason in filter(None, table.column("skipped").to_pylist()):
                    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
                stats["rows"] += table.num_rows
            bar.update(batch.num_rows)
        bar.close()
    stats.update(info, seconds=round(time.time() - t0, 1), config=asdict(cfg))
    storage.write_bytes(storage.join(cfg.output, "stats.json"), json.dumps(stats, indent=2).encode())
    return stats
