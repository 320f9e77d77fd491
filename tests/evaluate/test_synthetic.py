import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_suti.config import from_args
from ray_suti.evaluate import SyntheticEvalConfig, evaluate_synthetic, is_copy, make_cases, psnr
from ray_suti.evaluate.synthetic import background_mask
from ray_suti.evaluate.cli import add_cli
from ray_suti.world import Subject, heldout_seeds, render

SMALL = dict(checkpoint="tiny-32", num_subjects=4, chunk_size=2, steps=2)  # untrained, 2 Ray tasks
METHODS = ("suti", "text_only", "copy_demo")


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return SyntheticEvalConfig(out=str(out), **SMALL), evaluate_synthetic(SyntheticEvalConfig(out=out.as_uri(), **SMALL))


def test_writes_results_for_every_method(run):
    cfg, results = run
    out = Path(cfg.out)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))  # written to the URI it was given
    assert saved["config"]["num_subjects"] == 4 and saved["config"]["checkpoint"] == "tiny-32"
    for method in METHODS:
        summary = saved["methods"][method]
        for key in ("subject_psnr", "context_psnr", "background_psnr", "copy_rate"):
            assert isinstance(summary[key], float)
        assert summary["n"] == 4
        assert set(summary["per_skill"]) == {"recontext", "stylize", "recolor", "view", "accessorize", "composition"}
    assert set(saved["suti_minus_text_only_db"]) == {"subject", "context", "background"}
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS) and "| composition |" in md
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] == 14 + 4 * (64 + 2)  # header + one row per case (sheet_rows 12 > 4 cases)


def test_copy_rate_is_calibrated_on_the_run(run):
    methods = run[1]["methods"]
    assert methods["copy_demo"]["copy_rate"] == 1.0
    assert methods["text_only"]["copy_rate"] == 0.0


def _case_images(index: int, size: int = 32):
    case = make_cases(SyntheticEvalConfig(num_subjects=index + 1))[index]
    demos = [render(case.subject_seed, c, size)[0] for c in case.demos]
    return demos, render(case.subject_seed, case.target, size)[0]


def _box_blur(img: np.ndarray, k: int = 7) -> np.ndarray:
    p = np.pad(img.astype(np.float64), ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return np.round(sum(p[i:i + h, j:j + w] for i in range(k) for j in range(k)) / k**2).astype(np.uint8)


@pytest.mark.parametrize("index", range(6))
def test_is_copy_flags_copies_but_not_blur_or_noise(index):
    demos, gt = _case_images(index)
    rng = np.random.default_rng(index)
    assert not is_copy(_box_blur(gt), demos, gt)
    assert not is_copy(rng.integers(0, 256, gt.shape, dtype=np.uint8), demos, gt)  # far from everything
    assert not is_copy(gt, demos, gt)
    assert is_copy(demos[0], demos, gt) and is_copy(demos[-1], demos, gt)
    noisy = np.clip(demos[1] + rng.normal(0, 3, gt.shape), 0, 255).round().astype(np.uint8)
    assert is_copy(noisy, demos, gt)


def test_psnr():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a) == 100.0
    assert psnr(a, a + 10) == pytest.approx(20 * np.log10(255 / 10))
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    b = a.copy()
    b[~mask] += 10  # differs only outside the mask
    assert psnr(a, b, mask) == 100.0
    assert psnr(a, b, ~mask) == pytest.approx(20 * np.log10(255 / 10))


def test_background_leaves_out_the_box_around_the_subject():
    mask = np.zeros((32, 32), bool)
    mask[10:14, 20:22] = True
    mask[13, 25] = True  # an L-shaped subject: its box is rows 10-13, columns 20-25
    background = background_mask(mask)  # the box grown by 32 // 16 = 2 px
    assert not background[8:16, 18:28].any() and background.sum() == 32 * 32 - 8 * 10
    gt = np.full((32, 32, 3), 100, np.uint8)
    spill = gt.copy()
    spill[10, 24] = 200  # a wrong silhouette inside the subject's box: context sees it, background not
    assert psnr(spill, gt, ~mask) < 100 and psnr(spill, gt, background) == 100.0
    assert background_mask(np.zeros((32, 32), bool)).all()  # no subject in view: all background


def _cli_config(*flags: str) -> SyntheticEvalConfig:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "synthetic", "--num-subjects", "20", *flags])
    assert callable(args.func)
    return from_args(SyntheticEvalConfig, args)


def test_seed_flag_changes_contexts_not_subjects():
    a, again, other = (make_cases(_cli_config(*f)) for f in ((), ("--seed", "0"), ("--seed", "1")))
    assert a == again
    assert [c.subject_seed for c in a] == [c.subject_seed for c in other] == heldout_seeds(20)
    assert [(c.demos, c.target) for c in a] != [(c.demos, c.target) for c in other]


@pytest.mark.parametrize("num_demos", [3, 5])
def test_targets_never_repeat_a_demo_scene(num_demos):
    for seed in (0, 1):
        for case in make_cases(SyntheticEvalConfig(num_subjects=200, seed=seed, num_demos=num_demos)):
            assert case.target.scene not in {d.scene for d in case.demos}
            assert case.target.on_grid() not in {d.on_grid() for d in case.demos}
            assert all(d.skills == ["recontext"] for d in case.demos)  # ordinary photos only
            word = Subject.from_seed(case.subject_seed).class_word
            assert case.prompt == case.target.prompt(word) and case.captions[0] == case.demos[0].prompt(word)


def test_bad_checkpoint_or_scheduler_fails_before_any_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        evaluate_synthetic(SyntheticEvalConfig(checkpoint=str(tmp_path), out=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="unknown scheduler"):
        evaluate_synthetic(SyntheticEvalConfig(scheduler="euler-magic", out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
