"""A pretrained transformer text tower: a Hugging Face encoder (BERT, MiniLM, RoBERTa, ...)
over a caption's token ids, pooled to one vector (the first token's output, [CLS], or the
mean over the caption's tokens), projected to the joint space and L2-normalised; or, with
``pooling="gpo"`` (VSE-infinity's BERT text encoder, woodfrog/vse_infty ``lib/encoders.py``
``EncoderText``), every token's output projected to the joint space, then pooled by GPO
(:mod:`stages.models.gpo`, over the caption's tokens, [CLS] and [SEP] included) and
L2-normalised.

The encoder is built from its configuration (``config.json`` as a dict, stored in the
checkpoint), so a model rebuilt from a checkpoint needs no folder; a fresh model loads the
pretrained weights with :meth:`TransformerTextEncoder.load_pretrained`.

Freezing (``freeze_layers``): N > 0 fixes the embeddings and the first N layers, -1 the
whole encoder. Frozen parts are fixed functions: their weights get no gradient and they
run in eval mode (no dropout) whatever the model's mode. With the whole encoder frozen,
each distinct caption's pooled output is computed once and kept (:class:`EncoderCache`),
so after the first pass over a split a step costs what the projection costs; given a
folder (:meth:`TransformerTextEncoder.use_cache_folder`), the outputs are also kept in a
file there that later processes with the same encoder read instead of encoding
(:class:`~.encoder_cache.CacheFile`, named by the encoder's weights and
:meth:`TransformerTextEncoder.output_identity`). Not with GPO pooling, which reads every
token's output (a row per token, not per caption), so the frozen encoder runs at every step.
"""

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import UserError
from stages.data.tokenizers import from_folder_or_hub, resolve_text_model
from stages.models.encoder_cache import CacheFile, EncoderCache, encoder_key
from stages.models.gpo import GPO
from stages.models.tracing import is_exporting

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "gpo")


def _layer_list(encoder: nn.Module, num_layers: int) -> nn.ModuleList:
    """The encoder's stack of ``num_layers`` transformer layers."""
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise UserError(f"cannot find the {num_layers} layers of {type(encoder).__name__} to "
                    "freeze; use model.text_freeze_layers=0 or -1 with this text model")


class TransformerTextEncoder(nn.Module):
    """Token ids (B, L) long and lengths (B,) -> embeddings (B, E), L2-normalised.

    ``text_config``: the Hugging Face model configuration (a dict with ``model_type``);
    ``source``: the folder or hub name it came from (for messages).
    """

    def __init__(self, text_config: dict, embed_size: int, pooling: str = "mean",
                 freeze_layers: int = 0, source: str = ""):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        config = AutoConfig.for_model(**text_config)
        self.encoder = AutoModel.from_config(config).float()
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # BERT's [CLS] dense + tanh head: pooling is ours
        self.proj = nn.Linear(config.hidden_size, embed_size)
        self.pooling = pooling
        self.gpo = GPO() if pooling == "gpo" else None
        self.source = source
        self.frozen = self._freeze(freeze_layers, config.num_hidden_layers)
        self.train()  # frozen parts to eval mode
        whole = not any(p.requires_grad for p in self.encoder.parameters())
        self.cache = EncoderCache() if whole and pooling != "gpo" else None
        self.cache_folder: Path | None = None
        self.encoder.register_load_state_dict_post_hook(self._weights_loaded)

    def _freeze(self, layers: int, num_layers: int) -> list[nn.Module]:
        """Stop the gradient of the frozen parts (-1: all, N: the embeddings and the first
        N of ``num_layers`` layers); returns them."""
        if layers > num_layers:
            raise ValueError(f"cannot freeze {layers} of {num_layers} layers")
        if layers == 0:
            return []
        if layers < 0:
            frozen = [self.encoder]
        else:
            embeddings = getattr(self.encoder, "embeddings", None)
            if embeddings is None:
                embeddings = self.encoder.get_input_embeddings()
            frozen = [embeddings, *_layer_list(self.encoder, num_layers)[:layers]]
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> "TransformerTextEncoder":
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def clear_cache(self) -> None:
        """Forget cached outputs (the encoder's weights, device or dtype changed); the next
        forward looks up the cache file of the encoder as it is then."""
        if self.cache is not None:
            self.cache.clear()

    def use_cache_folder(self, folder: str | Path | None) -> None:
        """Keep a whole frozen encoder's outputs in a file under ``folder`` too (None: in
        memory only): read at the next forward, added to by :meth:`save_cache`. A partly
        frozen or trainable encoder has no cache, and this does nothing."""
        if self.cache is None:
            return
        self.cache_folder = Path(folder) if folder is not None else None
        self.cache.detach()

    def save_cache(self) -> int:
        """Add the outputs computed since the last save to the cache file; returns how many
        rows it gained (0 without a cache folder)."""
        return self.cache.save() if self.cache is not None else 0

    def _pooled_float32(self, tokens: torch.Tensor, lengths) -> torch.Tensor:
        """:meth:`pooled` with autocast off: the cached outputs are the frozen encoder's in
        its own dtype whatever precision the run's forward pass uses (``train.precision``),
        so a file filled by a bf16 run gives an fp32 run the outputs it would compute."""
        with torch.autocast(tokens.device.type, enabled=False):
            return self.pooled(tokens, lengths)

    def output_identity(self) -> dict:
        """What the pooled outputs depend on besides the encoder's weights: its class and
        configuration (less its metadata), the pooling, dtype and device type, the
        attention implementation, and the torch and transformers versions."""
        import transformers

        param = next(self.encoder.parameters())
        config = {k: v for k, v in self.encoder.config.to_dict().items()
                  if k not in ("transformers_version", "_name_or_path", "architectures",
                               "dtype")}
        return {"encoder": type(self.encoder).__name__, "config": config,
                "pooling": self.pooling, "dtype": str(param.dtype),
                "device": param.device.type,
                "attention": self.encoder.config._attn_implementation,
                "torch": torch.__version__, "transformers": transformers.__version__}

    def _attach_cache_file(self) -> None:
        """Look up the cache file of the encoder as it is now under ``cache_folder``."""
        param = next(self.encoder.parameters())
        identity = self.output_identity()
        file = CacheFile(self.cache_folder, encoder_key(identity, self.encoder.state_dict()),
                         identity, self.proj.in_features, param.dtype)
        self.cache.attach(file, param.device)

    def _weights_loaded(self, module: nn.Module, incompatible_keys) -> None:
        """After the encoder's ``load_state_dict`` (directly or through a parent)."""
        self.clear_cache()

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def load_pretrained(self, name: str) -> None:
        """The encoder's weights from the folder or hub name ``name`` (its pooler head, if
        any, is dropped); the projection keeps its initialisation."""
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        where = resolve_text_model(name)
        hf_logging.disable_progress_bar()
        with torch.random.fork_rng(devices=[]):  # the run's RNG stream stays the same
            source = from_folder_or_hub(AutoModel, where)
        weights = {k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")}
        try:
            self.encoder.load_state_dict(weights)
        except RuntimeError as exc:
            raise UserError(f"text model {name}: its weights do not fit the model built from "
                            f"its config.json ({str(exc).splitlines()[0]})") from exc
        log.info("text encoder: %s weights from %s", type(source).__name__, where)

    def token_states(self, tokens: torch.Tensor,
                     lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's outputs (B, L, H) of (B, L) token ids with (B,) lengths, and the
        (B, L) bool mask of the caption's tokens (the rest is padding)."""
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None, :]
                < lengths.to(tokens.device)[:, None])
        attention = self._traced_mask(mask) if is_exporting() else mask.long()
        return self.encoder(input_ids=tokens, attention_mask=attention).last_hidden_state, mask

    def pooled(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled output (B, H) of (B, L) token ids with (B,) lengths, before
        the projection (``cls`` or ``mean`` pooling); tokens past a caption's length are
        padding."""
        hidden, mask = self.token_states(tokens, lengths)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def _traced_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool key mask -> the additive (B, 1, L, L) mask (0 where a key is a token,
        the dtype's minimum where it is padding) the encoder's attention reads as it is, for
        export: Hugging Face's own conversion of a (B, L) mask branches on its shape and
        values, which tracing would bake in."""
        full = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
        dtype = self.proj.weight.dtype
        return torch.zeros(full.shape, dtype=dtype, device=mask.device).masked_fill(
            ~full, torch.finfo(dtype).min)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.gpo is not None:
            hidden, mask = self.token_states(tokens, lengths)
            return F.normalize(self.gpo(self.proj(hidden), mask), dim=-1)
        if self.cache is None or is_exporting():
            pooled = self.pooled(tokens, lengths)
        else:
            if self.cache_folder is not None and not self.cache.attached:
                self._attach_cache_file()
            pooled = self.cache(tokens, lengths, self._pooled_float32)
        return F.normalize(self.proj(pooled), dim=-1)
