"""File I/O shared by the stages: atomic writes, checkpoints, hashing."""
