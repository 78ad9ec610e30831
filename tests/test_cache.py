"""The decoded-image cache (foodlib.data.cache): reuse, staleness, identical pixels; and batch loading from it
(foodlib.data.loader)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import foodlib.data.cache as cache_module
from foodlib.data.augment import eval_transform
from foodlib.data.cache import build_cache, cache_key
from foodlib.data.images import load_image_array
from foodlib.data.loader import BatchLoader, ImageSource


def write_image(path, colour, size=(24, 16), fmt=None):
    """A flat image of ``colour`` with a different top-left quarter, so crops and resizes are visible."""
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    pixels[: size[1] // 2, : size[0] // 2] = (255 - np.asarray(colour)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return str(path)


@pytest.fixture
def photos(tmp_path):
    """Four small images in three formats; .ppm has a fixed byte size for a given width and height."""
    return [
        write_image(tmp_path / "photos" / "a.png", (200, 30, 30)),
        write_image(tmp_path / "photos" / "b.png", (30, 200, 30)),
        write_image(tmp_path / "photos" / "c.ppm", (30, 30, 200)),
        write_image(tmp_path / "photos" / "d.jpg", (120, 120, 20), size=(40, 30)),
    ]


@pytest.fixture
def decode_calls(monkeypatch):
    """Count the decodes build_cache performs (it runs them in threads)."""
    calls: list[str] = []
    lock = threading.Lock()

    def counting(path, side):
        with lock:
            calls.append(str(path))
        return load_image_array(path, side)

    monkeypatch.setattr(cache_module, "load_image_array", counting)
    return calls


# ----- reuse and staleness ----------------------------------------------------------------------

def test_cache_holds_the_decoded_images_in_order(photos, tmp_path):
    decoded = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert decoded.array.shape == (4, 8, 8, 3) and decoded.array.dtype == np.uint8
    for row, path in enumerate(photos):
        assert np.array_equal(decoded.array[row], load_image_array(path, 8))
    assert decoded.errors == {} and decoded.side == 8
    assert decoded.rows() == {p: i for i, p in enumerate(photos)}


def test_unchanged_files_reuse_the_cache_without_decoding(photos, tmp_path, decode_calls):
    first = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert len(decode_calls) == 4
    again = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert len(decode_calls) == 4  # nothing decoded the second time
    assert again.file == first.file
    assert np.array_equal(np.asarray(again.array), np.asarray(first.array))


def test_touching_a_file_rebuilds_the_cache(photos, tmp_path, decode_calls):
    first = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    stat = os.stat(photos[1])
    os.utime(photos[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touch: mtime + 1 s
    rebuilt = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert rebuilt.file != first.file
    assert len(decode_calls) == 8  # every file decoded again: a rebuild, not a partial patch


def test_rewritten_content_is_seen_even_with_the_old_size_and_mtime(photos, tmp_path):
    # .ppm of the same width and height has the same byte size; restoring the mtime afterwards
    # (as cp -p or rsync -a do) leaves only the inode change time to tell the files apart.
    target = photos[2]
    before = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    stat = os.stat(target)
    time.sleep(0.05)  # file times have a clock-tick granularity
    write_image(tmp_path / "photos" / "c.ppm", (250, 250, 0))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(target).st_size == stat.st_size and os.stat(target).st_mtime_ns == stat.st_mtime_ns
    after = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert after.file != before.file
    assert np.array_equal(after.array[2], load_image_array(target, 8))  # the new pixels
    assert not np.array_equal(after.array[2], before.array[2])
    assert np.array_equal(after.array[:2], before.array[:2])


def test_new_files_and_another_side_change_the_key(photos, tmp_path):
    base = cache_key(photos, 8)
    extra = write_image(tmp_path / "photos" / "e.png", (9, 9, 9))
    assert cache_key(photos + [extra], 8) != base
    assert cache_key(photos[:3], 8) != base
    assert cache_key(list(reversed(photos)), 8) != base  # row order is part of the cache
    assert cache_key(photos, 9) != base
    assert cache_key(photos, 8) == base
    small = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    large = build_cache(photos, side=12, cache_dir=tmp_path / "cache", progress=False)
    assert small.array.shape[1:3] == (8, 8) and large.array.shape[1:3] == (12, 12)
    assert small.file != large.file


def test_new_data_gets_its_own_cache(photos, tmp_path, decode_calls):
    build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    extra = write_image(tmp_path / "photos" / "e.png", (9, 9, 9))
    grown = build_cache(photos + [extra], side=8, cache_dir=tmp_path / "cache", progress=False)
    assert grown.array.shape == (5, 8, 8, 3)
    assert np.array_equal(grown.array[4], load_image_array(extra, 8))
    assert len(decode_calls) == 4 + 5


def test_a_truncated_or_unfinished_cache_is_rebuilt(photos, tmp_path, decode_calls):
    first = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    with open(first.file, "r+b") as handle:  # a crash mid-write leaves a short file
        handle.truncate(100)
    again = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert len(decode_calls) == 8
    assert np.array_equal(again.array[3], load_image_array(photos[3], 8))
    os.remove(first.file[: -len(".u8")] + ".json")  # data without its metadata: also not trusted
    build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    assert len(decode_calls) == 12


def test_unreadable_files_are_listed_and_stored_black(photos, tmp_path):
    broken = tmp_path / "photos" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    decoded = build_cache(photos + [str(broken)], side=8, cache_dir=tmp_path / "cache", progress=False)
    assert list(decoded.errors) == [str(broken)]
    assert not decoded.array[4].any()
    reused = build_cache(photos + [str(broken)], side=8, cache_dir=tmp_path / "cache", progress=False)
    assert reused.errors == decoded.errors  # the errors survive reuse (kept in the metadata)


def test_parallel_build_equals_a_serial_one(photos, tmp_path):
    serial = build_cache(photos, side=8, cache_dir=tmp_path / "one", workers=1, progress=False)
    parallel = build_cache(photos, side=8, cache_dir=tmp_path / "two", workers=3, progress=False)
    assert np.array_equal(np.asarray(serial.array), np.asarray(parallel.array))



BUILD_SLOWLY = """
import sys, time
import foodlib.data.cache as cache
real = cache._decode_into

def slow(*args, **kwargs):  # a build long enough for the two processes to overlap
    with open(sys.argv[2], "a") as log:
        log.write("decoded\\n")
    time.sleep(1.5)
    return real(*args, **kwargs)

cache._decode_into = slow
print(cache.build_cache(sys.argv[3:], 8, sys.argv[1], progress=False).file, flush=True)
"""


def test_two_processes_building_one_cache_decode_it_once(photos, tmp_path):
    log = tmp_path / "decodes.log"
    args = [sys.executable, "-c", BUILD_SLOWLY, str(tmp_path / "cache"), str(log), *photos]
    repo = Path(__file__).resolve().parents[1]
    children = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=repo) for _ in range(2)]
    files = [child.communicate(timeout=120)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert files[0] == files[1] and log.read_text() == "decoded\n"  # the second waited, then reused it

# ----- cached and uncached pipelines see the same pixels ----------------------------------------

def test_cached_and_uncached_sources_give_identical_eval_tensors(photos, tmp_path):
    decoded = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    rows = np.array([2, 0, 3])  # a split holding three of the files, in its own order
    paths = [photos[r] for r in rows]
    cached = ImageSource(paths, 8, decoded, rows)
    uncached = ImageSource(paths, 8, None)
    batch = np.array([1, 2, 0])
    from_cache = eval_transform(torch.from_numpy(np.ascontiguousarray(cached.get_batch(batch))), 7)
    from_files = eval_transform(torch.from_numpy(uncached.get_batch(batch)), 7)
    assert torch.equal(from_cache, from_files)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(cached.get_batch(batch))),
                       torch.from_numpy(np.stack([load_image_array(paths[i], 8) for i in batch])))


def test_real_photos_cached_and_uncached_give_identical_eval_tensors(food101_10, tmp_path):
    paths = sorted(str(p) for p in (food101_10 / "train" / "bread_pudding").glob("*.jpg"))[:6]
    paths.append(str(food101_10 / "train" / "bread_pudding" / "1375816.jpg"))  # the greyscale one
    decoded = build_cache(paths, side=73, cache_dir=tmp_path / "cache", progress=False)
    loaders = [BatchLoader(ImageSource(paths, 73, cached), np.arange(len(paths)), batch_size=4, shuffle=False)
               for cached in (decoded, None)]
    batches = [[eval_transform(images, 64) for images, _ in loader] for loader in loaders]
    assert len(batches[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*batches))


# ----- the batch loader ---------------------------------------------------------------------------

def labelled_source(n: int, tmp_path) -> tuple[ImageSource, np.ndarray]:
    """A cached source whose image i is filled with the value i, so batches reveal their rows."""
    array = np.lib.format.open_memmap(tmp_path / "rows.npy", mode="w+", dtype=np.uint8, shape=(n, 2, 2, 3))
    array[:] = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    array.flush()
    decoded = cache_module.DecodedImages([f"img{i}" for i in range(n)], array, {}, None)
    return ImageSource(decoded.paths, 2, decoded), np.arange(n) % 3


def test_loader_order_depends_on_seed_and_epoch_only(tmp_path):
    source, labels = labelled_source(20, tmp_path)
    loader = BatchLoader(source, labels, batch_size=6, shuffle=True, seed=4, drop_last=True)
    epoch0 = [b.tolist() for b in loader.batches()]
    assert len(epoch0) == 3 and all(len(b) == 6 for b in epoch0)  # 20 // 6, the remainder dropped
    assert len(set(sum(epoch0, []))) == 18  # no row twice
    loader.set_epoch(1)
    assert [b.tolist() for b in loader.batches()] != epoch0
    other = BatchLoader(source, labels, batch_size=6, shuffle=True, seed=4, drop_last=True)
    assert [b.tolist() for b in other.batches()] == epoch0  # a new loader (a resumed run) replays it
    images, batch_labels = next(iter(other))
    assert images.dtype == torch.uint8 and images.shape == (6, 2, 2, 3)
    assert images[:, 0, 0, 0].tolist() == epoch0[0]  # image i holds the value i
    assert batch_labels.tolist() == [i % 3 for i in epoch0[0]]


def test_evaluation_loader_keeps_order_and_the_last_partial_batch(tmp_path):
    source, labels = labelled_source(7, tmp_path)
    loader = BatchLoader(source, labels, batch_size=3, shuffle=False)
    assert [images[:, 0, 0, 0].tolist() for images, _ in loader] == [[0, 1, 2], [3, 4, 5], [6]]


def test_ranks_split_every_global_batch(tmp_path):
    source, labels = labelled_source(12, tmp_path)
    whole = BatchLoader(source, labels, batch_size=4, shuffle=True, seed=1, drop_last=True)
    ranks = [BatchLoader(source, labels, batch_size=4, shuffle=True, seed=1, drop_last=True, rank=r, world_size=2)
             for r in range(2)]
    for batch, part0, part1 in zip(whole.batches(), ranks[0].batches(), ranks[1].batches()):
        assert part0.tolist() == batch[0::2].tolist() and part1.tolist() == batch[1::2].tolist()


def test_worker_processes_reopen_the_cache_and_give_the_same_batches(photos, tmp_path):
    decoded = build_cache(photos, side=8, cache_dir=tmp_path / "cache", progress=False)
    source = ImageSource(photos, 8, decoded)
    in_process = BatchLoader(source, np.arange(4), batch_size=3, shuffle=True, seed=2)
    in_worker = BatchLoader(source, np.arange(4), batch_size=3, shuffle=True, seed=2, workers=1)
    for (a, la), (b, lb) in zip(in_process, in_worker):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert source.__getstate__()["_array"] is None  # the memmap is reopened in the worker, not pickled
