"""Evaluation of a checkpoint on held-out subjects: metrics tables (JSON + Markdown) and contact sheets."""
from .synthetic import COPY_MARGIN_DB, COPY_MIN_DB, SyntheticEvalConfig, evaluate_synthetic, is_copy, make_cases, psnr

__all__ = ["COPY_MARGIN_DB", "COPY_MIN_DB", "SyntheticEvalConfig", "evaluate_synthetic", "is_copy", "make_cases",
           "psnr"]
