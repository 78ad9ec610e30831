"""Fields that never change a result, and fields a resumed run may change, are marked once on the
Config dataclasses (foodlib/config.py); the suite, the tuner and resume derive their lists from that."""
import doctest

import pytest

from foodlib import config
from foodlib.config import Config, ConfigError, resume_free_fields, runtime_fields
from foodlib.train import check_resume_config

# The two lists as they were written out by hand (suite.RUNTIME_FIELDS, train.RESUME_FREE_FIELDS)
# before the marks: a field joining either is a decision about results, made on purpose.
RUNTIME_BEFORE = {"out", "resume", "quiet", "device", "workers", "cache_dir", "threads", "overwrite", "figures",
                  "tensorboard"}
RESUME_FREE_BEFORE = RUNTIME_BEFORE | {"epochs", "cache", "bad_files", "eval_test", "features"}


def test_marked_fields_are_the_former_lists():
    assert runtime_fields() == RUNTIME_BEFORE
    assert resume_free_fields() == RESUME_FREE_BEFORE
    assert runtime_fields() < resume_free_fields()  # never changes a result => may change on resume


def test_suite_and_tuner_use_the_marks():
    from foodlib import suite, tuning

    assert suite.RUNTIME_FIELDS == runtime_fields()
    assert runtime_fields() <= tuning.TUNER_FIELDS


def test_marks_are_on_fields_only_and_known():
    for name, (_, leaf) in Config.field_index().items():
        assert set(leaf.metadata) <= {"runtime", "resume_free"}, name  # a misspelt key would mark nothing


@pytest.mark.parametrize("name, value", [("cache", False), ("bad_files", "fail"), ("eval_test", False),
                                         ("features", False), ("figures", False), ("workers", 0), ("epochs", 20)])
def test_resume_accepts_a_change_of_a_resume_free_field(name, value):
    saved = Config.from_flat(epochs=10).to_dict()
    check_resume_config(saved, Config.from_flat(epochs=10).with_overrides(**{name: value}), "last.pt")


@pytest.mark.parametrize("name, value", [("lr", 0.1), ("amp", "off"), ("trunk_views", 2), ("seed", 3)])
def test_resume_refuses_a_change_of_any_other_field(name, value):
    saved = Config.from_flat(epochs=10).to_dict()
    with pytest.raises(ConfigError, match=f"{name}="):
        check_resume_config(saved, Config.from_flat(epochs=10).with_overrides(**{name: value}), "last.pt")


def test_doctests_of_the_field_helpers():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for function in (runtime_fields, resume_free_fields):
        for test in finder.find(function, globs=vars(config)):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 2
