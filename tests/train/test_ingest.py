"""Ray Data prepares batches ahead of the trainers: what a worker draws from the tensors an actor pool
prepared (read with ``iter_torch_batches``) equals what it built from the raw rows itself, with the
same seed; broken images are dropped either way."""
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_suti.model.loading import image_size_of, tokenizer_of
from ray_suti.train.config import TrainConfig
from ray_suti.train.data import Collate
from ray_suti.train.trainer import prepared_ahead
from ray_suti.world.oracle import OracleConfig, write_oracle_shard


@pytest.mark.parametrize("mode,controls", [("suti", ("box", "keypoints")), ("pretrain", ())])
def test_batches_prepared_by_ray_data_equal_those_built_in_the_worker(tmp_path, ray_local, mode, controls):
    import ray.data

    (tmp_path / "raw").mkdir()
    write_oracle_shard(OracleConfig(out=str(tmp_path / "raw"), examples=12, examples_per_shard=12), 0)
    table = pq.read_table(tmp_path / "raw" / "part-00000.parquet")
    rows = {k: table.column(k).to_pylist() for k in table.column_names}
    rows["demo_images"][1] = [b"broken", *rows["demo_images"][1][1:]]
    rows["target_image"][2] = b"<html>"
    rows["target_box"][3] = None  # no box for this one
    if mode == "pretrain":
        rows = {"image": rows["target_image"], "caption": rows["target_prompt"]}
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "data" / "part-00000.parquet")
    cfg = TrainConfig(mode=mode, text_drop=0.3, demo_drop=0.3, controls=controls, control_drop=0.3)
    size, tokenizer = image_size_of(cfg.preset), tokenizer_of(cfg.preset)

    options = ray.data.DataContext.get_current().execution_options
    ordered, options.preserve_order = options.preserve_order, True  # rows in file order, as read in the worker
    try:
        dataset = prepared_ahead(ray.data.read_parquet(str(tmp_path / "data")), replace(cfg, batch_size=5))
        [prepared] = list(dataset.iter_torch_batches(batch_size=12))
    finally:
        options.preserve_order = ordered

    in_worker = Collate(cfg, tokenizer, size, tokenizer.model_max_length, seed=3)
    ahead = Collate(cfg, tokenizer, size, tokenizer.model_max_length, seed=3)
    want = in_worker({k: np.array(v + [None], dtype=object)[:-1] for k, v in rows.items()})
    got = ahead.draw(prepared)
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert got["target"].shape[0] == 11  # the broken target's row is gone
    if mode == "suti":
        assert got["demo_valid"][1].sum() <= 2  # the broken demo is never drawn
        assert got["demo_caption_ids"].dtype == torch.long and got["demo_images"].shape[1] == cfg.max_demos
        assert not got["control_present_box"][2]  # row 3 (index 2 once row 2 is gone) has no box
        assert 0 < got["control_present_keypoints"].sum() < 11  # dropped on their own
