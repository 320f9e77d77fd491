"""Stage 3b: cached latents and text states give the same loss as encoding on the fly; the encode
job writes whole files, resumes, and training runs from its output without either encoder."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ray_suti import SuTIPipeline
from ray_suti.encode.job import EncodeConfig, LatentEncoder, run_encode, write_reference
from ray_suti.train.config import TrainConfig
from ray_suti.train.step import make_collate
from ray_suti.world.oracle import OracleConfig, write_oracle_shard

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oracle")
    cfg = OracleConfig(out=str(folder), examples=24, examples_per_shard=12, image_size=64)
    for shard in range(2):
        write_oracle_shard(cfg, shard)
    return folder


def _rows(path, names):
    table = pq.read_table(path)
    return {k: np.array(table.column(k).to_pylist(), dtype=object) for k in names}


def test_loss_on_cached_inputs_equals_loss_on_the_fly(examples, tmp_path):
    enc = EncodeConfig(examples=str(examples), output=str(tmp_path), checkpoint="tiny-latent", dtype="fp32")
    write_reference(enc)
    raw = _rows(examples / "part-00000.parquet", ["example_id", "demo_images", "demo_captions", "target_image",
                                                  "target_prompt"])
    raw["demo_images"][0] = list(raw["demo_images"][0][:2]) + [b"broken"]  # a demo that does not decode
    cached = LatentEncoder(enc)({**raw, "path": np.array(["x"] * 12, dtype=object)})
    pipe = SuTIPipeline.from_preset("tiny-latent")
    # demo dropout off, text dropout high: both kinds of rows, and every demo encoded
    cfg = dict(mode="suti", text_drop=0.5, demo_drop=0.0, max_demos=3)
    on_the_fly = make_collate(TrainConfig(**cfg), pipe, seed=5)(raw)
    from_cache = make_collate(TrainConfig(**cfg, latents=str(tmp_path)), pipe, seed=5)(cached)
    assert "target" not in from_cache and from_cache["target_latents"].shape == (12, 4, 16, 16)
    assert torch.equal(on_the_fly["demo_valid"], from_cache["demo_valid"]) and 0 < on_the_fly["drop_text"].sum() < 12
    model, noise = pipe.model.eval(), pipe.model.noise_scheduler()
    with torch.no_grad():
        losses = [float(model.loss(b, noise, generator=torch.Generator().manual_seed(0), noise_repeats=2))
                  for b in (on_the_fly, from_cache)]
    assert abs(losses[0] - losses[1]) <= 1e-5, losses
    assert losses[0] > 0


@pytest.mark.slow
def test_encode_job_resumes_and_both_trainers_run_without_the_encoders(examples, tmp_path, ray_local, monkeypatch,
                                                                       capsys):
    """Input and output as URIs (file:// goes through the same calls as s3://)."""
    from ray_suti.train.trainer import run_training

    out = tmp_path / "latents"
    enc = EncodeConfig(examples=examples.as_uri(), output=out.as_uri(), checkpoint="tiny-latent", batch_size=8)
    stats = run_encode(enc, progress=False)
    assert stats["rows"] == 24 and stats["files_already_done"] == 0
    assert sorted(os.listdir(out)) == ["encoder.json", "null_prompt.safetensors", "part-00000.parquet",
                                       "part-00001.parquet", "stats.json"]
    first = pq.read_table(out / "part-00000.parquet")
    assert first.num_rows == 12 and first.column("skipped").to_pylist() == [""] * 12
    os.remove(out / "part-00001.parquet")  # as if killed before that file was written
    again = run_encode(enc, progress=False)
    assert again["files_already_done"] == 1 and again["rows"] == 12
    assert pq.read_table(out / "part-00000.parquet").equals(first)

    # the Ray Train + DeepSpeed runner reads the cache at its URI
    cfg = TrainConfig(latents=out.as_uri(), preset="tiny-latent", steps=2, batch_size=4, noise_repeats=1, report_every=1,
                      checkpoint_every=2, probe_every=1000, storage_path=str(tmp_path / "ray-runs"), name="cached")
    metrics = run_training(cfg)["metrics"]
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])

    # the one-process runner trains from the cache with the encoders refusing to run
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from ray_suti.train import local

    def refuse(*a, **k):
        raise AssertionError("an encoder ran")

    export = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(AutoencoderKL, "encode", refuse)
        m.setattr(CLIPTextModel, "forward", refuse)
        assert local.main(["--latents", str(out), "--preset", "tiny-latent", "--steps", "3", "--batch-size", "4",
                           "--probe-every", "0", "--loader-workers", "0", "--storage-path", str(tmp_path / "runs"),
                           "--export", str(export)]) == 0
    steps = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"step"')]
    assert steps[-1]["step"] == 3 and np.isfinite(steps[-1]["loss"])
    pipe = SuTIPipeline.from_pretrained(str(export))  # and the trained latent model samples
    photos = [pq.read_table(examples / "part-00000.parquet").column("demo_images")[0].as_py()[0]]
    image = pipe("a toy on the beach", photos, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_cache_of_another_model_is_refused(tmp_path):
    (tmp_path / "encoder.json").write_text(json.dumps({"checkpoint": "sd15", "latent_shape": [4, 64, 64],
                                                       "text_states_shape": [77, 768]}))
    with pytest.raises(ValueError, match="encoded for another model"):
        make_collate(TrainConfig(latents=str(tmp_path)), SuTIPipeline.from_preset("tiny-latent"), seed=0)
