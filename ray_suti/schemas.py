"""Parquet contracts between stages (DESIGN.md, "Data contracts")."""
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
])
