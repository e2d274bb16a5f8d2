"""CLIP's caption tokenizer (open_clip's ``SimpleTokenizer``: byte-level BPE, lower-cased,
``<start_of_text> ... <end_of_text>``, at most ``context_length`` tokens) and the open_clip
architecture it belongs to.

An architecture (``model.arch``) is a name ``open_clip.list_models()`` knows (``ViT-B-32``,
``RN50``, ...), a name of a config this package ships (:data:`SHIPPED_CONFIG_DIR`: TinyCLIP's,
which open_clip does not ship), or the path of an open_clip model-config JSON file
(``embed_dim``, ``vision_cfg``, ``text_cfg``).
Its config dict travels in the tokenizer's description (stored in every checkpoint) and in
the model's arguments (``clip_config``), so later stages need neither the file nor the name.

Only architectures whose text side is CLIP's own work here: the BPE vocabulary ships inside
the open_clip package (``bpe_simple_vocab_16e6.txt.gz``), nothing is downloaded. Those
with a Hugging Face tokenizer or text model (``hf_tokenizer_name``, ``hf_model_name``:
mt5, xlm-roberta, roberta, nllb, ...), SigLIP's tokenizers (downloaded), CoCa
(``multimodal_cfg``) and CLIPA's random token reduction are refused by :func:`arch_config`
with a one-line error.
"""

import copy
import hashlib
import json
from pathlib import Path

from stages.core.errors import UserError

CLIP_FORMAT = "aoq-open-clip-tokenizer"
# Model configs of architectures open_clip does not ship, by name (stages/models/clip_configs).
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "clip_configs"


def shipped_archs() -> list[str]:
    """Names of the architectures whose configs this package ships (TinyCLIP's)."""
    return sorted(path.stem for path in SHIPPED_CONFIG_DIR.glob("*.json"))


def _load_json_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model.arch={path}: not a readable open_clip model config ({exc})") \
            from exc
    if not isinstance(config, dict):
        raise UserError(f"model.arch={path}: not an open_clip model config (a JSON object)")
    config = config.get("model_cfg", config)  # a hub folder's open_clip_config.json
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise UserError(f"model.arch={path}: not an open_clip model config (no "
                        f"{', '.join(missing)}); give a file like open_clip's "
                        "model_configs/ViT-B-32.json")
    return config


def arch_config(arch: str) -> dict:
    """The open_clip model config of ``arch`` (a name or a JSON file), checked to need
    nothing from the network: a :class:`UserError` otherwise, saying why."""
    import open_clip

    if not arch:
        raise UserError("model.arch is empty: give an open_clip architecture (e.g. ViT-B-32; "
                        "see open_clip.list_models()) or a model-config JSON file")
    path = Path(arch).expanduser()
    if arch.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"model.arch={arch}: no such file")
        config = _load_json_config(path)
    elif arch.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"model.arch={arch}: hub and folder schemas are not read here; give "
                        "an open_clip architecture name or the path of its model-config "
                        "JSON (open_clip_config.json's model_cfg)")
    else:
        config = open_clip.get_model_config(arch)
        if config is None and arch in shipped_archs():
            config = _load_json_config(SHIPPED_CONFIG_DIR / f"{arch}.json")
        if config is None:
            known = open_clip.list_models()
            raise UserError(f"model.arch={arch}: unknown to open_clip "
                            f"{open_clip.__version__} ({len(known)} known, e.g. "
                            f"{', '.join(known[:3])}; see open_clip.list_models()) and not "
                            f"one this package ships ({', '.join(shipped_archs())}); or give "
                            "the path of a model-config JSON file")
    text = config["text_cfg"]
    hf = text.get("hf_tokenizer_name") or text.get("hf_model_name")
    if hf:
        raise UserError(f"model.arch={arch}: its text side is the Hugging Face model {hf}, "
                        "whose tokenizer and configuration would be downloaded; choose an "
                        "architecture with CLIP's own tokenizer (ViT-B-32, ViT-B-16, RN50, "
                        "ViT-L-14, ...)")
    if "siglip" in Path(arch).stem.lower():
        raise UserError(f"model.arch={arch}: SigLIP's tokenizer is downloaded from the hub; "
                        "choose an architecture with CLIP's own tokenizer (ViT-B-32, ...)")
    if "multimodal_cfg" in config:
        raise UserError(f"model.arch={arch}: CoCa models (a caption decoder) are not "
                        "supported; choose a CLIP architecture (ViT-B-32, ...)")
    if text.get("tokenizer_kwargs", {}).get("reduction_mask"):
        raise UserError(f"model.arch={arch}: its tokenizer drops tokens at random "
                        "(CLIPA's reduction_mask); choose an architecture without it")
    return copy.deepcopy(config)


class ClipTokenizer:
    """open_clip's ``SimpleTokenizer`` for the architecture ``arch`` (config ``clip_config``):
    token ids ``[<start>, ..., <end>]``, at most the text tower's ``context_length``; padded
    with 0, as open_clip pads (the text tower pools at the end token, the largest id)."""

    pad_id = 0

    def __init__(self, arch: str, clip_config: dict):
        from open_clip.tokenizer import SimpleTokenizer

        self.arch = arch
        self.clip_config = copy.deepcopy(clip_config)
        text = self.clip_config["text_cfg"]
        self.context_length = int(text.get("context_length", 77))
        self.clean = text.get("tokenizer_kwargs", {}).get("clean", "lower")
        self.tokenizer = SimpleTokenizer(context_length=self.context_length, clean=self.clean)

    @classmethod
    def for_arch(cls, arch: str) -> "ClipTokenizer":
        return cls(arch, arch_config(arch))

    def encode_many(self, captions: list[str]) -> list[list[int]]:
        """Each caption's ids with the start and end tokens, truncated as open_clip
        truncates (the last kept token replaced by the end token)."""
        t = self.tokenizer
        body = self.context_length - 2
        return [[t.sot_token_id, *t.encode(c)[:body], t.eot_token_id]
                for c in captions]

    def model_args(self) -> dict:
        return {"clip_config": copy.deepcopy(self.clip_config)}

    def to_json(self) -> dict:
        return {"format": CLIP_FORMAT, "version": 1, "arch": self.arch,
                "clip_config": self.clip_config}

    @classmethod
    def from_json(cls, obj: dict, source: str = "checkpoint") -> "ClipTokenizer":
        try:
            return cls(obj["arch"], obj["clip_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source}: its stored CLIP tokenizer cannot be rebuilt ({exc}); "
                            "the checkpoint is incomplete or comes from another version") \
                from exc

    def sha256(self) -> str:
        """Hex SHA-256 of the description (the architecture's config, not its name)."""
        text = json.dumps({**self.to_json(), "arch": ""}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
