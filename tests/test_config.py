import pytest

from stages.config import Config, config_diff, load_config
from stages.errors import UserError


def test_defaults_are_vsepp_published_settings():
    c = Config()
    assert (c.model.embed_size, c.model.word_dim, c.model.num_layers) == (1024, 300, 1)
    assert (c.train.lr, c.train.lr_update, c.train.epochs, c.train.lr_decay) == (
        2e-4, 15, 30, 0.1)
    assert (c.train.batch_size, c.train.grad_clip) == (128, 2.0)
    assert (c.loss.name, c.loss.margin) == ("vse_max", 0.2)


def test_shipped_model_config_matches_defaults():
    assert load_config(["configs/model/vsepp.yaml", "configs/loss/vse_max.yaml"]) == Config()


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
    ("train.lr=fast", "train.lr must be float"),
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
    assert Config.from_dict(c.to_dict()) == c
    assert config_diff(Config().to_dict(), c.to_dict()) == ["train.lr: 0.0002 -> 0.001"]
