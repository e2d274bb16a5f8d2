"""The training engine: tasks (what a batch holds and how it feeds the loss), the memory
bank, the deterministic batch order, and the short loop. Library code: it never imports the
stage runners or the CLI."""
