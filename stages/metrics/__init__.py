"""Retrieval metrics: the one recall@K implementation every stage uses."""
