"""`ray-suti evaluate controls`: every control subset scored against exact renders, as Ray tasks."""
import json

import pytest
import torch
from PIL import Image

from ray_suti.evaluate.controls import ControlsEvalConfig, evaluate_controls
from ray_suti.model.presets import get_preset

from ..model.test_controls import controlled_pipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "controls.safetensors"
    controlled_pipe(trained=True).save_single_file(str(path), dtype=torch.float32)
    return str(path)


def test_scores_each_control_subset_and_composed_pairs(ray_local, checkpoint, tmp_path):
    from ray_suti.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "controls", "--checkpoint", checkpoint, "--out", out.as_uri(), "--num-subjects", "4",
                 "--chunk-size", "2", "--steps", "2", "--subsets", "none", "box", "all", "--skill-prob", "0.9"]) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"none", "box", "all", "ground_truth"} and len(results["per_case"]) == 4
    for name in ("none", "box", "all"):
        assert 0 <= metrics[name]["box_iou"] <= 1 and 0 <= metrics[name]["keypoint_error"] <= 1.5
        assert metrics[name]["composition_success"]  # skill_prob 0.9: every target composes skills
    assert metrics["ground_truth"]["keypoint_error"] == 0 and metrics["ground_truth"]["box_iou"] > 0.3
    assert set(results["psnr_cost_of_controls_db"]) == {"box", "all"}
    assert "| all |" in (out / "results.md").read_text()
    assert Image.open(out / "contact_sheet.png").size[0] == 5 * 66  # gt, requested, 3 subsets


def test_a_checkpoint_without_the_controls_fails_before_any_task(tmp_path):
    assert get_preset("tiny-32").controls == ()
    with pytest.raises(ValueError, match="not trained with controls"):
        evaluate_controls(ControlsEvalConfig(checkpoint="tiny-32", out=str(tmp_path), subsets=("none", "box")))
    with pytest.raises(ValueError, match="unknown control subsets"):
        ControlsEvalConfig(subsets=("mask",))
