"""Parquet contracts between stages (docs/design.md, "Data contracts")."""
import pyarrow as pa

# Stage 3 -> 4: one in-context example per row. Images are encoded PNG/JPEG bytes.
ICL_V2_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("cluster_id", pa.string()),
    ("demo_images", pa.list_(pa.binary())),
    ("demo_captions", pa.list_(pa.string())),
    ("target_image", pa.binary()),
    ("target_prompt", pa.string()),
    ("skills", pa.list_(pa.string())),
    ("clip_i", pa.float32()),  # filter scores; null where no filter ran (the oracle)
    ("clip_t", pa.float32()),
    ("expert", pa.string()),  # who drew the target: an expert id, or "oracle-renderer"
    # Spatial controls of the target (model/controls.py), null where unknown: the subject's box
    # (x0, y0, x1, y1), its keypoints (top x, y, right-hand side x, y), both as fractions of the
    # image, and its outline (PNG, white lines on black).
    ("target_box", pa.list_(pa.float32())),
    ("target_keypoints", pa.list_(pa.float32())),
    ("target_edges", pa.binary()),
])

# Stage 1 -> 3: one row per page group. Dropped groups stay (with their reason) for auditing;
# consumers read rows where ``kept`` is true.
ICL_CLUSTER_SCHEMA = pa.schema([
    ("cluster_id", pa.string()),
    ("page_url", pa.string()),  # normalised
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),  # "" when kept
    ("keys", pa.list_(pa.string())),  # web-pair keys of the kept images (provenance)
    ("images", pa.list_(pa.binary())),
    ("captions", pa.list_(pa.string())),
    ("embeddings", pa.list_(pa.list_(pa.float32()))),
    ("n_records", pa.int32()),  # records of the page in the crawl, broken ones included
    ("n_images", pa.int32()),  # images kept in the cluster
    ("duplicates_removed", pa.int32()),
    ("mean_sim", pa.float32()),  # pairwise cosine of the kept images' CLIP embeddings
    ("min_sim", pa.float32()),
    ("max_sim", pa.float32()),
    ("record_reasons", pa.string()),  # JSON {reason: count} of the page's skipped records
])
