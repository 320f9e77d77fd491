"""Ray Data decodes ahead of the trainers: the batches a worker builds from decoded rows are the
batches it built from image bytes, with the same seed; broken images are dropped either way."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ray_suti.model.loading import image_size_of
from ray_suti.model.tokenizer import clip_tokenizer
from ray_suti.train.config import TrainConfig
from ray_suti.train.data import Collate, decode_images
from ray_suti.world.oracle import OracleConfig, write_oracle_shard


@pytest.mark.parametrize("mode", ["suti", "pretrain"])
def test_decoded_rows_give_the_same_batches(tmp_path, mode):
    write_oracle_shard(OracleConfig(out=str(tmp_path), examples=12, examples_per_shard=12), 0)
    table = pq.read_table(tmp_path / "part-00000.parquet")
    rows = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    rows["demo_images"][1] = [b"broken", *rows["demo_images"][1][1:]]
    rows["target_image"][2] = b"<html>"
    if mode == "pretrain":
        rows = {"image": rows["target_image"], "caption": rows["target_prompt"]}
    cfg = TrainConfig(mode=mode, text_drop=0.3, demo_drop=0.3)
    size = image_size_of(cfg.preset)
    in_worker = Collate(cfg, clip_tokenizer(32), size, 32, seed=3)(rows)
    ahead = Collate(cfg, clip_tokenizer(32), size, 32, seed=3)(decode_images(rows, size))
    assert in_worker.keys() == ahead.keys()
    for k in in_worker:
        assert torch.equal(in_worker[k], ahead[k]), k
    assert in_worker["target"].shape[0] == 11  # the broken target's row is gone
    if mode == "suti":
        assert in_worker["demo_valid"][1].sum() <= 2  # the broken demo is never drawn
