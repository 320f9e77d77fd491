"""Re-Imagen's half of in-context generation: a knowledge base of image-text pairs (LanceDB, built
with Ray Data) whose nearest neighbours to a prompt become the demos."""
from .index import IndexConfig, run_index
from .kb import KnowledgeBase, Neighbour

__all__ = ["IndexConfig", "KnowledgeBase", "Neighbour", "run_index"]
