"""How well the cluster filter did, scored against the synthetic world's hidden truth table."""
from __future__ import annotations

import pyarrow.parquet as pq


BAR = {"junk_dropped": 0.95, "coherent_kept": 0.90, "near_dups_removed": 0.95}  # issue 5's bar


def filter_quality(clusters_dir: str, truth_dir: str, min_cluster: int) -> dict:
    """Scores a build's written clusters against the world's truth table (see ``score_filter``)."""
    return score_filter(pq.read_table(truth_dir).to_pylist(),
                        pq.read_table(clusters_dir, columns=["kept", "keys"]).to_pylist(), min_cluster)


def score_filter(truth: list[dict], rows: list[dict], min_cluster: int) -> dict:
    """Junk pages dropped (recall), coherent subject pages kept (a page counts as coherent when it has
    at least ``min_cluster`` distinct, unbroken photos), near-duplicate records removed."""
    kept_keys = {k for r in rows if r["kept"] for k in r["keys"]}
    pages: dict = {}
    for t in truth:
        pages.setdefault(t["page_index"], []).append(t)
    junk = [p for p in pages.values() if p[0]["page_kind"] == "junk"]
    coherent = [p for p in pages.values() if p[0]["page_kind"] == "subject"
                and sum(not t["is_broken"] and not t["is_dup"] for t in p) >= min_cluster]
    dups = [t for t in truth if t["is_dup"] and not t["is_broken"]]

    def kept(page):
        return any(t["key"] in kept_keys for t in page)

    return {
        "junk_dropped": sum(not kept(p) for p in junk) / max(1, len(junk)),
        "coherent_kept": sum(kept(p) for p in coherent) / max(1, len(coherent)),
        "near_dups_removed": sum(t["key"] not in kept_keys for t in dups) / max(1, len(dups)),
        "n": {"junk_pages": len(junk), "coherent_pages": len(coherent), "dup_records": len(dups)},
    }


def margin(quality: dict) -> float:
    """The smallest lead over the bar (negative: the bar is missed)."""
    return min(quality[k] - v for k, v in BAR.items())
