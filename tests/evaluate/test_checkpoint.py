"""The committed checkpoint draws held-out subjects better with their demos than without."""
import json

import pytest

from ray_suti.evaluate.synthetic import SyntheticEvalConfig, evaluate_synthetic

from ..conftest import REPO

pytestmark = pytest.mark.slow
CHECKPOINT = REPO / "checkpoints" / "tiny-32.safetensors"


def test_committed_checkpoint_uses_demos_without_copying(tmp_path, ray_local):
    cfg = SyntheticEvalConfig(checkpoint=str(CHECKPOINT), out=str(tmp_path), num_subjects=24, steps=10,
                              chunk_size=12, seed=3)
    results = evaluate_synthetic(cfg)
    suti, text_only, copy = (results["methods"][m] for m in ("suti", "text_only", "copy_demo"))
    assert suti["subject_psnr"] > text_only["subject_psnr"] + 3.0  # the demos carry the subject (issue 4's bar)
    # and the prompt the context: the demos' scenes must not leak in (SuTI's context may be better)
    assert suti["context_psnr"] > text_only["context_psnr"] - 1.0
    assert suti["background_psnr"] > text_only["background_psnr"] - 1.0
    assert suti["copy_rate"] <= 0.1 and text_only["copy_rate"] == 0.0 and copy["copy_rate"] == 1.0
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["suti"]["n"] == 24
