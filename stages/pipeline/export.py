"""The export stage: a checkpoint's two encoders as TorchScript or ONNX files that run without
this package, with what a deployment needs to feed them, checked against the checkpoint.

An export folder holds ``image_encoder.{pt,onnx}``, ``caption_encoder.{pt,onnx}``, the
checkpoint's caption tokenizer (``vocab.json``, our vocabulary, or ``tokenizer/``, a
pretrained text model's Hugging Face tokenizer saved with ``save_pretrained``) and
``export.json`` (inputs and outputs with their dynamic axes and dtypes, the outputs'
normalisation, how a caption becomes token ids and how an image becomes pixels for models
that read raw images, the model and the checkpoint's weights hash, and the check's
result). It is built in a
temporary folder and renamed into place only once the exported encoders have given the
checkpoint's embeddings, within a tolerance, on a sample of real inputs (or generated ones
when the dataset is not reachable) and on a batch of other shapes: a failed or killed
export leaves nothing that looks done.

ONNX files are written by PyTorch's TorchScript-based exporter (``dynamo=False``): the
torch.export-based one takes half a minute per encoder here and, for bidirectional or
multi-layer GRUs, freezes the example's caption length into the graph.
"""

import contextlib
import json
import logging
import platform
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.config.sections import Config, load_config
from stages.core.errors import UserError
from stages.data.dataset import pad_tokens
from stages.data.images import ImagePreprocessing
from stages.data.tokenizers import CaptionTokenizer, PretrainedTokenizer
from stages.data.vocab import END, PAD, START, UNK, tokenize
from stages.io.atomic import atomic_folder, write_json
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.io.lock import folder_lock
from stages.models import MODELS
from stages.models.restore import model_from_checkpoint
from stages.pipeline.inputs import image_input, open_model_split

log = logging.getLogger(__name__)

EXPORT_FORMAT = "aoq-export"
EXPORT_VERSION = 1
FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
ONNX_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
SAMPLE_SIZE = 16  # images and captions in the check's sample
CAPTION_SCAN = 5000  # captions of the split looked at to pick several lengths
UNIT_NORM_TOLERANCE = 1e-4


TOKENIZER_DIR = "tokenizer"  # a pretrained tokenizer's save_pretrained folder in an export
# Captions whose token ids a copied tokenizer must reproduce (export-check).
TOKENIZER_PROBES = ("A man rides a brown horse on the beach.", "two DOGS, playing!", "",
                    "an unusualword xylophone " * 30)


@dataclass
class CaptionIds:
    """What generated captions need of a tokenizer: ids below ``vocab_size``, each caption
    ``start_id`` ... ``end_id`` (what it puts around the empty caption), padded with
    ``pad_id``, at most ``max_length`` tokens (None: no limit)."""

    vocab_size: int
    start_id: int
    end_id: int
    pad_id: int
    max_length: int | None

    @classmethod
    def of(cls, tokenizer: CaptionTokenizer) -> "CaptionIds":
        around = tokenizer.encode_many([""])[0]
        if len(around) < 2:
            raise UserError("the checkpoint's tokenizer puts no start and end tokens around "
                            "a caption; this export supports tokenizers that do")
        if isinstance(tokenizer, PretrainedTokenizer):
            size = tokenizer.text_config.get("vocab_size", len(tokenizer.tokenizer))
            return cls(size, around[0], around[-1], tokenizer.pad_id, tokenizer.max_length)
        return cls(len(tokenizer), around[0], around[-1], tokenizer.pad_id, None)

    def longest(self, length: int) -> int:
        """``length`` within ``max_length``."""
        return length if self.max_length is None else min(length, self.max_length)


@dataclass
class Batch:
    """Inputs of both encoders: ``images`` (B, R, D) | (B, D) features or (B, 3, S, S)
    pixels, float32, ``regions`` (B,) int64 (None but for region features), ``tokens``
    (B', L) int64, ``lengths`` (B',) int64."""

    images: torch.Tensor
    regions: torch.Tensor | None
    tokens: torch.Tensor
    lengths: torch.Tensor
    description: str

    def image_inputs(self) -> dict[str, torch.Tensor]:
        return ({"images": self.images} if self.regions is None
                else {"images": self.images, "regions": self.regions})

    def caption_inputs(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "lengths": self.lengths}


# --- inputs ---------------------------------------------------------------------------------
def image_item_shape(state: dict, source: str) -> tuple[int, ...]:
    """One image's input shape: (3, S, S) pixels for a model that reads raw images (S its
    ``image_size``), else the feature shape, (R, D) regions or (D,) global, of the
    checkpoint's training features (its data fingerprint)."""
    if image_input(state["model"]["name"]) == "pixels":
        name, args = state["model"]["name"], state["model"]["args"]
        pre = MODELS.class_of(name).image_preprocessing(args)
        described = ImagePreprocessing(pre.size, pre.mean, pre.std)
        if pre != described:  # export.json describes a bilinear S * 256 / 224 resize only
            raise UserError(f"{source}: model {name} cannot be exported yet: its image "
                            f"preprocessing ({pre}) resizes otherwise than the bilinear "
                            "resize to S * 256 / 224 that export.json describes")
        return (3, pre.size, pre.size)
    shape = state.get("data_fingerprint", {}).get("train_features", {}).get("shape")
    img_dim = state["model"]["args"].get("img_dim")
    if not isinstance(shape, list) or len(shape) not in (2, 3) or shape[-1] != img_dim:
        raise UserError(f"{source}: its data fingerprint records no training feature shape "
                        f"that fits img_dim={img_dim} ({shape}); retrain it with this version")
    return tuple(shape[1:])


def generated_batch(item_shape: tuple[int, ...], ids: CaptionIds, images: int, captions: int,
                    max_length: int, seed: int, full: bool = False,
                    extra_regions: int = 0) -> Batch:
    """Random images of ``item_shape`` (R + ``extra_regions`` regions) and random token ids.

    Region counts and caption lengths vary (2..``max_length``) unless ``full``: then every
    region is valid and every caption ``max_length`` long (no padding anywhere).
    """
    vocab_size = ids.vocab_size
    gen = torch.Generator().manual_seed(seed)
    if len(item_shape) == 2:
        num = item_shape[0] + extra_regions
        feats = torch.randn(images, num, item_shape[1], generator=gen)
        regions = (torch.full((images,), num) if full
                   else torch.randint(1, num + 1, (images,), generator=gen))
        regions[0] = num
    else:
        feats, regions = torch.randn(images, *item_shape, generator=gen), None
    lengths = (torch.full((captions,), max_length) if full
               else torch.linspace(2, max_length, captions).round().long())
    token_lists = []
    for length in lengths.tolist():
        words = torch.randint(min(UNK, vocab_size - 1), vocab_size, (length - 2,), generator=gen)
        token_lists.append(torch.cat([torch.tensor([ids.start_id]), words,
                                      torch.tensor([ids.end_id])]))
    tokens, lengths = pad_tokens(token_lists, ids.pad_id)
    what = ("no padding" if full else "varied region counts and caption lengths"
            if len(item_shape) == 2 else "varied caption lengths")
    return Batch(feats, regions.long() if regions is not None else None, tokens, lengths,
                 f"generated, {images} images and {captions} captions ({what})")


def dataset_batch(config: Config, model: dict, tokenizer: CaptionTokenizer,
                  item_shape: tuple[int, ...], size: int = SAMPLE_SIZE) -> Batch | None:
    """``size`` images spread over the eval split (features, or its images decoded as the
    model ``{"name", "args"}`` reads them), and ``size`` of its captions spread over the
    lengths found among its first captions (shortest and longest included); None when the
    dataset or its images cannot be read, or hold inputs of another shape (the reason is
    logged)."""
    split_name = config.data.eval_split
    try:
        split = open_model_split(config, split_name, model)
    except UserError as exc:
        log.info("check sample: dataset not reachable (%s); using generated inputs", exc)
        return None
    store = split.features
    fits = (tuple(store.item_shape) == item_shape if len(item_shape) == 3 else
            (store.feature_dim, store.has_regions) == (item_shape[-1], len(item_shape) == 2))
    if not fits:
        log.info("check sample: %s holds features of shape %s, not the model's %s; using "
                 "generated inputs", store.path, store.item_shape, item_shape)
        return None
    rows = np.unique(np.linspace(0, split.num_images - 1, size).round().astype(np.int64))
    images = torch.from_numpy(np.asarray(store.read_many(rows.tolist()), dtype=np.float32))
    regions = (torch.from_numpy(store.regions_many(rows.tolist())).long()
               if store.has_regions else None)
    encoded = tokenizer.encode_many(list(split.captions[:CAPTION_SCAN]))
    by_length = sorted(range(len(encoded)), key=lambda c: (len(encoded[c]), c))
    picks = np.unique(np.linspace(0, len(by_length) - 1, size).round().astype(np.int64))
    tokens, lengths = pad_tokens([torch.tensor(encoded[by_length[p]]) for p in picks],
                                 tokenizer.pad_id)
    return Batch(images, regions, tokens, lengths,
                 f"{config.data.name}/{split_name}: {len(rows)} images, {len(picks)} captions "
                 f"of lengths {int(lengths.min())}..{int(lengths.max())} tokens")


# --- writing --------------------------------------------------------------------------------
@contextlib.contextmanager
def _export_errors(what: str, model_name: str) -> Iterator[None]:
    """The tracer's warnings become errors (a branch on a tensor's value would be baked
    into the graph, silently wrong on other inputs), and any failure a one-line UserError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's and the ONNX exporter's
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecation notices
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.simplefilter("error", torch.jit.TracerWarning)
        try:
            yield
        except UserError:
            raise
        except Exception as exc:
            cause, hint = exc, ""
            while cause is not None and not isinstance(cause, torch.jit.TracerWarning):
                cause = cause.__cause__ or cause.__context__  # raised inside torch's C++
            if cause is not None:
                frames = [f for f in traceback.extract_tb(exc.__traceback__)
                          if "/torch/" not in f.filename]
                where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
                hint = (f"{where} (its encoders must be traceable: no branch on tensor "
                        "values, no packed sequences; see stages/models/tracing.py)")
            cause = cause or exc
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            raise UserError(f"model {model_name!r} cannot be exported: {what} failed with "
                            f"{type(cause).__name__}: {first}{hint}") from exc


def _write_encoder(module: torch.nn.Module, example: dict[str, torch.Tensor], path: Path,
                   fmt: str, model_name: str, side: str) -> None:
    """Trace ``module`` on ``example`` (input name -> tensor) and write it to ``path``."""
    args = tuple(example.values())
    with torch.no_grad(), _export_errors(f"exporting the {side} encoder to {fmt}", model_name):
        if fmt == "torchscript":
            traced = torch.jit.trace(module, args, check_trace=False)
            # Freezing inlines the weights the graph uses and drops the others (the other
            # tower's), so each file holds only its own encoder.
            torch.jit.save(torch.jit.freeze(traced.eval()), str(path))
        else:
            names = list(example)
            images = example.get("images")
            axes = {"images": {0: "batch", 1: "max_regions"} if images is not None
                    and images.dim() == 3 else {0: "batch"}, "regions": {0: "batch"},
                    "tokens": {0: "batch", 1: "length"}, "lengths": {0: "batch"},
                    "embeddings": {0: "batch"}}
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                              output_names=["embeddings"], opset_version=ONNX_OPSET,
                              dynamic_axes={n: axes[n] for n in [*names, "embeddings"]})
            _set_output_width(path, int(module(*args).shape[1]))


def _set_output_width(path: Path, width: int) -> None:
    """Declare the ONNX output's embedding axis as the number it is (the exporter's shape
    inference leaves it symbolic after the normalisation), as export.json does."""
    import onnx

    graph = onnx.load(str(path))
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = width
    onnx.save(graph, str(path))


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError("--format onnx needs the packages onnx and onnxruntime: "
                        "pip install 'aoq-retrieval[onnx]' (make install includes them)"
                        ) from exc
    return onnxruntime


def load_encoder(path: Path, fmt: str):
    """An exported encoder as a function of its named inputs (tensors) -> (B, E) float32
    numpy array: TorchScript through ``torch.jit.load``, ONNX through onnxruntime."""
    if not path.is_file():
        raise UserError(f"{path} not found; export again with `aoq export`")
    try:
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
                module = torch.jit.load(str(path), map_location="cpu")

            def run(inputs: dict) -> np.ndarray:
                with torch.no_grad():
                    return module(*inputs.values()).float().numpy()
            return run
        session = _onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except UserError:
        raise
    except Exception as exc:  # a file that is not an encoder, or was damaged
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: cannot be loaded as a {fmt} encoder ({type(exc).__name__}: "
                        f"{first}); export again with `aoq export --force`") from exc
    declared = [i.name for i in session.get_inputs()]

    def run_onnx(inputs: dict) -> np.ndarray:
        return session.run(None, {k: v.numpy() for k, v in inputs.items() if k in declared})[0]
    return run_onnx


# --- the check ------------------------------------------------------------------------------
def check_encoders(folder: Path, fmt: str, model, batches: list[Batch],
                   tolerance: float) -> dict:
    """Run the exported encoders of ``folder`` and the checkpoint's ``model`` on every batch.

    Returns ``{"image": max abs diff, "caption": ..., "normalisation": {...}}``. A
    difference above ``tolerance``, or one that is not finite, is a :class:`UserError`.
    """
    sides = {"image": (model.encode_images, Batch.image_inputs),
             "caption": (model.encode_captions, Batch.caption_inputs)}
    result, norms = {}, {}
    for side, (encode, inputs_of) in sides.items():
        path = folder / f"{side}_encoder{SUFFIX[fmt]}"
        run = load_encoder(path, fmt)
        worst, unit = 0.0, True
        for batch in batches:
            inputs = inputs_of(batch)
            with torch.no_grad():
                if side == "image":
                    regions = (batch.regions if batch.regions is not None
                               else torch.ones(len(batch.images), dtype=torch.long))
                    expected = encode(batch.images, regions).float().numpy()
                else:
                    expected = encode(batch.tokens, batch.lengths).float().numpy()
            try:
                got = run(inputs)
            except Exception as exc:  # a damaged graph that loads but does not run
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise UserError(f"{path} fails on {batch.description} ({type(exc).__name__}: "
                                f"{first}); export again with `aoq export --force`") from exc
            if got.shape != expected.shape:
                raise UserError(f"{path} gives embeddings of shape {got.shape} on "
                                f"{batch.description}; the checkpoint gives {expected.shape}")
            diff = float(np.abs(got - expected).max())
            worst = diff if not diff <= worst else worst  # NaN sticks
            unit &= bool(np.all(np.abs(np.linalg.norm(expected, axis=1) - 1)
                                < UNIT_NORM_TOLERANCE))
        log.info("%s encoder (%s): max abs difference %.3g from the checkpoint's embeddings "
                 "(tolerance %g)", side, path.name, worst, tolerance)
        if not worst <= tolerance:
            raise UserError(f"{path}: the exported {side} encoder differs from the "
                            f"checkpoint's by up to {worst:.3g} (tolerance {tolerance:g}) on "
                            f"{' and '.join(b.description for b in batches)}; it does not "
                            "compute the checkpoint's embeddings: export again, and if this "
                            "persists the model is not exportable as it is")
        result[side] = worst
        norms[side] = "l2" if unit else "none"
    return {**result, "normalisation": norms}


def check_batches(config: Config, model: dict, tokenizer: CaptionTokenizer,
                  item_shape: tuple[int, ...]) -> list[Batch]:
    """The check's inputs: the dataset sample (else a generated one with varied lengths and
    region counts), then a generated batch of other shapes without any padding (longer
    captions, within the tokenizer's ``max_length``)."""
    ids = CaptionIds.of(tokenizer)
    sample = dataset_batch(config, model, tokenizer, item_shape) or generated_batch(
        item_shape, ids, SAMPLE_SIZE, SAMPLE_SIZE, ids.longest(12), seed=1)
    other = generated_batch(item_shape, ids, 3, 3, ids.longest(int(sample.lengths.max()) + 3),
                            seed=2, full=True, extra_regions=2)
    return [sample, other]


# --- the stage ------------------------------------------------------------------------------
EXAMPLE_CAPTION = "A man rides a brown horse on the beach."


def _image_side(item_shape: tuple[int, ...], model: dict) -> dict:
    """export.json's image inputs (and, for pixels, the preprocessing that makes them, with
    the normalisation of ``model``, the checkpoint's ``{"name", "args"}``)."""
    if len(item_shape) == 3:
        size = item_shape[-1]
        pre = MODELS.class_of(model["name"]).image_preprocessing(model["args"])
        mean, std = list(pre.mean), list(pre.std)
        return {"inputs": [{"name": "images", "dtype": "float32",
                            "shape": ["batch", *item_shape],
                            "description": "RGB images (N, C, H, W), preprocessed as "
                                           "'preprocessing' says"}],
                "preprocessing": {
                    "decode": "RGB (a grey or RGBA image converted to 3 channels)",
                    "resize": {"shorter_side": size * 256 // 224, "interpolation": "bilinear",
                               "antialias": True},
                    "center_crop": [size, size],
                    "scale": "pixel values / 255, to 0..1",
                    "mean": mean, "std": std,
                    "normalise": "(x - mean) / std per channel",
                    "torchvision": f"Compose([Resize({size * 256 // 224}), "
                                   f"CenterCrop({size}), ToTensor(), "
                                   f"Normalize({mean}, {std})])"}}
    inputs = [{"name": "images", "dtype": "float32",
               "shape": ["batch", "max_regions", item_shape[1]] if len(item_shape) == 2
               else ["batch", item_shape[0]],
               "description": "image features as the model was trained on (regions "
                              "padded to a common count)" if len(item_shape) == 2
               else "global image features"}]
    if len(item_shape) == 2:
        inputs.append({"name": "regions", "dtype": "int64", "shape": ["batch"],
                       "description": "valid regions of each image, 1..max_regions; the "
                                      "rows after them are padding and are ignored"})
    return {"inputs": inputs}


def _captions(tokenizer: CaptionTokenizer) -> dict:
    """export.json's description of how a caption becomes the caption encoder's inputs."""
    if isinstance(tokenizer, PretrainedTokenizer):
        ids = CaptionIds.of(tokenizer)
        hf = tokenizer.tokenizer
        lowercase = hf.init_kwargs.get("do_lower_case", getattr(hf, "do_lower_case", None))
        return {
            "tokenizer": f"{TOKENIZER_DIR}/", "kind": "huggingface",
            "text_model": tokenizer.source,
            "load": f"transformers.AutoTokenizer.from_pretrained('<this folder>/"
                    f"{TOKENIZER_DIR}')",
            "call": f"tokenizer(captions, truncation=True, max_length={ids.max_length}, "
                    "padding=True)",
            "inputs": {"tokens": "input_ids", "lengths": "attention_mask.sum(1) (the "
                       "attention mask is arange(length) < lengths)"},
            "max_length": ids.max_length, "pad_id": ids.pad_id, "start_id": ids.start_id,
            "end_id": ids.end_id,
            "lowercase": f"the tokenizer's (do_lower_case={lowercase})",
            "example": {"caption": EXAMPLE_CAPTION,
                        "ids": tokenizer.encode_many([EXAMPLE_CAPTION])[0]},
        }
    return {
        "vocab": "vocab.json", "vocab_size": len(tokenizer), "lowercase": True,
        "tokenizer": "NLTK's Treebank word tokenizer "
                     "(nltk.tokenize.TreebankWordTokenizer().tokenize) on the "
                     "lower-cased caption",
        "ids": "<start>, then each token's index in vocab.json's idx2word (<unk> for "
               "words not there), then <end>",
        "start_id": START, "end_id": END, "unk_id": UNK, "pad_id": PAD,
        "example": {"caption": EXAMPLE_CAPTION, "tokens": tokenize(EXAMPLE_CAPTION),
                    "ids": tokenizer.encode(EXAMPLE_CAPTION)},
    }


def _describe(state: dict, checkpoint: Path, fmt: str, item_shape: tuple[int, ...],
              tokenizer: CaptionTokenizer, embed_size: int, batches: list[Batch],
              tolerance: float, check: dict) -> dict:
    """The content of ``export.json``."""
    pretrained = isinstance(tokenizer, PretrainedTokenizer)
    norms = check["normalisation"]
    output = {"name": "embeddings", "dtype": "float32", "shape": ["batch", embed_size]}
    image = _image_side(item_shape, state["model"])
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exporter": fmt,
        "model": state["model"],
        "checkpoint": {"path": str(checkpoint.resolve()),
                       "weights": weights_hash(state["state_dict"]),
                       "epoch": state.get("epoch"), "best_rsum": state.get("best_rsum"),
                       "dataset": state.get("data_fingerprint", {}).get("dataset")},
        "encoders": {
            "image": {"file": f"image_encoder{SUFFIX[fmt]}", **image,
                      "outputs": [{**output, "normalisation": norms["image"]}]},
            "caption": {"file": f"caption_encoder{SUFFIX[fmt]}", "inputs": [
                {"name": "tokens", "dtype": "int64", "shape": ["batch", "length"],
                 "description": "token ids (see captions), padded on the right"},
                {"name": "lengths", "dtype": "int64", "shape": ["batch"],
                 "description": ("tokens of each caption, special tokens included"
                                 if pretrained else
                                 "tokens of each caption, <start> and <end> included")
                                + ", 1..length; positions after them are padding and ignored"}],
                "outputs": [{**output, "normalisation": norms["caption"]}]},
        },
        "similarity": "dot product of an image's and a caption's embeddings"
                      + (" (cosine: both are L2-normalised)"
                         if norms == {"image": "l2", "caption": "l2"} else ""),
        "captions": _captions(tokenizer),
        "check": {"tolerance": tolerance,
                  "max_abs_diff": {"image": check["image"], "caption": check["caption"]},
                  "inputs": [b.description for b in batches]},
        "torch": torch.__version__, "python": platform.python_version(),
        **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else
           {"device": "cpu (traced there; device constants are part of the graph)"}),
    }


def _write_tokenizer(tokenizer: CaptionTokenizer, folder: Path) -> None:
    """``vocab.json`` (our vocabulary) or ``tokenizer/`` (``save_pretrained``) in
    ``folder``."""
    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    else:
        write_json(folder / "vocab.json", tokenizer.to_json())


def _check_tokenizer(folder: Path, meta: dict, tokenizer: CaptionTokenizer,
                     checkpoint: Path) -> None:
    """The export's tokenizer gives the checkpoint's token ids (a :class:`UserError` when
    it is missing, unreadable or gives others)."""
    if isinstance(tokenizer, PretrainedTokenizer):
        from transformers import AutoTokenizer

        where = folder / TOKENIZER_DIR
        try:
            copied = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
            got = copied(list(TOKENIZER_PROBES), truncation=True,
                         max_length=tokenizer.max_length)["input_ids"]
        except (OSError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise UserError(f"{where}: not a readable tokenizer ({first}); export again with "
                            "`aoq export --force`") from exc
        if got != tokenizer.encode_many(list(TOKENIZER_PROBES)):
            raise UserError(f"{where} gives other token ids than the tokenizer of "
                            f"{checkpoint}; export again with `aoq export --force`")
        return
    vocab_path = folder / meta["captions"]["vocab"]
    try:
        words = json.loads(vocab_path.read_text(encoding="utf-8")).get("idx2word")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{vocab_path}: unreadable ({exc}); export again") from exc
    if words != tokenizer.idx2word:
        raise UserError(f"{vocab_path} differs from the vocabulary of {checkpoint}: captions "
                        "would get other token ids; export again with `aoq export --force`")


def check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is an earlier export: a folder whose export.json
    is this project's export description. ``--force`` never deletes anything else (a
    folder of notes, a dataset given as ``--out`` by mistake)."""
    try:
        meta = json.loads((out / "export.json").read_text(encoding="utf-8"))
        is_export = out.is_dir() and meta.get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):  # none, unreadable, not a JSON object
        is_export = False
    if not is_export:
        raise UserError(f"{out} is not an export folder (no export.json of `aoq export` in "
                        "it): --force replaces only an earlier export; choose another --out, "
                        f"or move {out} away")


def export(checkpoint: str | Path, out: str | Path | None = None, fmt: str = "torchscript",
           force: bool = False, tolerance: float = DEFAULT_TOLERANCE, config_files=(),
           overrides=()) -> Path:
    """Export ``checkpoint``'s encoders into ``out`` (default ``<run>/export/<fmt>/``),
    checked against the checkpoint; returns ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    if not tolerance > 0:
        raise UserError(f"--tolerance {tolerance}: must be a positive number")
    if fmt == "onnx":
        _onnxruntime()
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    out = Path(out) if out else checkpoint.parent / "export" / fmt
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it, or choose "
                            "another --out")
        check_replaceable(out)
    config = load_config(config_files, overrides,
                         base=Config.from_dict(state["config"], str(checkpoint), stored=True))
    model, tokenizer = model_from_checkpoint(state, str(checkpoint))
    item_shape = image_item_shape(state, str(checkpoint))
    batches = check_batches(config, state["model"], tokenizer, item_shape)
    # The traced example has varied region counts and lengths, so no shortcut for a batch
    # without padding can be taken while tracing.
    ids = CaptionIds.of(tokenizer)
    example = generated_batch(item_shape, ids, 4, 4, ids.longest(7), seed=0)
    image_module, caption_module = model.export_encoders(global_features=len(item_shape) != 2)
    name = state["model"]["name"]
    with (folder_lock(out.parent, "aoq export"),
          atomic_folder(out, replace=force, check_old=check_replaceable) as tmp):
        _write_encoder(image_module.eval(), example.image_inputs(),
                       tmp / f"image_encoder{SUFFIX[fmt]}", fmt, name, "image")
        _write_encoder(caption_module.eval(), example.caption_inputs(),
                       tmp / f"caption_encoder{SUFFIX[fmt]}", fmt, name, "caption")
        check = check_encoders(tmp, fmt, model, batches, tolerance)
        embed_size = int(model.encode_captions(example.tokens, example.lengths).shape[1])
        _write_tokenizer(tokenizer, tmp)
        write_json(tmp / "export.json", _describe(state, checkpoint, fmt, item_shape,
                                                  tokenizer, embed_size, batches, tolerance,
                                                  check))
    log.info("exported %s (%s) -> %s", checkpoint, fmt, out)
    return out


def check_export(folder: str | Path, checkpoint: str | Path | None = None,
                 tolerance: float | None = None, config_files=(), overrides=()) -> dict:
    """Check an export folder again (after copying it, say): its files against
    ``checkpoint`` (default: the one export.json names), which must have the recorded
    weights. Returns the max abs differences; a failure is a :class:`UserError`."""
    folder = Path(folder)
    meta_path = folder / "export.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{meta_path} not found; is {folder} an `aoq export` folder?") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc}); export again") from exc
    if meta.get("format") != EXPORT_FORMAT or meta.get("exporter") not in FORMATS:
        raise UserError(f"{meta_path}: not an export description of this project")
    checkpoint = Path(checkpoint or meta["checkpoint"]["path"])
    state = load_checkpoint(checkpoint)
    if weights_hash(state["state_dict"]) != meta["checkpoint"]["weights"]:
        raise UserError(f"{checkpoint} holds other weights ({weights_hash(state['state_dict'])})"
                        f" than {folder} was exported from ({meta['checkpoint']['weights']}); "
                        "give the checkpoint it was made from with --ckpt")
    config = load_config(config_files, overrides,
                         base=Config.from_dict(state["config"], str(checkpoint), stored=True))
    model, tokenizer = model_from_checkpoint(state, str(checkpoint))
    _check_tokenizer(folder, meta, tokenizer, checkpoint)
    item_shape = image_item_shape(state, str(checkpoint))
    tolerance = tolerance if tolerance is not None else meta["check"]["tolerance"]
    return check_encoders(folder, meta["exporter"], model,
                          check_batches(config, state["model"], tokenizer, item_shape),
                          tolerance)
