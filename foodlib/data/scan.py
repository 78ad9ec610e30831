"""Scan an ImageFolder for files that would break or silently bias training.

``foodlib data-check ROOT`` (the CLI) calls :func:`main_data_check`; the library calls
:func:`scan_dataset` or :func:`scan_cached`, and the data index skips ``report.bad_files``.

What is checked, per file: empty (zero-byte) files, files Pillow cannot identify, truncated or
corrupt files (each file is decoded in full: ``verify()`` alone misses truncated JPEGs), contents
that do not match the extension (a PNG named ``.jpg``), unusual colour modes (greyscale, CMYK,
16-bit, palette, alpha, 1-bit, float), tiny and huge images; per dataset: empty class folders,
classes missing from a split, files outside class folders, and identical files (sha1 of the
bytes) across splits (test leakage) or twice within a split.

Layout: ``root/{train,val,test}/<class>/...`` (any subset of the split folders), or ``root/<class>/...``
(one unsplit folder). Files in sub-folders of a class folder belong to that class, as in
torchvision's ImageFolder. Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``), and
anything beside the split folders, are ignored and listed in ``report.ignored``.

>>> report = scan_dataset("../shared/data/food101-10", progress=False)  # doctest: +SKIP
>>> report.summary  # doctest: +SKIP
{'duplicate': 2, 'duplicate_across_splits': 2, 'unusual_mode': 1}
>>> print(report.to_text())  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from foodlib.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_rgb
from foodlib.data.walk import walk_files
from foodlib.files import cache_folder

#: split folder names recognised under the root, in report order.
SPLIT_NAMES = ("train", "val", "test")
#: bump when the checks change, so cached reports are recomputed.
SCAN_VERSION = 2  # 2: sub-folders walked once each (symlink loops reported)

#: every problem kind, with its severity: "error" = the file (or class) cannot be used,
#: "warning" = usable, but converted, suspicious or worth knowing.
PROBLEM_KINDS: dict[str, str] = {
    "zero_byte": "error",  # empty file
    "not_image": "error",  # Pillow cannot identify it (text, HTML error page, other binary)
    "truncated": "error",  # the data ends early
    "corrupt": "error",  # damaged data or header, or a mode that cannot become RGB
    "unreadable": "error",  # the operating system refused to read it
    "wrong_extension": "warning",  # e.g. PNG content in a .jpg file
    "unusual_mode": "warning",  # converted to RGB on load
    "tiny": "warning",  # short side below min_size: upscaled, blurry
    "huge": "warning",  # more than max_pixels: slow and memory-hungry to decode
    "not_image_extension": "warning",  # a file whose suffix is not an image suffix: not indexed
    "stray_file": "warning",  # a file directly in the root or a split folder, outside any class
    "duplicate_across_splits": "warning",  # same bytes in two splits: leakage
    "duplicate": "warning",  # same bytes twice in one split (twice the weight; or two labels)
    "empty_class": "error",  # a class folder with no usable image (in train or unsplit layouts)
    "missing_class": "error",  # a class absent from train that other splits have
    "symlink_loop": "warning",  # a link to a folder already walked (e.g. `ln -s .. loop`): not followed
}
# Dataset-level kinds whose severity depends on the split (warning outside train).
_SPLIT_DEPENDENT = {"empty_class", "missing_class"}

_MODE_NOTES = {
    "L": "greyscale: the channel is repeated into R, G, B",
    "LA": "greyscale with alpha: composited onto white",
    "La": "greyscale with premultiplied alpha: composited onto white",
    "P": "palette: expanded to RGB",
    "PA": "palette with alpha: composited onto white",
    "RGBA": "alpha channel: composited onto white",
    "RGBa": "premultiplied alpha: composited onto white",
    "CMYK": "CMYK (print colour): converted without a colour profile, colours may shift",
    "1": "1-bit black and white",
    "I;16": "16-bit greyscale: scaled to 8 bits",
    "I;16B": "16-bit greyscale (big-endian): scaled to 8 bits",
    "I;16L": "16-bit greyscale: scaled to 8 bits",
    "I": "32-bit integer greyscale: scaled to 8 bits",
    "F": "32-bit float greyscale: scaled to 8 bits",
    "YCbCr": "YCbCr: converted to RGB",
}
# Pillow reports some JPEGs (camera files with extra frames) as MPO; they are still JPEGs.
_FORMAT_ALIASES = {"MPO": "JPEG"}


@dataclass(frozen=True)
class Problem:
    """One finding.

    Attributes:
        kind: a key of :data:`PROBLEM_KINDS`.
        path: file or folder, relative to the scanned root (posix separators).
        detail: what was found, in words.
        severity: ``"error"`` (cannot be used) or ``"warning"`` (usable).
    """

    kind: str
    path: str
    detail: str
    severity: str


@dataclass
class ScanReport:
    """The findings of one scan.

    Attributes:
        root: the scanned folder (absolute).
        layout: ``"splits"`` (train/val/test folders) or ``"flat"`` (class folders at the root).
        counts: ``{split: {class: number of image files}}``; split ``""`` in the flat layout.
        files_scanned: number of files examined.
        problems: every finding, sorted by severity, kind and path.
        ignored: skipped paths (relative): hidden files and folders, anything beside the splits.
        seconds: how long the scan took.
        options: the scan settings (thresholds), for the record.
    """

    root: str
    layout: str
    counts: dict[str, dict[str, int]]
    files_scanned: int
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing is an error (warnings allowed)."""
        return not self.errors

    @property
    def bad_files(self) -> list[Path]:
        """Absolute paths (``Path.absolute()``, symlinks kept) of files that training must skip."""
        root = Path(self.root)
        return sorted({root / p.path for p in self.errors if p.kind in _FILE_ERROR_KINDS})

    @property
    def summary(self) -> dict[str, int]:
        """Number of problems per kind."""
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    def by_kind(self, kind: str) -> list[Problem]:
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; valid kinds: {', '.join(PROBLEM_KINDS)}")
        return [p for p in self.problems if p.kind == kind]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = self.summary
        data["bad_files"] = [str(p) for p in self.bad_files]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The whole report as JSON (``summary`` and ``bad_files`` included)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "ScanReport":
        data = {k: v for k, v in data.items() if k not in ("summary", "bad_files")}
        data["problems"] = [Problem(**p) for p in data.get("problems", [])]
        return cls(**data)

    def to_text(self, max_per_kind: int = 20) -> str:
        """A readable report: totals, then each kind with up to ``max_per_kind`` paths."""
        lines = [f"data-check {self.root}", f"layout: {self.layout}; {self.files_scanned} files in {self.seconds:.1f} s"]
        for split, classes in self.counts.items():
            label = split or "(all)"
            lines.append(f"  {label}: {sum(classes.values())} images in {len(classes)} classes")
        if not self.problems:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings")
            for kind, count in self.summary.items():
                found = self.by_kind(kind)
                lines.append(f"[{found[0].severity}] {kind}: {count}")
                for problem in found[:max_per_kind]:
                    lines.append(f"    {problem.path}: {problem.detail}")
                if count > max_per_kind:
                    lines.append(f"    ... and {count - max_per_kind} more (use --json for all)")
        if self.ignored:
            lines.append(f"ignored (hidden, or beside the split folders): {len(self.ignored)} path(s)")
            lines += [f"    {path}" for path in self.ignored[:max_per_kind]]
            if len(self.ignored) > max_per_kind:
                lines.append(f"    ... and {len(self.ignored) - max_per_kind} more (use --json for all)")
        if self.errors:
            lines.append(f"{len(self.bad_files)} files cannot be used; training skips them and lists them in the "
                         "run folder's bad_files.txt")
        return "\n".join(lines)


_FILE_ERROR_KINDS = {"zero_byte", "not_image", "truncated", "corrupt", "unreadable",
                     "huge"}  # "huge" only at error severity (a decompression bomb): training skips those too


@dataclass(frozen=True)
class _Entry:
    path: Path  # absolute
    rel: str  # relative to root, posix
    split: str  # "" in the flat layout
    label: str | None  # class folder name; None for stray files


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _layout(root: Path) -> tuple[str, list[tuple[str, Path]]]:
    """``("splits", [(split, folder)...])`` or ``("flat", [("", root)])``."""
    splits = [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    return ("splits", splits) if splits else ("flat", [("", root)])


def _list_entries(root: str | os.PathLike) -> tuple[str, list[_Entry], list[str], dict[str, list[str]],
                                                   list[tuple[str, str]]]:
    """Walk ``root``: the layout, every file, ignored hidden paths, class folders per split, and links
    to folders already walked (symlink loops), which are not followed."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder not found: {root}; pass the folder that holds train/ and test/ (or the class folders)"
        )
    layout, splits = _layout(root)
    entries: list[_Entry] = []
    classes: dict[str, list[str]] = {}
    loops: list[tuple[str, str]] = []

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    # Beside the split folders, the root may hold anything (a marker file, a README, meta/):
    # not part of any split, so listed as ignored rather than reported.
    ignored = [rel(p) for p in root.iterdir() if layout == "splits" and p.name not in SPLIT_NAMES]

    for split, split_dir in splits:
        classes[split] = []
        for child in sorted(split_dir.iterdir()):
            if _is_hidden(child.name):
                ignored.append(rel(child))
            elif child.is_dir():
                classes[split].append(child.name)
                files, skipped_links, hidden = walk_files(child)  # each real folder once: no symlink loops
                ignored.extend(rel(Path(p)) for p in hidden)
                loops.extend((rel(Path(link)), target) for link, target in skipped_links)
                entries.extend(_Entry(Path(p), rel(Path(p)), split, child.name) for p in files)
            elif child.is_file():
                entries.append(_Entry(child, rel(child), split, None))
    return layout, entries, sorted(ignored), classes, loops


@dataclass
class _FileResult:
    entry: _Entry
    size: int = 0
    sha1: str | None = None
    usable: bool = False  # decodes to RGB (counts towards its class)
    problems: list[Problem] = field(default_factory=list)


def _problem(kind: str, path: str, detail: str, severity: str | None = None) -> Problem:
    return Problem(kind, path, detail, severity or PROBLEM_KINDS[kind])


def _check_file(entry: _Entry, hash_duplicates: bool, min_size: int, max_pixels: int) -> _FileResult:
    """Every per-file check on one file (runs in a worker thread)."""
    result = _FileResult(entry)
    rel, found = entry.rel, result.problems
    if entry.label is None:
        found.append(_problem("stray_file", rel, "not inside a class folder: no label, ignored by ImageFolder"))
        return result
    suffix = entry.path.suffix.lower()
    try:
        data = entry.path.read_bytes()
    except OSError as error:
        found.append(_problem("unreadable", rel, f"cannot read: {error.strerror or error}"))
        return result
    result.size = len(data)
    if suffix not in IMAGE_EXTENSIONS:
        # The data index only picks up image suffixes, so this file is never loaded: a warning,
        # with a rename hint when it is in fact an image.
        fmt = _identify(data)
        hint = f"a {fmt} image: rename it to an image suffix" if fmt else "not an image"
        detail = f"suffix '{suffix or '(none)'}' is not an image suffix ({hint}); not indexed"
        found.append(_problem("not_image_extension", rel, detail))
        return result
    if not data:
        found.append(_problem("zero_byte", rel, "empty file (0 bytes)"))
        return result
    if hash_duplicates:
        result.sha1 = hashlib.sha1(data).hexdigest()

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
    except UnidentifiedImageError:
        found.append(_problem("not_image", rel, f"not an image Pillow can identify ({_sniff(data)})"))
        return result
    except Image.DecompressionBombError as error:
        found.append(_problem("huge", rel, f"{error}; raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted", "error"))
        return result
    except Exception as error:  # noqa: BLE001 - damaged headers raise many types
        found.append(_problem("corrupt", rel, f"unreadable header: {error or type(error).__name__}"))
        return result

    try:
        # Decode in full, as training will. JPEGs decode at reduced DCT scale (draft): entropy
        # decoding still reads every byte, so truncation is caught, at a fraction of the cost.
        decode_rgb(io.BytesIO(data), draft_size=max(1, min_size), name=rel)
    except ImageDecodeError as error:
        kind = "truncated" if error.reason.startswith("truncated") else "corrupt"
        found.append(_problem(kind, rel, error.reason))
        return result
    result.usable = True

    expected = Image.registered_extensions().get(suffix)
    if expected and _FORMAT_ALIASES.get(fmt, fmt) != _FORMAT_ALIASES.get(expected, expected):
        found.append(_problem("wrong_extension", rel, f"{fmt} content in a '{suffix}' file (expected {expected})"))
    if mode != "RGB":
        found.append(_problem("unusual_mode", rel, f"mode {mode}: {_MODE_NOTES.get(mode, 'converted to RGB')}"))
    if min(width, height) < min_size:
        found.append(_problem("tiny", rel, f"{width}x{height} px: short side below {min_size} px"))
    if width * height > max_pixels:
        detail = f"{width}x{height} px = {width * height / 1e6:.0f} MP, above {max_pixels / 1e6:.0f} MP"
        found.append(_problem("huge", rel, detail))
    return result


def _identify(data: bytes) -> str | None:
    """Pillow's format name for ``data``, or None when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # noqa: BLE001
        return None


def _sniff(data: bytes) -> str:
    head = data[:64]
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page (a failed download?)"
    try:
        head.decode("utf-8")
        return f"looks like text: {head[:32]!r}"
    except UnicodeDecodeError:
        return f"unknown binary, starts {head[:8].hex()}"


def scan_dataset(
    root: str | os.PathLike,
    hash_duplicates: bool = True,
    min_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
    workers: int | None = None,
) -> ScanReport:
    """Check every file of an ImageFolder dataset and the dataset's structure.

    Args:
        root: folder with ``train/``, ``val/``, ``test/`` split folders (any of them), or a folder
            of class folders.
        hash_duplicates: hash file bytes (sha1) to find identical files across and within splits.
        min_size: short sides below this many pixels are reported as ``tiny``.
        max_pixels: images with more pixels are reported as ``huge`` (default 50 MP).
        progress: show a tqdm progress bar.
        workers: decoding threads (default: up to 8, one per CPU). Pillow and hashlib release
            the GIL while they work, so threads scale without process start-up costs.

    Returns:
        A :class:`ScanReport`.

    Raises:
        FileNotFoundError: ``root`` is not a folder.

    >>> report = scan_dataset("data/food101-10", progress=False)  # doctest: +SKIP
    >>> report.bad_files  # doctest: +SKIP
    []
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    layout, entries, ignored, classes, loops = _list_entries(root)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda e: _check_file(e, hash_duplicates, min_size, max_pixels), entries)
        results = list(tqdm(jobs, total=len(entries), desc="data-check", unit="file", disable=not progress))

    problems = [p for r in results for p in r.problems]
    problems += [_problem("symlink_loop", link, f"links to {target}, a folder already scanned; not followed")
                 for link, target in loops]
    counts = {split: {name: 0 for name in names} for split, names in classes.items()}
    for r in results:
        if r.usable:
            counts[r.entry.split][r.entry.label] += 1
    problems += _structure_problems(layout, classes, counts)
    if hash_duplicates:
        problems += _duplicate_problems(results)
    severity_order = {"error": 0, "warning": 1}
    problems.sort(key=lambda p: (severity_order[p.severity], p.kind, p.path))
    return ScanReport(
        root=str(Path(root).absolute()),
        layout=layout,
        counts=counts,
        files_scanned=len(entries),
        problems=problems,
        ignored=ignored,
        seconds=round(time.perf_counter() - started, 3),
        options={"hash_duplicates": hash_duplicates, "min_size": min_size, "max_pixels": max_pixels},
    )


def _structure_problems(layout: str, classes: dict[str, list[str]], counts: dict[str, dict[str, int]]) -> list[Problem]:
    """Empty class folders, and classes that one split has and another lacks."""
    problems = []
    for split, per_class in counts.items():
        # A class without training images cannot be learned (and torchvision's ImageFolder
        # refuses empty class folders); one missing from val/test only narrows what they measure.
        severity = "error" if split in ("train", "") else "warning"
        for name, count in per_class.items():
            if count == 0:
                folder = f"{split}/{name}" if split else name
                problems.append(_problem("empty_class", folder, "no usable image in this class folder", severity))
    if layout == "splits":
        every = sorted(set().union(*[set(names) for names in classes.values()]))
        for split, names in classes.items():
            for name in sorted(set(every) - set(names)):
                others = [s for s, n in classes.items() if name in n]
                severity = "error" if split == "train" else "warning"
                detail = f"class folder missing from {split} (present in {', '.join(others)})"
                problems.append(_problem("missing_class", f"{split}/{name}", detail, severity))
    return problems


def _duplicate_problems(results: list[_FileResult]) -> list[Problem]:
    """Identical bytes: across splits (leakage), or within a split (double weight, or two labels)."""
    by_hash: dict[str, list[_Entry]] = defaultdict(list)
    for r in results:
        if r.sha1 and r.usable:
            by_hash[r.sha1].append(r.entry)
    problems = []
    for group in by_hash.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda e: (SPLIT_NAMES.index(e.split) if e.split in SPLIT_NAMES else -1, e.rel))
        first = group[0]
        for entry in group[1:]:
            if entry.split != first.split:
                detail = f"same bytes as {first.rel}: a {first.split} image leaks into {entry.split}"
                problems.append(_problem("duplicate_across_splits", entry.rel, detail))
            else:
                labels = "the same class" if entry.label == first.label else f"another class ({first.label})"
                problems.append(_problem("duplicate", entry.rel, f"same bytes as {first.rel}, in {labels}"))
    return problems


def scan_key(root: str | os.PathLike, **options) -> str:
    """Cache key of a scan: the file list with sizes and modification times, plus the options."""
    root = Path(root).absolute()
    layout, entries, ignored, classes, loops = _list_entries(root)
    digest = hashlib.sha1()
    header = {"root": str(root), "version": SCAN_VERSION, "options": options, "classes": classes}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for entry in entries:
        stat = entry.path.stat()
        digest.update(f"{entry.rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def scan_cached(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    **scan_options,
) -> ScanReport:
    """:func:`scan_dataset`, reusing a stored report while no file was added, removed or changed.

    The key covers every file's relative path, size and modification time, the class folders and
    the scan options, so any change triggers a fresh scan. Reports live in
    ``cache_dir/scan-<key>.json`` (default ``<cache folder>/scans``, :func:`foodlib.files.cache_folder`).

    Args:
        root: dataset folder.
        cache_dir: where reports are stored.
        **scan_options: passed to :func:`scan_dataset` (``progress`` and ``workers`` do not
            affect the key).

    >>> report = scan_cached("data/food101-10", progress=False)  # doctest: +SKIP
    """
    keyed = {k: v for k, v in scan_options.items() if k not in ("progress", "workers")}
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_folder() / "scans"
    path = cache_dir / f"scan-{scan_key(root, **keyed)}.json"
    if path.is_file():
        try:
            return ScanReport.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable or from an older layout: scan again
    report = scan_dataset(root, **scan_options)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp-{os.getpid()}")
    temporary.write_text(report.to_json())
    temporary.replace(path)  # atomic: a concurrent reader never sees half a file
    return report


def main_data_check(
    path: str | os.PathLike,
    as_json: bool = False,
    fail_on_error: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> int:
    """``foodlib data-check PATH``: scan, print the report, return the exit code.

    Args:
        path: dataset root.
        as_json: print JSON instead of text.
        fail_on_error: return 1 when any error was found (for CI); otherwise 0.
        progress: progress bar on stderr.
        cache_dir: reuse reports stored there (see :func:`scan_cached`); None scans afresh.

    Returns:
        0 (done, or no errors), 1 (errors and ``fail_on_error``), 2 (``path`` is not a folder).

    >>> main_data_check("data/food101-10", fail_on_error=True)  # doctest: +SKIP
    0
    """
    if not Path(path).is_dir():
        print(f"data-check: {path} is not a folder; pass a dataset root (with train/ and test/, or class folders)",
              file=sys.stderr)
        return 2
    options = {"progress": progress}
    report = scan_cached(path, cache_dir, **options) if cache_dir is not None else scan_dataset(path, **options)
    print(report.to_json() if as_json else report.to_text())
    return 1 if (fail_on_error and not report.ok) else 0
