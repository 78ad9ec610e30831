"""The data scanner: each problem kind on a tree the test builds, caching, and the CLI entry."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foodlib.data import scan as scan_module
from foodlib.data.scan import PROBLEM_KINDS, ScanReport, main_data_check, scan_cached, scan_dataset


def _noise(width=48, height=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path: Path, pixels: np.ndarray, mode=None, fmt=None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, format=fmt, **kw)
    return path


def _jpeg_bytes(seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(120, 100, seed)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _corrupt_png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(seed=9)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.find(b"IDAT") + 20
    data[start : start + 40] = bytes(b ^ 0x5A for b in data[start : start + 40])  # scramble the pixels
    return bytes(data)


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    """One of each problem, plus clean files. Returns the dataset root."""
    root = tmp_path / "food"
    train, test = root / "train", root / "test"
    _save(train / "apple" / "good.png", _noise(seed=1))
    shutil.copy(train / "apple" / "good.png", train / "apple" / "good_again.png")  # duplicate in split
    (train / "apple" / "cut.jpg").write_bytes(_jpeg_bytes()[:2000])  # truncated
    (train / "apple" / "scrambled.png").write_bytes(_corrupt_png_bytes())  # corrupt
    (train / "apple" / "empty.jpg").write_bytes(b"")  # zero-byte
    (train / "apple" / "page.jpg").write_text("<html><body>404</body></html>")  # not an image
    _save(train / "apple" / "really_png.jpg", _noise(seed=2), fmt="PNG")  # wrong extension
    (train / "apple" / "notes.txt").write_text("picked on a Tuesday")  # not indexed
    _save(train / "banana" / "grey.png", _noise(seed=3)[..., 0], "L")  # unusual mode
    _save(train / "banana" / "print.jpg", np.full((40, 48, 4), 60, np.uint8), "CMYK")  # unusual mode
    _save(train / "banana" / "cutout.png", np.full((40, 48, 4), 90, np.uint8), "RGBA")  # unusual mode
    _save(train / "banana" / "deep.png", np.full((40, 48), 40000, np.uint16))  # unusual mode (16-bit)
    _save(train / "banana" / "indexed.gif", _noise(seed=10))  # unusual mode (GIF stores a palette)
    _save(train / "banana" / "thumb.png", _noise(10, 12, seed=4))  # tiny (short side 10)
    _save(train / "banana" / "poster.png", _noise(200, 150, seed=5))  # huge for max_pixels=20_000
    (train / "cherry").mkdir()
    (train / "cherry" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored; cherry is empty
    _save(train / "loose.png", _noise(seed=6))  # stray: outside any class folder
    (test / "apple").mkdir(parents=True)
    shutil.copy(train / "apple" / "good.png", test / "apple" / "leak.png")  # leaks into test
    _save(test / "banana" / "fine.png", _noise(seed=7))
    _save(test / "date" / "only_in_test.png", _noise(seed=8))  # date: missing from train
    return root


def _paths(problems) -> list[str]:
    return sorted(p.path for p in problems)


def test_each_problem_kind_is_found(messy_tree):
    report = scan_dataset(messy_tree, max_pixels=20_000, progress=False, workers=2)
    kinds = {kind: _paths(report.by_kind(kind)) for kind in PROBLEM_KINDS}
    assert kinds["truncated"] == ["train/apple/cut.jpg"]
    assert kinds["corrupt"] == ["train/apple/scrambled.png"]
    assert kinds["zero_byte"] == ["train/apple/empty.jpg"]
    assert kinds["not_image"] == ["train/apple/page.jpg"]
    assert kinds["wrong_extension"] == ["train/apple/really_png.jpg"]
    assert kinds["not_image_extension"] == ["train/apple/notes.txt"]
    assert kinds["unusual_mode"] == [
        "train/banana/cutout.png", "train/banana/deep.png", "train/banana/grey.png",
        "train/banana/indexed.gif", "train/banana/print.jpg",
    ]
    assert kinds["tiny"] == ["train/banana/thumb.png"]
    assert kinds["huge"] == ["train/banana/poster.png"]  # 200 * 150 = 30,000 > 20,000
    assert kinds["stray_file"] == ["train/loose.png"]
    assert kinds["duplicate"] == ["train/apple/good_again.png"]
    assert kinds["duplicate_across_splits"] == ["test/apple/leak.png"]
    assert kinds["empty_class"] == ["train/cherry"]
    assert kinds["missing_class"] == ["test/cherry", "train/date"]
    assert kinds["unreadable"] == []  # cannot be provoked when tests run as root

    # the details say what was found
    mode_details = " ".join(p.detail for p in report.by_kind("unusual_mode"))
    for words in ("mode L", "CMYK", "mode RGBA", "16-bit", "mode P"):
        assert words in mode_details
    assert "PNG" in report.by_kind("wrong_extension")[0].detail
    assert "HTML" in report.by_kind("not_image")[0].detail
    assert "train/apple/good.png" in report.by_kind("duplicate_across_splits")[0].detail


def test_severities_bad_files_and_counts(messy_tree):
    report = scan_dataset(messy_tree, max_pixels=20_000, progress=False)
    severity = {(p.kind, p.path): p.severity for p in report.problems}
    assert severity[("truncated", "train/apple/cut.jpg")] == "error"
    assert severity[("unusual_mode", "train/banana/grey.png")] == "warning"
    # a class without training images is an error; one missing from test only a warning
    assert severity[("missing_class", "train/date")] == "error"
    assert severity[("missing_class", "test/cherry")] == "warning"
    assert severity[("empty_class", "train/cherry")] == "error"

    root = messy_tree.absolute()
    expected_bad = ["train/apple/cut.jpg", "train/apple/empty.jpg", "train/apple/page.jpg", "train/apple/scrambled.png"]
    assert report.bad_files == [root / p for p in expected_bad]
    assert not report.ok
    # usable images per class: apple keeps good, good_again, really_png; banana all seven
    assert report.counts["train"] == {"apple": 3, "banana": 7, "cherry": 0}
    assert report.counts["test"] == {"apple": 1, "banana": 1, "date": 1}
    assert report.ignored == ["train/cherry/.DS_Store"]
    assert report.files_scanned == 19  # hidden files are not counted
    assert report.summary["unusual_mode"] == 5 and report.summary["truncated"] == 1
    assert sum(report.summary.values()) == len(report.problems)


def test_empty_class_in_test_split_is_a_warning(tmp_path):
    _save(tmp_path / "train" / "a" / "x.png", _noise())
    _save(tmp_path / "train" / "b" / "y.png", _noise(seed=1))
    _save(tmp_path / "test" / "a" / "z.png", _noise(seed=2))
    (tmp_path / "test" / "b").mkdir()
    (tmp_path / "README.md").write_text("beside the splits: ignored, not a problem")
    report = scan_dataset(tmp_path, progress=False)
    [problem] = report.problems
    assert (problem.kind, problem.path, problem.severity) == ("empty_class", "test/b", "warning")
    assert report.ok and report.bad_files == []
    assert report.ignored == ["README.md"]


def test_flat_layout_and_clean_dataset(tmp_path):
    _save(tmp_path / "a" / "x.png", _noise())
    _save(tmp_path / "b" / "nested" / "y.jpg", _noise(seed=1))  # sub-folders belong to the class
    report = scan_dataset(tmp_path, progress=False)
    assert report.layout == "flat"
    assert report.counts == {"": {"a": 1, "b": 1}}
    assert report.problems == [] and report.ok
    assert "no problems found" in report.to_text()


def test_report_round_trips_through_json(messy_tree):
    report = scan_dataset(messy_tree, progress=False)
    data = json.loads(report.to_json())
    assert data["summary"] == report.summary
    assert data["bad_files"] == [str(p) for p in report.bad_files]
    again = ScanReport.from_dict(data)
    assert again.problems == report.problems and again.counts == report.counts


def test_to_text_lists_every_kind(messy_tree):
    report = scan_dataset(messy_tree, max_pixels=20_000, progress=False)
    text = report.to_text(max_per_kind=1)
    for kind in report.summary:
        assert kind in text
    assert "train/apple/cut.jpg" in text
    assert "... and 4 more" in text  # five unusual modes, one shown


def test_scan_cached_reuses_then_invalidates(messy_tree, tmp_path, monkeypatch):
    calls = []
    real_scan = scan_module.scan_dataset
    monkeypatch.setattr(scan_module, "scan_dataset", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    cache = tmp_path / "cache"
    first = scan_cached(messy_tree, cache, progress=False)
    second = scan_cached(messy_tree, cache, progress=False)
    assert len(calls) == 1 and second.problems == first.problems
    # other options are another key
    scan_cached(messy_tree, cache, progress=False, min_size=5)
    assert len(calls) == 2
    # repairing a file (new size and time) invalidates
    fixed = messy_tree / "train" / "apple" / "cut.jpg"
    fixed.write_bytes(_jpeg_bytes(seed=1))
    os.utime(fixed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = scan_cached(messy_tree, cache, progress=False)
    assert len(calls) == 3
    assert third.by_kind("truncated") == []


def test_main_data_check_exit_codes_and_output(messy_tree, tmp_path, capsys):
    assert main_data_check(messy_tree, progress=False) == 0
    assert "train/apple/cut.jpg" in capsys.readouterr().out
    assert main_data_check(messy_tree, fail_on_error=True, progress=False) == 1
    capsys.readouterr()
    assert main_data_check(messy_tree, as_json=True, progress=False) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["zero_byte"] == 1
    assert main_data_check(tmp_path / "nowhere", progress=False) == 2
    assert "not a folder" in capsys.readouterr().err

    clean = tmp_path / "clean"
    _save(clean / "a" / "x.png", _noise())
    assert main_data_check(clean, fail_on_error=True, progress=False) == 0


def test_missing_root_raises_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_dataset(tmp_path / "nowhere", progress=False)


FOOD101 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "food101-10"


@pytest.mark.slow
@pytest.mark.skipif(not FOOD101.is_dir(), reason="real photos ../shared/data/food101-10 not present")
def test_food101_10_has_one_greyscale_file_and_no_errors():
    started = time.perf_counter()
    report = scan_dataset(FOOD101, progress=False)
    print(f"scanned {report.files_scanned} files in {time.perf_counter() - started:.1f} s")
    assert report.files_scanned == 5000
    assert report.errors == []
    modes = report.by_kind("unusual_mode")
    assert [p.path for p in modes] == ["train/bread_pudding/1375816.jpg"]
    assert "mode L" in modes[0].detail
