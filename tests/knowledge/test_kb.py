"""A Re-Imagen knowledge base built by the real index job (Ray Data + LanceDB) from a synthetic
crawl, searched, and used as the demos of a real pipeline."""
import glob

import numpy as np
import pandas as pd
import pytest
import torch

from ray_suti.knowledge import IndexConfig, KnowledgeBase, run_index
from ray_suti.knowledge.index import cluster_entries
from ray_suti.model import SuTIInputError
from ray_suti.model.pipeline import load_pipeline

from ..conftest import REPO
from .conftest import good_records


def test_indexing_is_incremental_and_keeps_every_good_pair(crawl, kb_path, kb_builds):
    shards = sorted(glob.glob(str(crawl / "*.parquet")))
    first, both, again = kb_builds[1]  # the first shard, then the folder (only the new shard is embedded), then again
    assert first["rows"] == len(good_records(shards[:1])) and first["files"] == shards[:1]
    assert both["rows"] == len(good_records(shards)) and both["files"] == shards
    assert again["rows"] == both["rows"]  # nothing new
    entries = KnowledgeBase(kb_path).table.to_arrow()
    assert len(set(entries["id"].to_pylist())) == entries.num_rows  # no pair twice
    norms = np.linalg.norm(np.stack(entries["image_emb"].to_numpy(zero_copy_only=False)), axis=1)
    assert np.allclose(norms, 1, atol=1e-4)
    with pytest.raises(ValueError, match="same CLIP"):
        run_index(IndexConfig(input=str(crawl), output=kb_path, clip_pretrained=""))


def test_a_caption_finds_its_page_and_neighbours_stay_on_one_page(crawl, kb_path):
    kb = KnowledgeBase(kb_path)
    records = good_records(sorted(glob.glob(str(crawl / "*.parquet"))))
    found = 0
    for _, row in records[records["caption"].str.len() > 25].head(10).iterrows():
        neighbours = kb.search(row["caption"], k=3)
        assert 1 <= len(neighbours) <= 3 and len({n.page for n in neighbours}) == 1
        assert [n.score for n in neighbours] == sorted((n.score for n in neighbours), reverse=True)
        found += neighbours[0].caption == row["caption"]
    assert found >= 8  # the exact caption wins (words + caption embedding), but for identical captions elsewhere


def test_a_made_up_name_finds_its_catalogue_page_among_context_words(catalogue_kb):
    """The prompt's context words ("yellow", "lying on its side") match other pages' captions more
    often than the one name does; the name term keeps the named subject's page first."""
    from ray_suti.world import Context
    from ray_suti.world.catalogue import named

    path, entries = catalogue_kb
    prompts = [(Context.from_json(e["target"]).prompt(named(e)), e) for e in entries]
    kb, without_names = KnowledgeBase(path), KnowledgeBase(path, weights=(0.5, 0.5, 1.0, 0.0))
    for prompt, entry in prompts:
        neighbours = kb.search(prompt, k=3)
        assert [n.page for n in neighbours] == [entry["page_url"]] * 3, prompt
        assert {n.id for n in neighbours} <= set(entry["keys"])
    assert sum(without_names.search(p, 3)[0].page != e["page_url"] for p, e in prompts) >= 1


def test_the_pipeline_draws_with_the_neighbours_as_demos(kb_path):
    pipe = load_pipeline(str(REPO / "checkpoints" / "tiny-32.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    kb = KnowledgeBase(kb_path)
    prompt = "a toy on the beach"
    out = pipe(prompt, knowledge_base=kb, num_neighbours=2, num_inference_steps=4, output_type="np",
               generator=torch.Generator().manual_seed(0))
    [used] = out.neighbours
    assert len(used) == 2 and [n.id for n in used] == [n.id for n in kb.search(prompt, 2)]
    same = pipe(prompt, [n.image for n in used], subject_captions=[n.caption for n in used], num_inference_steps=4,
                output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.array_equal(out.images, same.images)
    with pytest.raises(SuTIInputError, match="knowledge_base"):
        pipe(prompt, [used[0].image], knowledge_base=kb)
    with pytest.raises(SuTIInputError, match="num_neighbours"):
        pipe(prompt, knowledge_base=kb, num_neighbours=99)


def test_a_missing_knowledge_base_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="ray-suti index"):
        KnowledgeBase(str(tmp_path))


def test_clusters_become_one_page_each():
    batch = pd.DataFrame({"cluster_id": ["c1", "c2"], "kept": [True, False], "keys": [["a", "b"], ["c"]],
                          "captions": [["x", "y"], ["z"]], "images": [[b"1", b"2"], [b"3"]]})
    rows = cluster_entries(batch)
    assert rows[["key", "page_key", "caption"]].values.tolist() == [["c1/a", "c1", "x"], ["c1/b", "c1", "y"]]


def test_generate_command_retrieves_and_says_which_neighbours(kb_path, tmp_path, capsys):
    import json

    from ray_suti.cli import main

    out = tmp_path / "toy.png"
    main(["generate", "--checkpoint", "tiny-32", "--kb", kb_path, "--prompt", "a toy in the snow", "--out", str(out),
          "--steps", "3", "--seed", "0", "--neighbours", "2", "--json"])
    answer = json.loads(capsys.readouterr().out)
    [used] = answer["neighbours"]
    assert out.exists() and len(used) == 2 and len({n["page"] for n in used}) == 1
    assert {"id", "caption", "score"} <= set(used[0])
    with pytest.raises(SystemExit, match="--subject photos or a --kb"):
        main(["generate", "--checkpoint", "tiny-32", "--prompt", "x", "--out", str(out)])
