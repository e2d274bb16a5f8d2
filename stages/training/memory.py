"""Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020):
a ring buffer of the last ``size`` image and caption embeddings of past batches, detached,
with the image each shows, appended to every loss's reference set as extra negatives.

Its contents are part of the training state (``state_dict``), so a resumed run equals an
uninterrupted one.
"""

import torch

from stages.losses.base import References


def _on(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    """``tensor`` on ``device`` (None while the bank has never been filled)."""
    return None if tensor is None else tensor.to(device)


class MemoryBank:
    """Ring buffer of ``size`` (image embedding, image id) and (caption embedding, id of
    its image) rows; used once ``warmup_steps`` steps have been pushed."""

    def __init__(self, size: int, warmup_steps: int = 0):
        self.size = size
        self.warmup_steps = warmup_steps
        self.steps = 0  # batches pushed
        self.filled = 0  # valid rows
        self.next = 0  # row the next push starts at
        self.images: torch.Tensor | None = None  # (size, E)
        self.captions: torch.Tensor | None = None  # (size, E)
        self.ids = torch.zeros(size, dtype=torch.long)  # image id of both rows

    def references(self) -> References | None:
        """The stored rows as :class:`References`: ``images`` and ``captions`` (F, E) with
        the image ids (F,) of both, F = the rows filled so far (at most ``size``); None while
        empty or warming up."""
        if self.size == 0 or self.filled == 0 or self.steps < self.warmup_steps:
            return None
        ids = self.ids[:self.filled]
        return References(self.images[:self.filled], ids, self.captions[:self.filled], ids)

    @torch.no_grad()
    def push(self, img_emb: torch.Tensor, cap_emb: torch.Tensor,
             image_ids: torch.Tensor) -> None:
        """Store a batch's pairs: ``img_emb``, ``cap_emb`` (B, E), ``image_ids`` (B,)."""
        self.steps += 1
        if self.size == 0:
            return
        if self.images is None:
            shape = (self.size, img_emb.shape[1])
            self.images = torch.zeros(shape, dtype=img_emb.dtype, device=img_emb.device)
            self.captions = torch.zeros(shape, dtype=cap_emb.dtype, device=cap_emb.device)
            self.ids = self.ids.to(img_emb.device)
        img_emb, cap_emb, image_ids = (img_emb[-self.size:], cap_emb[-self.size:],
                                       image_ids[-self.size:])
        rows = (self.next + torch.arange(len(image_ids), device=self.ids.device)) % self.size
        self.images[rows] = img_emb.detach()
        self.captions[rows] = cap_emb.detach()
        self.ids[rows] = image_ids
        self.next = int((self.next + len(image_ids)) % self.size)
        self.filled = min(self.size, self.filled + len(image_ids))

    def state_dict(self) -> dict:
        """Plain tensors and ints, on the CPU (a checkpoint's ``memory`` entry)."""
        return {"size": self.size, "steps": self.steps, "filled": self.filled,
                "next": self.next, "images": _on(self.images, "cpu"),
                "captions": _on(self.captions, "cpu"), "ids": self.ids.cpu()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if state["size"] != self.size:
            raise ValueError(f"memory bank of size {state['size']} cannot be loaded into one "
                             f"of size {self.size}")
        self.steps, self.filled, self.next = state["steps"], state["filled"], state["next"]
        self.images = _on(state["images"], device)
        self.captions = _on(state["captions"], device)
        self.ids = state["ids"].to(device)
