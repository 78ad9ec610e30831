"""`foodlib cache`: listing decoded caches, telling current from stale, and the prune rule.

Prune removes unfinished builds nobody is running, stale or corrupt caches not used for an hour, and
(with ``older_than_days``) any cache unused that long. "Last use" is the ``.json`` file's mtime, set
when a cache is opened and at every epoch; tests age a cache by setting that mtime back.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import foodlib.data.cache as cache_module
from foodlib.cli import main as cli_main
from foodlib.data.cache import (RECENT_USE_S, build_cache, build_lock, cache_key, list_caches, mark_used,
                                prune_caches)
from foodlib.data.loader import BatchLoader, ImageSource

REPO = Path(__file__).resolve().parents[1]
BUILD = """
import sys
from foodlib.data.cache import build_cache
cache_dir = sys.argv[1]
for spec in sys.argv[2:]:
    side, *paths = spec.split(",")
    build_cache(paths, int(side), cache_dir, progress=False)
"""


@pytest.fixture
def photos(tmp_path) -> list[str]:
    paths = []
    for c, cls in enumerate(("apple_pie", "baklava")):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            path = tmp_path / "photos" / cls / f"{i}.png"
            Image.new("RGB", (20, 16), (40 * i, 100 * c, 0)).save(path)
            paths.append(str(path))
    return paths


def rewrite(path: str) -> None:
    Image.new("RGB", (20, 16), (255, 255, 255)).save(path)
    os.utime(path, (time.time() + 5, time.time() + 5))


def last_used_ago(cache_dir: Path, key: str, seconds: float) -> None:
    """Set a cache's last use ``seconds`` back (its ``.json`` mtime)."""
    then = time.time() - seconds
    os.utime(cache_dir / "decoded" / f"{key}.json", (then, then))


def by_key(cache_dir: Path) -> dict:
    return {e.key: e for e in list_caches(cache_dir)}


def test_listing_tells_current_from_stale_and_prune_removes_only_stale(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    build_cache(photos, 16, cache_dir, progress=False)
    build_cache(photos[:3], 24, cache_dir, progress=False)
    key_whole, key_half = cache_key(photos, 16), cache_key(photos[:3], 24)
    entries = by_key(cache_dir)
    assert set(entries) == {key_whole, key_half}
    e = entries[key_whole]
    assert (e.state, e.images, e.side, e.root, e.building) == ("current", 6, 16, str(tmp_path / "photos"), False)
    assert e.size_bytes == 6 * 16 * 16 * 3 and entries[key_half].size_bytes == 3 * 24 * 24 * 3

    rewrite(photos[4])  # a baklava photo: only the cache that holds baklava goes stale
    entries = by_key(cache_dir)
    assert entries[key_whole].state == "stale" and "changed" in entries[key_whole].detail
    assert entries[key_half].state == "current"
    for key in (key_whole, key_half):
        last_used_ago(cache_dir, key, 2 * RECENT_USE_S)
    (cache_dir / "decoded" / f"{key_whole}.use").touch()  # an in-use lock file of an older foodlib

    assert cli_main(["cache", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 decoded cache(s)" in out and f"{key_whole}" in out and "removes the 1 stale" in out
    assert [e.key for e in prune_caches(cache_dir, dry_run=True)] == [key_whole]
    assert set(by_key(cache_dir)) == {key_whole, key_half}  # a dry run removes nothing
    assert cli_main(["cache", "--cache-dir", str(cache_dir), "--prune", "--dry-run"]) == 0
    assert f"would remove {key_whole}" in capsys.readouterr().out
    assert set(by_key(cache_dir)) == {key_whole, key_half}

    assert cli_main(["cache", "--cache-dir", str(cache_dir), "--prune"]) == 0
    assert f"removed {key_whole}" in capsys.readouterr().out
    assert sorted(p.name for p in (cache_dir / "decoded").iterdir() if p.name.startswith(key_whole)) == []
    assert set(by_key(cache_dir)) == {key_half}
    kept = build_cache(photos[:3], 24, cache_dir, progress=False)  # still reused as it was
    assert kept.file == str(cache_dir / "decoded" / f"{key_half}.u8")


def test_a_recently_used_cache_is_kept_even_when_stale(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    build_cache(photos, 16, cache_dir, progress=False)  # used just now: a process may still be reading it
    rewrite(photos[0])
    (entry,) = list_caches(cache_dir)
    assert entry.state == "stale" and not entry.building
    assert prune_caches(cache_dir) == []
    assert cli_main(["cache", "--cache-dir", str(cache_dir)]) == 0
    assert "1 stale or corrupt one(s) used in the last 1 hour(s) are kept" in capsys.readouterr().out
    last_used_ago(cache_dir, entry.key, RECENT_USE_S - 60)
    assert prune_caches(cache_dir) == []
    last_used_ago(cache_dir, entry.key, RECENT_USE_S + 60)
    assert [e.key for e in prune_caches(cache_dir)] == [entry.key]


def test_a_fresh_current_cache_is_never_pruned(photos, tmp_path):
    cache_dir = tmp_path / "cache"
    build_cache(photos, 16, cache_dir, progress=False)
    assert prune_caches(cache_dir) == [] and prune_caches(cache_dir, older_than_days=1) == []
    assert [e.state for e in list_caches(cache_dir)] == ["current"]


def test_gone_files_and_caches_without_a_file_list(photos, tmp_path):
    cache_dir = tmp_path / "cache"
    build_cache(photos, 16, cache_dir, progress=False)
    build_cache(photos, 24, cache_dir, progress=False)
    os.remove(photos[0])
    entries = list_caches(cache_dir)
    assert {(e.state, e.detail) for e in entries} == {("stale", "1 of 6 files are gone")}
    key = cache_key(photos[1:], 16)  # not built: only the two above exist
    assert key not in {e.key for e in entries}
    for e in entries:
        last_used_ago(cache_dir, e.key, 2 * RECENT_USE_S)
    (cache_dir / "decoded" / f"{entries[0].key}.paths").unlink()  # as an older foodlib left it
    states = sorted(e.state for e in list_caches(cache_dir))
    assert states == ["stale", "unknown"]
    assert [e.state for e in prune_caches(cache_dir)] == ["stale"]  # unknown ones stay unless old


def test_unfinished_builds_are_pruned_unless_still_building(tmp_path):
    folder = tmp_path / "cache" / "decoded"
    folder.mkdir(parents=True)
    (folder / "0123456789abcdef0123.u8.tmp").write_bytes(b"\0" * 1000)  # a build killed half way
    with build_lock(folder / "0123456789abcdef0123.lock"):  # as a build in progress holds it
        (entry,) = list_caches(tmp_path / "cache")
        assert (entry.state, entry.building, entry.size_bytes) == ("incomplete", True, 1000)
        assert prune_caches(tmp_path / "cache") == [] and prune_caches(tmp_path / "cache", older_than_days=0) == []
    assert [e.state for e in prune_caches(tmp_path / "cache")] == ["incomplete"]
    assert not any(folder.iterdir())


def test_a_build_held_by_another_process_is_not_pruned(tmp_path):
    folder = tmp_path / "cache" / "decoded"
    folder.mkdir(parents=True)
    (folder / "0123456789abcdef0123.u8.tmp").write_bytes(b"\0" * 10)
    hold = ("import sys, time\nfrom filelock import FileLock\n"
            "with FileLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", hold, str(folder / "0123456789abcdef0123.lock")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert prune_caches(tmp_path / "cache") == [] and (folder / "0123456789abcdef0123.u8.tmp").exists()
    finally:
        child.kill()  # SIGKILL: the OS drops its lock
        child.wait()
    assert [e.state for e in prune_caches(tmp_path / "cache")] == ["incomplete"]


def test_older_than_also_removes_current_caches_left_unused(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    build_cache(photos, 16, cache_dir, progress=False)
    (entry,) = list_caches(cache_dir)
    last_used_ago(cache_dir, entry.key, 40 * 86400)
    assert entry.state == "current" and prune_caches(cache_dir, older_than_days=60) == []
    assert cli_main(["cache", "--cache-dir", str(cache_dir), "--older-than", "30", "--dry-run"]) == 0
    assert "would remove 1 cache(s)" in capsys.readouterr().out
    assert [e.key for e in prune_caches(cache_dir, older_than_days=30)] == [entry.key]


def test_a_cache_opened_after_the_listing_is_not_removed(photos, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    decoded = build_cache(photos, 16, cache_dir, progress=False)
    (entry,) = list_caches(cache_dir)
    last_used_ago(cache_dir, entry.key, 40 * 86400)
    listing = cache_module.list_caches

    def then_opened(*args):  # another process opens it between prune's listing and the removal
        entries = listing(*args)
        mark_used(decoded.file)
        return entries

    monkeypatch.setattr(cache_module, "list_caches", then_opened)
    assert prune_caches(cache_dir, older_than_days=30) == []
    assert Path(decoded.file).is_file()


def test_reuse_and_every_epoch_mark_the_last_use_and_a_new_build_mentions_the_others(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    subprocess.run([sys.executable, "-c", BUILD, str(cache_dir), ",".join(["16", *photos])], check=True, cwd=REPO)
    meta = cache_dir / "decoded" / f"{cache_key(photos, 16)}.json"
    os.utime(meta, (1e9, 1e9))
    decoded = build_cache(photos, 16, cache_dir, progress=False)
    assert meta.stat().st_mtime > time.time() - 60  # reused: last use is now
    os.utime(meta, (1e9, 1e9))
    loader = BatchLoader(ImageSource(photos, 16, decoded), np.arange(6), batch_size=3, shuffle=False)
    assert len(list(loader)) == 2 and meta.stat().st_mtime > time.time() - 60  # an epoch: used now
    build_cache(photos, 24, cache_dir, progress=True)
    err = capsys.readouterr().out  # a foodlib log record (stdout by default)
    assert f"1 other decoded cache(s) of {tmp_path / 'photos'} take 5 kB" in err and "foodlib cache --prune" in err


def test_an_interrupted_build_is_pruned_with_its_lock_file(photos, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = cache_module.load_image_array

    def interrupted(path, side):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in a notebook, half way through the build
        return real(path, side)

    monkeypatch.setattr(cache_module, "load_image_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(photos, 16, tmp_path / "cache", workers=1, progress=False)
    (entry,) = list_caches(tmp_path / "cache")
    assert (entry.state, entry.building) == ("incomplete", False)
    assert [e.key for e in prune_caches(tmp_path / "cache")] == [entry.key]
    assert not any((tmp_path / "cache" / "decoded").iterdir())  # lock files swept too


def test_a_process_keeps_reading_a_cache_pruned_under_it(photos, tmp_path):
    """Why no "in use" lock is needed: a memory-mapped cache stays readable after its files are removed."""
    if sys.platform == "win32":
        pytest.skip("Windows does not delete a mapped file: prune skips it there")
    cache_dir = tmp_path / "cache"
    decoded = build_cache(photos, 16, cache_dir, progress=False)
    before = np.array(decoded.array)
    rewrite(photos[0])
    last_used_ago(cache_dir, Path(decoded.file).stem, 2 * RECENT_USE_S)
    assert len(prune_caches(cache_dir)) == 1 and not Path(decoded.file).exists()
    assert np.array_equal(np.asarray(decoded.array), before)


def test_relative_or_vanished_sources_are_not_judged_stale(photos, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p) for p in photos]
    build_cache(photos, 16, cache_dir, progress=False)
    build_cache(relative, 24, cache_dir, progress=False)
    details = {e.side: (e.state, e.detail) for e in list_caches(cache_dir)}
    assert details[24] == ("unknown", "built from relative paths: cannot be checked from here")
    os.rename(tmp_path / "photos", tmp_path / "moved")  # or an unmounted drive
    details = {e.side: (e.state, e.detail) for e in list_caches(cache_dir)}
    assert details[16][0] == "unknown" and "none of its 6 files is there" in details[16][1]
    for e in list_caches(cache_dir):
        last_used_ago(cache_dir, e.key, 2 * RECENT_USE_S)
    assert prune_caches(cache_dir) == []
