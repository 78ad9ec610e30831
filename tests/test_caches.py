"""`foodlib cache`: listing decoded caches, telling current from stale, pruning without touching caches in use.

Caches are built in child processes where the test needs them not to be in use: a process that
loaded a cache holds it (a shared lock) until it exits.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from foodlib.cli import main as cli_main
from foodlib.data.cache import _locked, build_cache, cache_key
from foodlib.data.caches import list_caches, prune_caches

REPO = Path(__file__).resolve().parents[1]
BUILD = """
import sys, time
from foodlib.data.cache import build_cache
cache_dir, hold = sys.argv[1], sys.argv[2] == "hold"
for spec in sys.argv[3:]:
    side, *paths = spec.split(",")
    build_cache(paths, int(side), cache_dir, progress=False)
if hold:
    print("ready", flush=True)
    time.sleep(60)
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


def build_elsewhere(cache_dir: Path, *builds: tuple[int, list[str]], hold: bool = False):
    """Build caches in a child process; with ``hold`` it keeps them loaded until killed (returns the process)."""
    args = [sys.executable, "-c", BUILD, str(cache_dir), "hold" if hold else "exit"]
    args += [",".join([str(side), *paths]) for side, paths in builds]
    if not hold:
        subprocess.run(args, check=True, cwd=REPO)
        return None
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "ready"
    return child


def rewrite(path: str) -> None:
    Image.new("RGB", (20, 16), (255, 255, 255)).save(path)
    os.utime(path, (time.time() + 5, time.time() + 5))


def by_key(cache_dir: Path) -> dict:
    return {e.key: e for e in list_caches(cache_dir)}


def test_listing_tells_current_from_stale_and_prune_removes_only_stale(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    whole, half = (16, photos), (24, photos[:3])
    build_elsewhere(cache_dir, whole, half)
    key_whole, key_half = cache_key(photos, 16), cache_key(photos[:3], 24)
    entries = by_key(cache_dir)
    assert set(entries) == {key_whole, key_half}
    e = entries[key_whole]
    assert (e.state, e.images, e.side, e.root, e.in_use) == ("current", 6, 16, str(tmp_path / "photos"), False)
    assert e.size_bytes == 6 * 16 * 16 * 3 and entries[key_half].size_bytes == 3 * 24 * 24 * 3

    rewrite(photos[4])  # a baklava photo: only the cache that holds baklava goes stale
    entries = by_key(cache_dir)
    assert entries[key_whole].state == "stale" and "changed" in entries[key_whole].detail
    assert entries[key_half].state == "current"

    assert cli_main(["cache", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 decoded cache(s)" in out and f"{key_whole}" in out and "removes the 1 stale" in out
    assert [e.key for e in prune_caches(cache_dir, dry_run=True)] == [key_whole]
    assert set(by_key(cache_dir)) == {key_whole, key_half}  # a dry run removes nothing

    assert cli_main(["cache", "--cache-dir", str(cache_dir), "--prune"]) == 0
    assert f"removed {key_whole}" in capsys.readouterr().out
    assert sorted(p.name for p in (cache_dir / "decoded").iterdir() if p.name.startswith(key_whole)) == []
    assert set(by_key(cache_dir)) == {key_half}
    kept = build_cache(photos[:3], 24, cache_dir, progress=False)  # still reused as it was
    assert kept.file == str(cache_dir / "decoded" / f"{key_half}.u8")


def test_gone_files_and_caches_without_a_file_list(photos, tmp_path):
    cache_dir = tmp_path / "cache"
    build_elsewhere(cache_dir, (16, photos), (24, photos))
    os.remove(photos[0])
    entries = list_caches(cache_dir)
    assert {(e.state, e.detail) for e in entries} == {("stale", "1 of 6 files are gone")}
    key = cache_key(photos[1:], 16)  # not built: only the two above exist
    assert key not in {e.key for e in entries}
    (cache_dir / "decoded" / f"{entries[0].key}.paths").unlink()  # as an older foodlib left it
    states = sorted(e.state for e in list_caches(cache_dir))
    assert states == ["stale", "unknown"]
    assert [e.state for e in prune_caches(cache_dir)] == ["stale"]  # unknown ones stay unless old


def test_a_cache_in_use_is_never_pruned(photos, tmp_path):
    cache_dir = tmp_path / "cache"
    child = build_elsewhere(cache_dir, (16, photos), hold=True)
    try:
        rewrite(photos[0])
        (entry,) = list_caches(cache_dir)
        assert entry.state == "stale" and entry.in_use
        assert prune_caches(cache_dir) == [] and prune_caches(cache_dir, older_than_days=0) == []
        assert (cache_dir / "decoded" / f"{entry.key}.u8").is_file()
    finally:
        child.kill()  # SIGKILL: the OS drops its lock
        child.wait()
    assert [e.key for e in prune_caches(cache_dir)] == [entry.key]
    assert not any((cache_dir / "decoded").iterdir())

    build_cache(photos, 16, cache_dir, progress=False)  # this process now holds the new cache
    rewrite(photos[1])
    assert [e.in_use for e in list_caches(cache_dir)] == [True] and prune_caches(cache_dir) == []


def test_unfinished_builds_are_pruned_unless_still_building(tmp_path):
    folder = tmp_path / "cache" / "decoded"
    folder.mkdir(parents=True)
    (folder / "0123456789abcdef0123.u8.tmp").write_bytes(b"\0" * 1000)  # a build killed half way
    with _locked(folder / "0123456789abcdef0123.lock"):  # as a build in progress holds it
        (entry,) = list_caches(tmp_path / "cache")
        assert (entry.state, entry.in_use, entry.size_bytes) == ("incomplete", True, 1000)
        assert prune_caches(tmp_path / "cache") == []
    assert [e.state for e in prune_caches(tmp_path / "cache")] == ["incomplete"]
    assert not any(folder.iterdir())


def test_older_than_also_removes_current_caches_left_unused(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    build_elsewhere(cache_dir, (16, photos))
    (entry,) = list_caches(cache_dir)
    forty_days_ago = time.time() - 40 * 86400
    os.utime(cache_dir / "decoded" / f"{entry.key}.json", (forty_days_ago, forty_days_ago))
    assert entry.state == "current" and prune_caches(cache_dir, older_than_days=60) == []
    assert cli_main(["cache", "--cache-dir", str(cache_dir), "--older-than", "30", "--dry-run"]) == 0
    assert "would remove 1 cache(s)" in capsys.readouterr().out
    assert [e.key for e in prune_caches(cache_dir, older_than_days=30)] == [entry.key]


def test_reuse_marks_the_last_use_and_a_new_build_mentions_the_others(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    build_elsewhere(cache_dir, (16, photos))
    meta = cache_dir / "decoded" / f"{cache_key(photos, 16)}.json"
    os.utime(meta, (1e9, 1e9))
    build_cache(photos, 16, cache_dir, progress=False)
    assert meta.stat().st_mtime > time.time() - 60  # reused: last use is now
    build_cache(photos, 24, cache_dir, progress=True)
    err = capsys.readouterr().out  # a foodlib log record (stdout by default)
    assert f"1 other decoded cache(s) of {tmp_path / 'photos'} take 5 kB" in err and "foodlib cache --prune" in err


def test_an_interrupted_build_is_not_left_in_use(photos, tmp_path, monkeypatch):
    import foodlib.data.cache as cache_module

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
    assert (entry.state, entry.in_use) == ("incomplete", False)
    assert [e.key for e in prune_caches(tmp_path / "cache")] == [entry.key]
    assert not any((tmp_path / "cache" / "decoded").iterdir())  # lock files swept too


def test_a_cache_rebuilt_after_its_folder_was_deleted_is_held_again(photos, tmp_path):
    import shutil

    build_cache(photos, 16, tmp_path / "cache", progress=False)
    shutil.rmtree(tmp_path / "cache")  # by hand, while this process still runs
    build_cache(photos, 16, tmp_path / "cache", progress=False)
    rewrite(photos[0])
    (entry,) = list_caches(tmp_path / "cache")
    assert entry.state == "stale" and entry.in_use and prune_caches(tmp_path / "cache", older_than_days=0) == []


def test_relative_or_vanished_sources_are_not_judged_stale(photos, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p) for p in photos]
    build_elsewhere(cache_dir, (16, photos))
    subprocess.run([sys.executable, "-c", BUILD, str(cache_dir), "exit", ",".join(["24", *relative])],
                   check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    details = {e.side: (e.state, e.detail) for e in list_caches(cache_dir)}
    assert details[24] == ("unknown", "built from relative paths: cannot be checked from here")
    os.rename(tmp_path / "photos", tmp_path / "moved")  # or an unmounted drive
    details = {e.side: (e.state, e.detail) for e in list_caches(cache_dir)}
    assert details[16][0] == "unknown" and "none of its 6 files is there" in details[16][1]
    assert prune_caches(cache_dir) == []
