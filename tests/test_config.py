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
    (dict(loss="center", lam=-1.0), ["lam", "-1.0"]),
    (dict(embedding_dim=1), ["embedding_dim", "1", ">= 2"]),
    (dict(loss="center", alpha=1.5), ["alpha", "1.5", "(0.0, 1.0]"]),
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


# ----- one source of truth for the loss options ------------------------------------------------------

#: Constructor keywords kept for library use only (not config fields): the L-GM start and scale
#: controls of issue 18, whose defaults are the documented behaviour.
LIBRARY_ONLY_OPTIONS = {"lgm": {"alpha_start", "start", "start_penalty", "learn_scale"}}


def test_loss_config_names_exactly_the_losses_constructor_keywords():
    import dataclasses

    from foodlib.config import LossConfig
    from foodlib.losses import list_losses, loss_options

    fields = {f.name for f in dataclasses.fields(LossConfig)} - {"loss"}
    taken: set[str] = set()
    for name in list_losses():
        keywords = set(loss_options(name)) - LIBRARY_ONLY_OPTIONS.get(name, set())
        missing = keywords - fields
        assert not missing, f"loss {name!r} takes {sorted(missing)}: add them to LossConfig (None: the loss's default)"
        taken |= keywords
    assert fields <= taken, f"LossConfig fields no loss takes: {sorted(fields - taken)}"


def test_loss_config_defaults_are_the_losses_own():
    import dataclasses
    import inspect

    from foodlib.config import LossConfig
    from foodlib.losses import _loss_class, list_losses, loss_options

    for field in dataclasses.fields(LossConfig):
        if field.name == "loss" or field.default is None:
            continue
        for name in list_losses():
            if field.name in loss_options(name):
                declared = inspect.signature(_loss_class(name).__init__).parameters[field.name].default
                assert declared == field.default, (name, field.name)


def test_a_loss_option_is_checked_by_the_loss_and_refused_for_a_loss_without_it():
    with pytest.raises(ConfigError, match=r"loss='center'.*alpha"):
        Config.from_flat(loss="center", alpha=1.5)  # the center update rate lies in (0, 1]: CenterLoss says so
    with pytest.raises(ConfigError, match=r"loss='softmax'.*lam_island"):
        Config.from_flat(loss="softmax", lam_island=2.0)
    with pytest.raises(ConfigError, match=r"loss='lgm'.*covariance"):
        Config.from_flat(loss="lgm", covariance="full")
    assert Config.from_flat(loss="island", lam_island=2.0, update="sgd").loss.update == "sgd"


def test_fit_passes_every_option_the_loss_takes():
    from foodlib.train import loss_kwargs

    cfg = Config.from_flat(loss="island", lam=0.02, lam_island=3.0)
    assert loss_kwargs(cfg) == {"lam": 0.02, "lam_island": 3.0, "update": "paper", "lam_warmup_epochs": 0}
    assert loss_kwargs(Config.from_flat(loss="cosface", margin=0.2)) == {"margin": 0.2}
