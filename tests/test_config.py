import pytest

from foodlib.config import Config, ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = Config.from_flat(data="dishes", loss="lgm", alpha=0.3, covariance="diagonal", embedding_dim=2,
                           pretrained="/weights/r18.pth", limit_per_class=None, epochs=7)
    path = tmp_path / "config.yaml"
    cfg.to_yaml(path)
    assert Config.from_yaml(path) == cfg
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def test_flat_names_are_unique_and_complete():
    flat = Config().to_flat()
    assert set(flat) == set(Config.field_index())
    assert len(flat) == sum(len(section) for section in Config().to_dict().values())


def test_from_dict_accepts_flat_and_nested():
    nested = Config.from_dict({"loss": {"loss": "center", "lam": 0.1}, "train": {"epochs": 3}})
    flat = Config.from_dict({"loss": "center", "lam": 0.1, "epochs": 3})
    assert nested == flat
    assert nested.loss.lam == 0.1 and nested.train.epochs == 3


@pytest.mark.parametrize("value, expected", [("3", 3), (3.0, 3), ("none", None)])
def test_strings_from_the_command_line_are_coerced(value, expected):
    assert Config.from_flat(embedding_dim=value).model.embedding_dim == expected


def test_bool_and_path_fields():
    assert Config.from_flat(cache="false").data.cache is False
    assert Config.from_flat(pretrained="true").model.pretrained is True
    assert Config.from_flat(pretrained="w.pth").model.pretrained == "w.pth"


@pytest.mark.parametrize("overrides, words", [
    (dict(optimizer="rmsprop"), ["optimizer", "rmsprop", "adamw"]),
    (dict(lam=-1.0), ["lam", "-1.0"]),
    (dict(embedding_dim=1), ["embedding_dim", "1", ">= 2"]),
    (dict(loss="center", alpha=1.5), ["alpha", "1.5", "(0, 1]"]),
    (dict(epochs="many"), ["epochs", "many"]),
    (dict(image_sise=64), ["image_sise", "image_size"]),
    (dict(amp="fp8"), ["amp", "fp8", "bf16"]),
])
def test_validation_errors_name_field_value_and_fix(overrides, words):
    with pytest.raises(ConfigError) as error:
        Config.from_flat(**overrides)
    for word in words:
        assert word in str(error.value)


def test_lgm_alpha_above_one_is_a_valid_margin():
    assert Config.from_flat(loss="lgm", alpha=1.5).loss.alpha == 1.5
