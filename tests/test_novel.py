"""Held-out (novel) classes: chosen reproducibly, never in training or val, pooled for open-set tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from foodlib.config import Config, ConfigError
from foodlib.data import index_dataset, index_dataset_and_novel, load_data
from foodlib.data.folders import DatasetIndex, Split
from foodlib.data.novel import choose_novel_classes, hold_out_classes


def _cfg(**kw):
    base = dict(data="dishes", dishes_classes=6, dishes_per_class=12, image_size=16)
    return Config.from_flat(**{**base, **kw})


def test_count_is_deterministic_in_split_seed_and_not_the_training_seed():
    classes = [f"c{i}" for i in range(20)]
    first = choose_novel_classes(classes, 5, seed=0)
    assert first == choose_novel_classes(classes, 5, seed=0)
    assert len(set(first)) == 5 and set(first) <= set(classes) and first == sorted(first)
    assert any(choose_novel_classes(classes, 5, seed=s) != first for s in range(1, 6))


@pytest.mark.parametrize("novel, message", [(1, "between 2"), (5, "between 2"), (["zz", "a"], "not classes"),
                                            (["a", "a"], "twice")])
def test_bad_choices_name_the_value(novel, message):
    with pytest.raises(ValueError, match=message):
        choose_novel_classes(["a", "b", "c", "d", "e", "f"][:4], novel, seed=0)


def test_hold_out_relabels_known_and_pools_every_split():
    index = DatasetIndex("/d", ["a", "b", "c", "d"], {
        "train": Split(["/t/a", "/t/b", "/t/c", "/t/d"], np.array([0, 1, 2, 3])),
        "test": Split(["/s/b", "/s/c"], np.array([1, 2])),
    })
    known, pool = hold_out_classes(index, ["c", "a"], seed=0)
    assert known.classes == ["b", "d"] and pool.classes == ["a", "c"]
    assert known.splits["train"].paths == ["/t/b", "/t/d"] and known.splits["train"].labels.tolist() == [0, 1]
    assert known.splits["test"].paths == ["/s/b"] and known.splits["test"].labels.tolist() == [0]
    assert pool.splits["novel"].paths == ["/t/a", "/t/c", "/s/c"]
    assert pool.splits["novel"].labels.tolist() == [0, 1, 1]


def test_config_accepts_a_count_or_names():
    assert Config.from_flat(novel_classes="3").data.novel_classes == 3
    cfg = Config.from_flat(novel_classes="pho, ramen")
    assert cfg.data.novel_classes == ["pho", "ramen"] and Config.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match="novel_classes"):
        Config.from_flat(novel_classes=1)


def test_without_novel_classes_the_index_is_unchanged():
    cfg = _cfg()
    index, novel = index_dataset_and_novel(cfg)
    assert novel is None and cfg.data.novel_classes is None
    assert index.classes == index_dataset(cfg).classes and len(index.classes) == 6


def test_novel_classes_never_reach_the_training_or_val_loaders(tmp_path):
    cfg = _cfg(novel_classes=3, split_seed=4)
    data = load_data(cfg, run_dir=tmp_path, progress=False)
    everything = index_dataset(_cfg())
    novel_names = data.novel.classes
    assert len(novel_names) == 3 and set(novel_names).isdisjoint(data.classes) and len(data.classes) == 3
    for split in ("train", "val", "test"):
        loader = data.loader(split, batch_size=8, shuffle=split == "train", drop_last=False)
        seen = np.concatenate([labels.numpy() for _, labels in loader])
        assert set(seen.tolist()) <= set(range(3)), split  # only the 3 known labels reach the network
        names = {Path(p).parent.name for p in data.index.splits[split].paths}
        assert names.isdisjoint(novel_names), split
    pool = data.novel.splits["novel"]
    every_novel_file = {p for s in everything.splits.values() for p, y in zip(s.paths, s.labels)
                        if everything.classes[y] in novel_names}
    assert set(pool.paths) == every_novel_file  # all images of the novel classes, from every split
    images, labels = next(iter(data.loader("novel", batch_size=len(pool), shuffle=False)))
    assert images.shape[0] == len(pool) and labels.tolist() == pool.labels.tolist()
    written = (tmp_path / "splits" / "novel.txt").read_text().splitlines()
    assert {line.split("\t")[1] for line in written} == set(novel_names)
    assert json.loads((tmp_path / "novel_classes.json").read_text()) == novel_names
    assert data.novel.classes == index_dataset_and_novel(_cfg(novel_classes=3, split_seed=4, seed=9))[1].classes
