"""`ray-suti evaluate retrieval` end to end: catalogue, distractor crawl, KB, three methods, report."""
import json

import pytest

from ray_suti.cli import main
from ray_suti.evaluate.retrieval import RetrievalEvalConfig


def test_evaluate_retrieval_writes_recall_psnr_and_a_contact_sheet(ray_local, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "eval"
    main(["evaluate", "retrieval", "--out", str(out), "--num-subjects", "4", "--distractor-pages", "30",
          "--steps", "2", "--chunk-size", "4", "--sheet-rows", "2"])
    assert "Goals: recall@k >= 0.9" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert summary["n"] == 4 and results["kb_rows"] > 100 + 4 * 4
    assert summary["retrieval"]["recall_at_k"] == 1.0 and summary["retrieval"]["name_recall_at_k"] == 1.0
    for case in results["cases"]:
        assert all(n["page"].endswith(case["name"].lower()) for n in case["neighbours"])
        assert set(case["metrics"]) == {"retrieval", "oracle", "text_only"}
    assert set(summary["goals"].values()) <= {True, False} and (out / "results.md").exists()
    assert Image.open(out / "contact_sheet.png").size[1] > 2 * 64


def test_more_neighbours_than_catalogue_photos_is_refused():
    with pytest.raises(ValueError, match="num_neighbours"):
        RetrievalEvalConfig(num_neighbours=5, photos_per_page=4)
