"""Control signals from the world's ground truth, and the checks evaluation makes with them."""
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq

from ray_suti.world import Context, heldout_seeds, render
from ray_suti.world.controls import (box_iou, controls_of, foreground, keypoint_error, landmarks, outline,
                                     without_skill)
from ray_suti.world.oracle import OracleConfig, write_oracle_shard

SEED = heldout_seeds(1)[0]


def test_landmarks_turn_and_mirror_with_the_subject():
    up = landmarks(SEED, Context())
    assert up[0, 1] < 0.55 < render(SEED, Context(), 32)[1].nonzero()[0].max() / 32 + 0.1  # the top is above the middle
    assert up[1, 0] > 0.5  # the right-hand side is on the right
    flipped = landmarks(SEED, Context(rotation=180))
    assert flipped[0, 1] > 0.55 and flipped[1, 0] < 0.5
    assert landmarks(SEED, Context(mirror=True))[1, 0] < 0.5
    assert np.allclose(landmarks(SEED, Context(mirror=True))[0], up[0])  # mirroring keeps the top


def test_box_and_outline_come_from_the_subject_mask():
    ctx = Context(position="left", size="small", jitter=(0.05, 0.02, 0.1))
    image, mask = render(SEED, ctx, 32)
    c = controls_of(SEED, ctx, 32, mask)
    ys, xs = mask.nonzero()
    assert np.allclose(c["box"], [xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32, (ys.max() + 1) / 32])
    assert c["edges"].sum() > 0 and not (c["edges"].astype(bool) & ~mask).any()  # on the subject only
    assert outline(np.ones((4, 4), bool)).sum() == 12  # a filled square: its border


def test_evaluation_checks_pass_the_truth_and_fail_wrong_images():
    ctx = Context(scene="beach", position="left", size="small", colour="blue", rotation=90, jitter=(0.06, 0.0, 0.0))
    gt, mask = render(SEED, ctx, 32)
    c = controls_of(SEED, ctx, 32, mask)
    assert box_iou(foreground(gt, ctx), c["box"]) > 0.35
    moved = render(SEED, replace(ctx, position="right", jitter=(0.0, 0.0, 0.0)), 32)[0]
    assert box_iou(foreground(moved, ctx), c["box"]) < box_iou(foreground(gt, ctx), c["box"]) - 0.2
    assert keypoint_error(gt, SEED, ctx, c["keypoints"]) == 0.0
    assert keypoint_error(render(SEED, replace(ctx, rotation=270), 32)[0], SEED, ctx, c["keypoints"]) > 0.2
    assert without_skill(ctx, "stylize").style == "none" and without_skill(ctx, "view").rotation == 0


def test_oracle_examples_carry_their_controls(tmp_path):
    write_oracle_shard(OracleConfig(out=str(tmp_path), examples=4, examples_per_shard=4, target_jitter=0.08), 0)
    rows = pq.read_table(tmp_path / "part-00000.parquet").to_pylist()
    assert all(len(r["target_box"]) == 4 and len(r["target_keypoints"]) == 4 and r["target_edges"] for r in rows)
    assert all(0 <= v <= 1 for r in rows for v in r["target_box"] + r["target_keypoints"])
