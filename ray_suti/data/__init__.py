"""Stage 1: building in-context clusters from web image-text pairs (Ray Data)."""
