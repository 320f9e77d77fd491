import io

import numpy as np
import pytest
import torch
from PIL import Image

from ray_suti import SuTIPipeline
from ray_suti.model.tokenizer import clip_tokenizer
from ray_suti.train.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from ray_suti.train.config import TrainConfig
from ray_suti.train.data import Collate
from ray_suti.train.prepare import columns, decode
from ray_suti.world.oracle import OracleConfig, oracle_example

from ..conftest import model_libraries_loaded_by


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_skips_broken_records_and_resizes():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 200
    out = decode(_png(img), 32)
    assert out.shape == (32, 32, 3) and out[0, 20:].min() == 200 and out[0, :12].max() == 0
    good = _png(img)
    for broken in (b"", b"<html>", good[:40], _png(np.zeros((1, 1, 3), np.uint8))):
        assert decode(broken, 32) is None


def test_a_prepare_pickles_small_and_unpickles_without_torch_or_transformers(tmp_path):
    """Ray Train's controller and Ray Data's coordinators unpickle the dataset plan that holds the
    ``Prepare`` before a row moves; it carries its tokenizer as the checkpoint's name."""
    import pickle

    from ray_suti.model.presets import get_preset
    from ray_suti.train.prepare import Prepare

    cfg = TrainConfig(max_demos=3)
    (tmp_path / "prepare.pkl").write_bytes(pickle.dumps(Prepare(cfg, "tiny-32", 32)))
    assert (tmp_path / "prepare.pkl").stat().st_size < 4096  # a pickled tokenizer was 2.5 MB
    assert model_libraries_loaded_by("import pickle; pickle.load(open(sys.argv[1], 'rb'))", str(tmp_path / "prepare.pkl")) == []
    rows = [oracle_example(OracleConfig(num_demos=3), i) for i in range(4)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    length = get_preset("tiny-32").max_text_len
    by_name = pickle.loads((tmp_path / "prepare.pkl").read_bytes())(batch)
    by_object = Prepare(cfg, clip_tokenizer(length), 32, length)(batch)
    assert by_name.keys() == by_object.keys()
    for key in by_name:
        np.testing.assert_array_equal(by_name[key], by_object[key])


def test_icl_batches_pick_1_to_k_demos_and_draw_dropouts():
    cfg = TrainConfig(max_demos=3, text_drop=0.5, demo_drop=0.5)
    rows = [oracle_example(OracleConfig(num_demos=3), i) for i in range(40)]
    rows[0]["demo_images"][1] = b"broken"
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = Collate(cfg, clip_tokenizer(32), 32, 32, seed=0)(batch)
    assert out["target"].shape == (40, 3, 32, 32) and out["demo_images"].shape == (40, 3, 3, 32, 32)
    counts = out["demo_valid"].sum(1)
    assert counts.min() >= 1 and counts.max() == 3 and (counts < 3).any()
    assert counts[0] <= 2  # the broken demo was dropped, the example kept
    padded = ~out["demo_valid"]
    assert (out["demo_images"][padded] == 0).all()
    assert 5 < out["drop_text"].sum() < 35 and 5 < out["drop_demos"].sum() < 35
    assert out["target"].min() >= -1 and out["target"].max() <= 1


def test_web_pairs_batches_drop_broken_images():
    cfg = TrainConfig(mode="pretrain")
    imgs = [_png(np.full((32, 32, 3), i * 20, np.uint8)) for i in range(5)] + [b"nope"]
    batch = {"image": np.array(imgs, dtype=object), "caption": np.array(["a toy"] * 5 + ["x"], dtype=object)}
    out = Collate(cfg, clip_tokenizer(32), 32, 32, seed=0)(batch)
    assert out["target"].shape == (5, 3, 32, 32) and out["prompt_ids"].shape == (5, 32)


def test_checkpoints_and_single_files_round_trip(tmp_path):
    pipe = SuTIPipeline.from_preset("tiny-32", seed=1)
    weights = trainable_state(pipe.model)
    ema = {k: v * 0.5 for k, v in weights.items() if v.is_floating_point()}
    save_checkpoint(str(tmp_path / "c"), weights, ema, {"step": 7})
    w2, e2, state = load_checkpoint(str(tmp_path / "c"))
    assert state["step"] == 7 and all(torch.equal(weights[k], w2[k]) for k in weights)
    assert all(torch.equal(ema[k], e2[k]) for k in ema)
    pipe.save_single_file(str(tmp_path / "m.safetensors"), metadata={"step": 7})
    again = SuTIPipeline.from_pretrained(str(tmp_path / "m.safetensors"))
    assert SuTIPipeline.single_file_metadata(str(tmp_path / "m.safetensors"))["step"] == "7"
    for k, v in pipe.model.state_dict().items():
        assert torch.allclose(v.float(), again.model.state_dict()[k], atol=1e-2 * (1 + v.abs().max().item()))


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="finetune")
    with pytest.raises(ValueError, match="zero_stage"):
        TrainConfig(zero_stage=4)


def test_a_single_file_of_the_same_mode_carries_its_step_on(tmp_path):
    from ray_suti.train.step import continued_step

    pipe = SuTIPipeline.from_preset("tiny-32")
    pipe.save_single_file(str(tmp_path / "suti.safetensors"), metadata={"step": 321, "mode": "suti"})
    pipe.save_single_file(str(tmp_path / "base.safetensors"), metadata={"step": 900, "mode": "pretrain"})
    assert continued_step(TrainConfig(init_from=str(tmp_path / "suti.safetensors"))) == 321
    assert continued_step(TrainConfig(init_from=str(tmp_path / "base.safetensors"))) == 0  # a new stage
    assert continued_step(TrainConfig(mode="pretrain", init_from=str(tmp_path / "base.safetensors"))) == 900
    assert continued_step(TrainConfig()) == 0


def test_high_noise_fraction_draws_that_share_of_timesteps_from_the_noisier_half(monkeypatch):
    from ray_suti.model import SuTIModel, get_preset

    model = SuTIModel(get_preset("tiny-32"))
    seen = []
    monkeypatch.setattr(model, "forward", lambda sample, t, text, demos=None, control_residuals=None: seen.append(t) or torch.zeros_like(sample))
    batch = {"target": torch.zeros(2000, 3, 32, 32), "prompt_ids": model.null_prompt_ids(2000)}
    monkeypatch.setattr(model, "encode_text", lambda ids: torch.zeros(ids.shape[0], 32, 64))
    for frac in (0.0, 0.5):
        seen.clear()
        model.loss(batch, model.noise_scheduler(), generator=torch.Generator().manual_seed(0), high_noise_frac=frac)
        share_high = float((seen[0] >= 500).float().mean())
        assert abs(share_high - (0.5 + frac / 2)) < 0.04, (frac, share_high)
        assert seen[0].min() >= 0 and seen[0].max() < 1000


def test_training_can_switch_a_checkpoint_to_cosine_attention(tmp_path):
    from ray_suti.train.step import start_pipeline

    pipe = SuTIPipeline.from_preset("tiny-32")
    pipe.save_single_file(str(tmp_path / "m.safetensors"), dtype=torch.float32)
    switched = start_pipeline(TrainConfig(init_from=str(tmp_path / "m.safetensors"), neighbour_cosine=True))
    assert switched.suti_config.neighbour_cosine
    before, after = pipe.model.state_dict(), switched.model.state_dict()
    assert {k for k in after if k not in before} and all(k.endswith("logit_scale") for k in after if k not in before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_local_stream_fills_batches_across_small_shards_and_sees_new_ones(tmp_path):
    import itertools

    from ray_suti.train.local import ParquetStream
    from ray_suti.world.oracle import write_oracle_shard

    oracle = OracleConfig(out=str(tmp_path), examples=15, examples_per_shard=5, image_size=32)
    for shard in range(2):
        write_oracle_shard(oracle, shard)
    cfg = TrainConfig(data=str(tmp_path), batch_size=8)
    stream = ParquetStream(cfg, Collate(cfg, clip_tokenizer(32), 32, 32, seed=0))
    batches = list(itertools.islice(iter(stream), 3))  # 5-row shards, 8-row batches: rows carry over
    assert [b["target"].shape[0] for b in batches] == [8, 8, 8]
    write_oracle_shard(oracle, 2)  # a generator adding shards while training runs
    assert len(stream.files()) == 3


def test_training_paths_become_absolute_for_workers_in_other_directories(tmp_path, monkeypatch):
    from ray_suti.train.trainer import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(TrainConfig(data="runs/oracle", init_from="checkpoints/m.safetensors",
                                          storage_path="s3://bucket/runs", export_file=""))
    assert cfg.data == str(tmp_path / "runs" / "oracle") and cfg.init_from == str(tmp_path / "checkpoints" / "m.safetensors")
    assert cfg.storage_path == "s3://bucket/runs" and cfg.export_file == ""


def test_training_adds_control_encoders_and_drops_each_control_at_random(tmp_path):
    import pyarrow.parquet as pq

    from ray_suti.train.data import Collate
    from ray_suti.train.step import start_pipeline, trainable_groups
    from ray_suti.world.oracle import OracleConfig, write_oracle_shard

    from ..conftest import REPO

    committed = str(REPO / "checkpoints" / "tiny-32.safetensors")
    cfg = TrainConfig(init_from=committed, controls=("box", "keypoints", "edges"), controls_only=True, control_drop=0.5)
    pipe, before = start_pipeline(cfg), start_pipeline(TrainConfig(init_from=committed)).model.state_dict()
    assert pipe.controls == ("box", "keypoints", "edges")
    after = pipe.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # every old weight carried over
    named, _ = trainable_groups(pipe.model, cfg)
    assert named and all(n.startswith("suti.control_encoders.") for n, _ in named)  # controls_only

    write_oracle_shard(OracleConfig(out=str(tmp_path), examples=64, examples_per_shard=64, target_jitter=0.08), 0)
    table = pq.read_table(tmp_path / "part-00000.parquet", columns=columns("suti", cfg.controls))
    batch = Collate(cfg, pipe.tokenizer, 32, 32, seed=0)({c: table.column(c).to_pylist() for c in table.column_names})
    for name in cfg.controls:
        present = batch[f"control_present_{name}"]
        assert 10 < int(present.sum()) < 54  # dropped about half the time, on its own
        assert batch[f"control_map_{name}"][~present].abs().sum() == 0
    loss = pipe.model.loss(batch, pipe.model.noise_scheduler(), generator=torch.Generator().manual_seed(0))
    loss.backward()  # the gradient reaches the zero-initialised outputs of every encoder
    assert all(pipe.suti.control_encoders.encoders[n].outs[0].weight.grad.abs().sum() > 0 for n in cfg.controls)


def test_bad_control_settings_fail_in_the_config():
    with pytest.raises(ValueError, match="controls must be among"):
        TrainConfig(controls=("mask",))
    with pytest.raises(ValueError, match="controls_only needs"):
        TrainConfig(controls_only=True)
    with pytest.raises(ValueError, match="suti mode"):
        TrainConfig(mode="pretrain", controls=("box",))
