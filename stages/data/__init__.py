"""Datasets, captions and vocabulary: the data contract every stage reads."""
