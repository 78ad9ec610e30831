"""The ``foodlib`` command: one table of subcommands, all their arguments, and thin runners.

    foodlib train --data PATH|dishes|digits|food101:ROOT --loss center --epochs 10 --out runs/NAME
    foodlib data-check PATH
    foodlib cache [--prune]
    foodlib analyse RUN_DIR
    foodlib suite suites/NAME.yaml / report runs/NAME / tune suites/NAME-tune.yaml
    foodlib predict RUN_DIR PATH... / embed / neighbours / export / enroll

Every ``train`` flag is a Config field (``--image-size`` sets ``image_size``); ``--config FILE``
loads a YAML first and the flags override it.

This module is the top layer (docs/architecture.md): it parses the arguments and calls one library
function per command. The arguments are parsed before torch or any heavy module is imported, so
``foodlib --help`` and a mistyped command answer at once: each runner imports the module it calls
when it runs (the only reason for the imports inside functions below). An error caused by the input
(a bad config value, a missing file, an offline download) prints one line,
``foodlib COMMAND: error: ...``, and exits with code 2; ``--debug`` or ``FOODLIB_DEBUG=1`` shows the
full traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from foodlib import __version__
from foodlib.config import Config  # imports no torch

#: The choices of ``neighbours --metric`` and ``export --format``; tests/test_cli.py checks them
#: against foodlib.inference.METRICS / EXPORT_FORMATS (written here so that parsing imports no torch).
METRICS = ("euclidean", "cosine")
EXPORT_FORMATS = ("pt2", "torchscript", "onnx")


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----- train ------------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, named after it; defaults stay None so only given flags override."""
    parser.add_argument("--config", help="YAML config to start from (flags override it)")
    for name, (section, leaf) in Config.field_index().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(getattr(Config(), section), name)
        if leaf.type == "bool" or leaf.type is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"[{section}] default: {default}")
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=f"[{section}] default: {default}")


def config_from_args(args: argparse.Namespace):
    base = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    overrides = {name: getattr(args, name) for name in Config.field_index() if getattr(args, name, None) is not None}
    return base.with_overrides(**overrides)


def cmd_train(args) -> int:
    from foodlib.distributed import dist_info  # lazy: torch (arguments are parsed before it loads)
    from foodlib.train import fit  # lazy: torch (arguments are parsed before it loads)

    result = fit(config_from_args(args))
    if dist_info().is_main:  # under torchrun, one line, not one per rank
        print(f"run folder: {result.run_dir}")
    return 0


# ----- data-check -------------------------------------------------------------------------------

def _data_check_args(parser):
    parser.add_argument("path", help="dataset root (train/<class>/..., optional val/, test/)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 when an unusable file is found")


def cmd_data_check(args) -> int:
    from foodlib.data.scan import main_data_check  # lazy: torch (arguments are parsed before it loads)

    return main_data_check(args.path, as_json=args.json, fail_on_error=args.fail_on_error)


# ----- cache ------------------------------------------------------------------------------------
def _cache_args(parser):
    parser.add_argument("--cache-dir", default=None, help="default: $FOODLIB_CACHE or ~/.cache/foodlib")
    parser.add_argument("--prune", action="store_true",
                        help="remove unfinished builds, and caches whose files changed or are gone once unused for an hour")
    parser.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                        help="also remove caches not used for DAYS days (implies --prune)")
    parser.add_argument("--dry-run", action="store_true", help="with --prune: only say what would be removed")


def cmd_cache(args) -> int:
    from foodlib.data.cache import main_cache  # lazy: torch (arguments are parsed before it loads)

    return main_cache(args.cache_dir, args.prune, args.older_than, args.dry_run)


# ----- analyse ----------------------------------------------------------------------------------

def _analyse_args(parser):
    parser.add_argument("run_dir", help="a finished run folder (with features.npz)")
    parser.add_argument("--no-figures", action="store_true")


def cmd_analyse(args) -> int:
    import json

    from foodlib.analysis import reanalyse  # lazy: torch (arguments are parsed before it loads)

    metrics = reanalyse(args.run_dir, figures=not args.no_figures)
    print(json.dumps({k: v for k, v in metrics.items() if k in ("val", "test")}, indent=2))
    return 0


# ----- suite, report, tune -----------------------------------------------------------------------

def _suite_args(parser) -> None:
    parser.add_argument("suite", help="suite YAML, e.g. suites/demo.yaml")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this run (repeatable; shell patterns like 'center-*' allowed)")
    parser.add_argument("--quiet", action="store_true", help="one line per run; no notebook output or progress bars")
    parser.add_argument("--device", help="device for every run: auto | cpu | cuda | cuda:N")
    parser.add_argument("--readme-pictures", action="store_true",
                        help="also copy the report figures into readme_pictures/")
    parser.add_argument("--out-dir", default="runs", help="parent folder of runs/<suite>/ (default: runs)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs executed at a time, each with cores // N threads (default: 1); on a CPU "
                             "2 single-thread runs train faster together than one 2-thread run")
    parser.add_argument("--worker", action="store_true",
                        help="one of several workers on this suite folder (shared storage, SLURM array): claim "
                             "runs one by one, skip those others hold; the last one writes the comparison")


def cmd_suite(args) -> int:
    from foodlib.suite import SuiteError, run_suite  # lazy: torch (arguments are parsed before it loads)

    if getattr(args, "worker", False) and not args.dry_run:  # several workers, one folder: suite_workers.py
        from foodlib.suite_workers import run_worker  # lazy: torch (arguments are parsed before it loads)

        if args.jobs != 1:
            raise SuiteError("--worker runs one run at a time; start more workers instead of --jobs")
        return run_worker(args.suite, out_dir=args.out_dir, only=args.only, quiet=args.quiet, device=args.device,
                          readme_pictures=args.readme_pictures).exit_code
    return run_suite(args.suite, out_dir=args.out_dir, only=args.only, dry_run=args.dry_run, quiet=args.quiet,
                     device=args.device, readme_pictures=args.readme_pictures, jobs=args.jobs).exit_code


def _report_args(parser) -> None:
    parser.add_argument("suite_dir", help="a suite folder, e.g. runs/demo")
    parser.add_argument("--baseline", default=None, help="loss the others are compared against (default: the suite's)")
    parser.add_argument("--readme-pictures", action="store_true",
                        help="also copy the report figures into readme_pictures/")


def cmd_report(args) -> int:
    from foodlib.report import write_report  # lazy: torch (arguments are parsed before it loads)

    path = write_report(args.suite_dir, copy_to="readme_pictures" if args.readme_pictures else None,
                        baseline=args.baseline)
    print(path.read_text())
    print(f"report: {path}")
    return 0


def _tune_args(parser) -> None:
    parser.add_argument("suite", help="tuning suite YAML with a `search:` section, e.g. suites/food101-10-scratch-tune.yaml")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="trials per loss, the same for every loss (default: the suite's search.trials)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage shared by every worker: sqlite:///PATH, postgresql://..., or journal:PATH "
                             "(a journal file on shared storage, e.g. NFS); default: sqlite in runs/<suite>/study.db")
    parser.add_argument("--out-dir", default="runs", help="parent folder of runs/<suite>/ (default: runs)")
    parser.add_argument("--device", help="device for every trial: auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads per trial (several workers on one machine: cores // workers)")
    parser.add_argument("--best-out", default=None, metavar="PATH",
                        help="also write the best-settings suite here (e.g. suites/food101-10-scratch-best.yaml)")
    parser.add_argument("--report-only", action="store_true",
                        help="run no trial; write the report and best-settings suite from the storage")
    parser.add_argument("--verbose", action="store_true", help="show each trial's epochs")


def cmd_tune(args) -> int:
    from foodlib.tuning import tune  # lazy: torch (arguments are parsed before it loads)

    tune(args.suite, trials=args.trials, storage=args.storage, out_dir=args.out_dir, device=args.device,
         threads=args.threads, best_out=args.best_out, report_only=args.report_only, quiet=not args.verbose)
    return 0


# ----- a trained run: predict, embed, neighbours, export, enroll -----------------------------------

def _common_args(parser, paths_help: str) -> None:
    parser.add_argument("run_dir", help="a finished run folder (with best.pt)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (GPU if any) | cpu | cuda | cuda:N")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint file in the run folder (default best.pt)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _report_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in skipped.items():
            print(f"  {path}: {reason}", file=sys.stderr)


def _predict_args(parser) -> None:
    _common_args(parser, "image files or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--out", help="also write the predictions to this .csv or .json file")


def cmd_predict(args) -> int:
    from foodlib.inference import predict  # lazy: torch (arguments are parsed before it loads)

    preds = predict(args.run_dir, args.paths, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                    checkpoint=args.checkpoint, progress=not args.quiet)
    print(preds.table())
    _report_skipped(preds.skipped)
    if args.out:
        print(f"wrote {preds.save(args.out)}")
    return 0 if len(preds) else 1


def _embed_args(parser) -> None:
    _common_args(parser, "image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="the .npz to write (paths, embeddings, logits, classes)")


def cmd_embed(args) -> int:
    from foodlib.inference import embed  # lazy: torch (arguments are parsed before it loads)

    result = embed(args.run_dir, args.paths, out=args.out, batch_size=args.batch_size, device=args.device,
                   checkpoint=args.checkpoint, progress=not args.quiet)
    _report_skipped(result.skipped)
    print(f"wrote {len(result)} embeddings ({result.embeddings.shape[1]} dims) to {args.out}")
    return 0 if len(result) else 1


def _neighbours_args(parser) -> None:
    _common_args(parser, "query image files or folders")
    parser.add_argument("-k", type=int, default=5, help="neighbours per query (default 5)")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="distance (default: the one the run's loss trains for, euclidean)")
    parser.add_argument("--gallery", default="train", help="split searched: train (default), val or test")
    parser.add_argument("--out", help="write the neighbours to this .csv or .json file")
    parser.add_argument("--figure", help="save the figure (query, neighbours, classes, distances) to this file")


def cmd_neighbours(args) -> int:
    from foodlib.inference import nearest_neighbours  # lazy: torch (arguments are parsed before it loads)

    result = nearest_neighbours(args.run_dir, args.paths, k=args.k, metric=args.metric, gallery=args.gallery,
                                batch_size=args.batch_size, device=args.device, checkpoint=args.checkpoint,
                                progress=not args.quiet)
    for q in range(len(result)):
        print(f"{result.query_paths[q]} ({result.metric} distance):")
        for r, (path, name) in enumerate(zip(result.neighbour_paths(q), result.neighbour_classes(q))):
            print(f"  {r + 1}. {result.distances[q, r]:.4g}  {name}  {path}")
    _report_skipped(result.skipped)
    if args.out:
        print(f"wrote {result.save(args.out)}")
    if args.figure:
        result.figure(max_queries=None).savefig(args.figure, dpi=150)
        print(f"wrote {args.figure}")
    return 0 if len(result) else 1


def _export_args(parser) -> None:
    parser.add_argument("run_dir", help="a finished run folder (with best.pt)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                        help="pt2 (default: torch.export, loads with torch.export.load), torchscript "
                             "(torch.jit.load) or onnx (needs onnx, onnxscript); default: from --out's "
                             "suffix (.pt2, .pt, .onnx), else pt2")
    parser.add_argument("--out", help="file to write (default RUN_DIR/export/model.pt2, .pt or .onnx)")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint file in the run folder (default best.pt)")


def cmd_export(args) -> int:
    from foodlib.inference import export_model  # lazy: torch (arguments are parsed before it loads)

    by_suffix = {".pt2": "pt2", ".pt": "torchscript", ".onnx": "onnx"}
    fmt = args.format or (by_suffix.get(Path(args.out).suffix, "pt2") if args.out else "pt2")
    path = export_model(args.run_dir, format=fmt, out=args.out, checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return 0


def _enroll_args(parser) -> None:
    parser.add_argument("run_dir", help="a finished run folder (center, island or lgm loss)")
    parser.add_argument("folder", nargs="?", help="FOLDER/<dish name>/<photos>: the dishes to add")
    parser.add_argument("--list", action="store_true", help="list the enrolled dishes")
    parser.add_argument("--remove", metavar="NAME", help="remove an enrolled dish")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (GPU if any) | cpu | cuda | cuda:N")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint file in the run folder (default best.pt)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_enroll(args) -> int:
    from foodlib.enrolled import enrolled_dishes, remove_enrolled  # lazy: torch (arguments are parsed before it loads)
    from foodlib.inference import enroll  # lazy: torch (arguments are parsed before it loads)

    if sum(bool(x) for x in (args.folder, args.list, args.remove)) != 1:
        raise ValueError("give exactly one of FOLDER (dishes to add), --list or --remove NAME")
    if args.remove:
        left = remove_enrolled(args.run_dir, args.remove)
        print(f"removed {args.remove}; {len(left)} enrolled dish(es) left")
        return 0
    if args.list:
        dishes = enrolled_dishes(args.run_dir)
        if dishes is None or not len(dishes):
            print("no enrolled dishes")
        for name, count in zip(dishes.names if dishes else [], dishes.counts if dishes else []):
            print(f"{name}\t{int(count)} photos")
        return 0
    done = enroll(args.run_dir, args.folder, checkpoint=args.checkpoint, device=args.device,
                  batch_size=args.batch_size, progress=not args.quiet)
    for name, count in zip(done.names, done.counts):
        print(f"enrolled {name} ({count} photos)")
    if done.skipped:
        print(f"skipped {len(done.skipped)} unreadable photo(s):", file=sys.stderr)
        for path, reason in done.skipped.items():
            print(f"  {path}: {reason}", file=sys.stderr)
    if done.empty:
        print(f"not enrolled, no readable photo: {', '.join(done.empty)}", file=sys.stderr)
    return 0


# ----- the table and the entry point --------------------------------------------------------------

#: Every subcommand: name -> (help, its arguments, its runner). Adding a command is one entry here.
COMMANDS: dict[str, Command] = {
    "train": Command("train one run (any registered loss) into a run folder", add_config_arguments, cmd_train),
    "data-check": Command("scan a dataset for corrupt, odd or duplicated files", _data_check_args, cmd_data_check),
    "cache": Command("list the decoded-image caches (size, last use, still current?); --prune removes stale ones",
                     _cache_args, cmd_cache),
    "analyse": Command("recompute feature metrics and figures of a run from its features.npz", _analyse_args,
                       cmd_analyse),
    "suite": Command("run a suite of experiment notebooks with papermill, then the comparison", _suite_args,
                     cmd_suite),
    "report": Command("compare a suite's runs: report.md and figures in the suite folder", _report_args, cmd_report),
    "tune": Command("tune every loss of a suite with the same Optuna budget on val; write the best settings as a suite",
                    _tune_args, cmd_tune),
    "predict": Command("top-k classes with probabilities for images, from a run's best checkpoint", _predict_args,
                       cmd_predict),
    "embed": Command("embeddings and prediction logits of images, saved as .npz", _embed_args, cmd_embed),
    "neighbours": Command("the most similar training images of query images, in a run's embedding space",
                          _neighbours_args, cmd_neighbours),
    "export": Command("export a run's model (images -> embedding, logits) with its class names", _export_args,
                      cmd_export),
    "enroll": Command("add dishes to a trained run from a few photos each (no retraining); --list, --remove",
                      _enroll_args, cmd_enroll),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``foodlib`` parser with every command; building it imports no torch."""
    parser = argparse.ArgumentParser(prog="foodlib", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"foodlib {__version__}")
    debug = argparse.ArgumentParser(add_help=False)  # --debug before or after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (also FOODLIB_DEBUG=1)")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error (also FOODLIB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, parents=[debug])
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (config, data, run folder): one line and exit code 2, no traceback.

    ValueError covers ConfigError, SuiteError, BadFilesError, ClassMismatchError and the value checks
    of the losses and models; :class:`foodlib.errors.UserError` the others (an offline download of
    pretrained weights, a missing optional package). Imported only once an error happened, so the CLI
    starts fast.
    """
    from foodlib.errors import UserError  # lazy: torch (arguments are parsed before it loads)
    from foodlib.files import FolderBusyError, NoSpaceError  # lazy: torch (arguments are parsed before it loads)
    from foodlib.train import CheckpointError, NonFiniteLossError  # lazy: torch (arguments are parsed before it loads)

    return (ValueError, FileNotFoundError, FileExistsError, FolderBusyError, CheckpointError, NonFiniteLossError,
            NoSpaceError, UserError)


def _one_line(error: BaseException) -> str:
    """The error's message on one line (the lines of a multi-line message joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)  # before torch is imported
    debug = getattr(args, "debug", False) or os.environ.get("FOODLIB_DEBUG", "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if debug or not isinstance(error, _user_errors()):
            raise
        print(f"foodlib {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
