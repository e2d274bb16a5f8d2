import pytest

from stages.config.sections import Config, config_diff, load_config, retrain_defaults
from stages.core.errors import UserError


def test_defaults_are_vsepp_published_settings():
    c = Config()
    model = c.model.options()
    assert (model["embed_size"], model["word_dim"], model["num_layers"]) == (1024, 300, 1)
    assert (c.train.lr, c.train.lr_update, c.train.epochs, c.train.lr_decay) == (
        2e-4, 15, 30, 0.1)
    assert (c.train.batch_size, c.train.grad_clip) == (128, 2.0)
    assert (c.loss.name, c.loss.options()["margin"]) == ("vse_max", 0.2)


def test_shipped_model_config_matches_defaults():
    shipped = load_config(["configs/model/vsepp.yaml", "configs/loss/vse_max.yaml"])
    assert shipped.to_dict() == Config().to_dict()


def test_the_retrain_defaults_are_aoqs_protocol():
    defaults = retrain_defaults()
    assert (defaults.loss.name, defaults.train.offline_negatives) == ("aoq", True)
    assert (defaults.train.epochs, defaults.train.lr_update) == (20, 10)
    # Beyond the loss (with its own options' defaults), only those settings differ.
    changed = [d for d in config_diff(Config().to_dict(), defaults.to_dict())
               if not d.startswith("loss.")]
    assert changed == ["train.epochs: 30 -> 20", "train.lr_update: 15 -> 10",
                       "train.offline_negatives: False -> True"]


def test_shipped_model_config_keeps_the_retrain_schedule():
    defaults = retrain_defaults()
    shipped = load_config(["configs/model/vsepp.yaml"], base=defaults, retrain=True)
    assert shipped.to_dict() == defaults.to_dict()


def test_a_files_retrain_block_applies_to_retrain_only_and_is_checked(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text("train:\n  epochs: 30\nretrain:\n  train:\n    epochs: 20\n")
    later = tmp_path / "exp.yaml"
    later.write_text("train:\n  lr: 1.0e-3\n")
    assert load_config([model, later]).train.epochs == 30
    retrain = load_config([model, later], retrain=True)
    assert (retrain.train.epochs, retrain.train.lr) == (20, 1e-3)
    # A later file's train settings still win over an earlier file's retrain block.
    later.write_text("train:\n  epochs: 6\n")
    assert load_config([model, later], retrain=True).train.epochs == 6
    model.write_text("retrain:\n  train:\n    epocs: 20\n")
    with pytest.raises(UserError, match="retrain.*epocs"):
        load_config([model])


def test_yaml_files_layer_in_order_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  lr: 1.0e-3\n  epochs: 5\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  epochs: 7\n")
    c = load_config([a, b], ["train.lr=5e-4", "batch_size=64"])
    assert (c.train.lr, c.train.epochs, c.train.batch_size) == (5e-4, 7, 64)
    assert isinstance(c.train.lr, float)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key train.lrr"),
    ("lrr=1", "unknown key 'lrr'"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("train.epochs=abc", "train.epochs must be int"),
    ("train.epochs=2.5", "train.epochs must be int"),
    ("train.lr=fast", "train.lr must be a finite float"),
    ("train.lr=.nan", "train.lr must be a finite float"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("offcandi.hardest=0", "offcandi.hardest must be >= 1"),
    ("offcandi.index=annoy", "offcandi.index must be one of flat, hnsw, ivf"),
    ("loss.margin=-0.1", "loss.margin must be >= 0"),
    ("loss.name=nope", "unknown loss 'nope'; known:"),
    ("model.embed_size=0", "model.embed_size must be >= 1"),
    ("model.bidirectional=maybe", "model.bidirectional must be bool"),
    ("name=x", "ambiguous"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides=[override])


def test_bool_accepts_make_style_flags():
    assert load_config(overrides=["eval.fold5=1"]).eval.fold5 is True
    assert load_config(overrides=["eval.fold5=0"]).eval.fold5 is False


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nope: 1\n")
    with pytest.raises(UserError, match="bad.yaml: unknown key train.nope"):
        load_config([bad])
    with pytest.raises(UserError, match="not found"):
        load_config([tmp_path / "missing.yaml"])


def test_round_trip_and_diff():
    c = load_config(overrides=["train.lr=1e-3"])
    assert Config.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert config_diff(Config().to_dict(), c.to_dict()) == ["train.lr: 0.0002 -> 0.001"]


def test_an_option_the_chosen_loss_does_not_take_is_refused():
    with pytest.raises(UserError, match=r"loss 'vse_max' has no option 'alpha'; alpha is an "
                                        r"option of aoq, offquin, offtri"):
        load_config(overrides=["loss.alpha=0.5"])
    with pytest.raises(UserError, match="model 'vsepp' has no option 'temperature'"):
        load_config(overrides=["model.temperature=0.5"])


def test_named_block_options_apply_in_any_order():
    a = load_config(overrides=["loss.alpha=0.5", "loss.name=aoq"])
    b = load_config(overrides=["loss.name=aoq", "loss.alpha=0.5"])
    assert a.to_dict() == b.to_dict()
    assert a.to_dict()["loss"]["alpha"] == 0.5 and a.to_dict()["loss"]["beta"] == 1.5


def test_stored_configs_drop_options_a_class_no_longer_takes():
    stored = Config().to_dict()
    stored["loss"]["alpha"] = 0.3  # an older version kept every loss's options in one block
    with pytest.raises(UserError, match="no option 'alpha'"):
        Config.from_dict(stored)
    assert Config.from_dict(stored, stored=True).to_dict() == Config().to_dict()


def test_a_later_layer_naming_another_loss_drops_earlier_options_it_does_not_take(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text("loss:\n  name: vse_max\n  warmup_epochs: 1\n  margin: 0.3\n"
                     "retrain:\n  loss:\n    name: aoq\n")
    assert load_config([model]).loss.options()["warmup_epochs"] == 1
    retrain = load_config([model], retrain=True)
    assert retrain.loss.name == "aoq"
    assert "warmup_epochs" not in retrain.loss.values
    assert retrain.loss.options()["margin"] == 0.3  # aoq takes it: kept
    table = load_config([model], ["loss.name=infonce"])
    assert table.loss.name == "infonce" and "warmup_epochs" not in table.loss.values
    # The layer that names the loss is checked strictly, in any order of its --set's.
    with pytest.raises(UserError, match="warmup_epochs"):
        load_config([model], ["loss.warmup_epochs=2", "loss.name=aoq"])
    # A name set again to the same loss keeps the earlier options.
    same = load_config([model], ["loss.name=vse_max"])
    assert same.loss.options()["warmup_epochs"] == 1
