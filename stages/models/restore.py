"""A model rebuilt from a checkpoint's ``model`` entry ({name, args}) and weights, with the
options a model gained after the checkpoint was written taken at their legacy values."""

from stages.core.errors import UserError
from stages.data.tokenizers import tokenizer_from_json
from stages.models import MODELS, build_model


def with_legacy_options(name: str, values: dict) -> dict:
    """``values`` (a checkpoint's model arguments, or its stored config's model block) of
    model ``name``, with each option the model gained since they were written set to the
    value that gives the behaviour they were trained with
    (:attr:`~stages.models.base.EmbeddingModel.legacy_options`)."""
    return {**MODELS.class_of(name).legacy_options, **values}


def same_model(a: dict, b: dict) -> bool:
    """Whether two checkpoints' model specs (``{"name", "args"}``) are one model, the
    options a spec predates taken at their legacy values (:func:`with_legacy_options`): a
    checkpoint written before an option existed is the model with that option's legacy
    value."""
    return a["name"] == b["name"] and (with_legacy_options(a["name"], a["args"])
                                       == with_legacy_options(b["name"], b["args"]))


def model_from_checkpoint(state: dict, source: str = "checkpoint"):
    """Rebuild (model, caption tokenizer) from a loaded checkpoint; the model is on the CPU,
    eval mode."""
    spec = state["model"]
    try:
        options = MODELS.options(spec["name"])
        args = with_legacy_options(spec["name"], spec["args"])
        model = build_model(spec["name"], {k: v for k, v in args.items() if k in options},
                            **{k: v for k, v in args.items() if k not in options})
    except UserError as exc:  # an unknown model name, an option out of range
        raise UserError(f"{source}: {exc}") from exc
    except (TypeError, ValueError) as exc:  # arguments the model does not take
        raise UserError(f"{source}: model {spec['name']!r} cannot be built from "
                        f"{spec['args']} ({exc}); the checkpoint comes from another version "
                        "of the code") from exc
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"{source}: weights do not fit model {spec['name']!r} with "
                        f"{spec['args']}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, tokenizer_from_json(state["vocab"], source)
