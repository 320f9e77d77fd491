"""DreamBench evaluation: the folder format, the scorers, and the job end to end on the real sample."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_suti.evaluate.dreambench import (METHODS, DreamBenchConfig, parse_prompts_and_classes, read_dreambench,
                                          subject_prompts)
from ray_suti.evaluate.scorers import ScorerConfig, Scorers
from ray_suti.world import Context, render

from ..conftest import REPO


def test_the_benchmark_table_and_both_prompt_lists_parse(dreambench_dir):
    classes, prompts = parse_prompts_and_classes((dreambench_dir / "prompts_and_classes.txt").read_text())
    assert len(classes) == 30 and classes["dog2"] == "dog" and classes["bear_plushie"] == "stuffed animal"
    assert len(prompts["object"]) == len(prompts["live"]) == 25
    subjects, templates = read_dreambench(str(dreambench_dir))
    assert [s.name for s in subjects] == ["backpack", "can", "clock", "dog2"]  # the sample's 4 of 30
    dog, can = subjects[3], subjects[1]
    assert dog.live and not can.live and len(dog.photos) >= 4
    assert subject_prompts(dog, templates, 25)[10] == "a dog wearing a red hat"  # live subjects: outfits
    assert subject_prompts(can, templates, 25)[:2] == ["a can in the jungle", "a can in the snow"]
    assert "a cube shaped can" in subject_prompts(can, templates, 25)


def full_layout(tmp_path, dreambench_dir) -> Path:
    """A folder in the full release's layout: the table, and .png subject folders named in it."""
    root = tmp_path / "dreambench"
    root.mkdir()
    shutil.copy(dreambench_dir / "prompts_and_classes.txt", root)
    for name, seed in (("teapot", 3), ("cat2", 4)):
        (root / name).mkdir()
        for i in range(2):
            Image.fromarray(render(seed, Context(scene=("studio", "beach")[i]), 32)[0]).save(root / name / f"{i}.png")
    return root


def test_any_folder_of_the_layout_reads_and_bad_folders_fail_clearly(tmp_path, dreambench_dir):
    root = full_layout(tmp_path, dreambench_dir)
    subjects, _ = read_dreambench(str(root))
    assert [(s.name, s.live, len(s.photos)) for s in subjects] == [("cat2", True, 2), ("teapot", False, 2)]
    with pytest.raises(ValueError, match="not in"):
        read_dreambench(str(root), ("teapot", "unicorn"))
    with pytest.raises(FileNotFoundError, match="no photo folder"):
        read_dreambench(str(root), ("vase",))
    (root / "vase").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no photos"):
        read_dreambench(str(root))
    with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt"):
        read_dreambench(str(tmp_path))
    with pytest.raises(ValueError, match="unknown methods"):
        DreamBenchConfig(methods=("suti", "magic"))


def test_scores_are_cosines_and_a_copy_is_not_scored_against_itself():
    scorers = Scorers(ScorerConfig(clip_pretrained=str(REPO / "checkpoints" / "tiny-clip.safetensors")))
    photos = [Image.fromarray(render(seed, Context(scene="grass"), 32)[0]) for seed in (1, 1, 2)]
    refs = scorers.references(photos[:2])
    same = scorers.score(photos[:1], ["a toy"], refs)
    other = scorers.score(photos[2:], ["a toy"], refs)
    assert same["clip_i"] > other["clip_i"] and same["dino"] > other["dino"]
    alone = scorers.score(photos[:1], ["a toy"], scorers.references(photos[:1]))
    assert alone["clip_i"] == pytest.approx(1, abs=1e-4) and alone["dino"] == pytest.approx(1, abs=1e-4)
    both = scorers.references([photos[0], photos[2]])
    without_itself = scorers.score(photos[:1], ["a toy"], both, exclude=[0])  # only the other photo counts
    against_other = scorers.score(photos[:1], ["a toy"], scorers.references(photos[2:]))
    assert without_itself["dino"] == pytest.approx(against_other["dino"], abs=1e-5)
    assert without_itself["dino"] < 0.999
    assert -1 <= same["clip_t"] <= 1


@pytest.mark.slow
def test_the_job_scores_every_method_on_real_photos(ray_local, dreambench_dir, tmp_path, capsys):
    from ray_suti.cli import main

    out = tmp_path / "eval"  # checkpoint and results as URIs: object storage, no shared file system
    assert main(["evaluate", "dreambench", "--checkpoint", (REPO / "checkpoints" / "tiny-32.safetensors").as_uri(),
                 "--data", str(dreambench_dir), "--out", out.as_uri(), "--subjects", "can", "dog2", "--num-prompts", "2",
                 "--images-per-prompt", "2", "--dreambooth-steps", "5", "--steps", "5",
                 "--clip-pretrained", str(REPO / "checkpoints" / "tiny-clip.safetensors")]) == 0
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == set(METHODS) and results["subjects"] == ["can", "dog2"] and results["dino_is_random"]
    for scores in methods.values():
        assert {"dino", "clip_i", "clip_t", "seconds_per_subject"} <= set(scores)
    assert all(results["per_subject"][s][m]["images"] == 4 for s in ("can", "dog2") for m in METHODS)
    # Real photos of the subject beat any drawing of it; fine-tuning costs more time than encoding.
    assert methods["copy_demo"]["clip_i"] > max(methods[m]["clip_i"] for m in ("suti", "text_only", "dreambooth"))
    assert methods["copy_demo"]["seconds_per_subject"] == 0
    assert methods["dreambooth"]["seconds_per_subject"] > methods["suti"]["seconds_per_subject"]
    assert "| suti |" in (out / "results.md").read_text() and "| suti |" in capsys.readouterr().out
    sheet = Image.open(out / "contact_sheets" / "dog2.png")
    assert sheet.size[1] == 14 + 2 * 66  # header + one row per prompt
    assert np.asarray(Image.open(out / "quality_vs_seconds.png")).std() > 0
