"""The ``foodlib`` command.

    foodlib train --data PATH|dishes|digits|food101:ROOT --loss center --epochs 10 --out runs/NAME
    foodlib data-check PATH
    foodlib cache [--prune]
    foodlib analyse RUN_DIR
    foodlib suite suites/NAME.yaml
    foodlib predict RUN_DIR PATH... / embed / export

Every ``train`` flag is a Config field (``--image-size`` sets ``image_size``); ``--config FILE``
loads a YAML first and the flags override it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> exit code`` as subcommand ``name``."""
    def register(run):
        COMMANDS[name] = (add_arguments, run, help)
        return run
    return register


# ----- train ------------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, named after it; defaults stay None so only given flags override."""
    from foodlib.config import Config

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
    from foodlib.config import Config

    base = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    overrides = {name: getattr(args, name) for name in Config.field_index() if getattr(args, name, None) is not None}
    return base.with_overrides(**overrides)


@command("train", "train one run (softmax, center, lgm, island) into a run folder", add_config_arguments)
def run_train(args) -> int:
    from foodlib.train import fit

    from foodlib.distributed import dist_info

    result = fit(config_from_args(args))
    if dist_info().is_main:  # under torchrun, one line, not one per rank
        print(f"run folder: {result.run_dir}")
    return 0


# ----- data-check -------------------------------------------------------------------------------

def _data_check_args(parser):
    parser.add_argument("path", help="dataset root (train/<class>/..., optional val/, test/)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 when an unusable file is found")


@command("data-check", "scan a dataset for corrupt, odd or duplicated files", _data_check_args)
def run_data_check(args) -> int:
    from foodlib.data.scan import main_data_check

    return main_data_check(args.path, as_json=args.json, fail_on_error=args.fail_on_error)


# ----- cache ------------------------------------------------------------------------------------

def _cache_args(parser):
    parser.add_argument("--cache-dir", default=None, help="default: $FOODLIB_CACHE or ~/.cache/foodlib")
    parser.add_argument("--prune", action="store_true",
                        help="remove caches whose files changed or are gone, and unfinished builds")
    parser.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                        help="also remove caches not used for DAYS days (implies --prune)")
    parser.add_argument("--dry-run", action="store_true", help="with --prune: only say what would be removed")


@command("cache", "list the decoded-image caches (size, last use, still current?); --prune removes stale ones",
         _cache_args)
def run_cache(args) -> int:
    from foodlib.data.caches import main_cache

    return main_cache(args.cache_dir, args.prune, args.older_than, args.dry_run)


# ----- analyse ----------------------------------------------------------------------------------

def _analyse_args(parser):
    parser.add_argument("run_dir", help="a finished run folder (with features.npz)")
    parser.add_argument("--no-figures", action="store_true")


@command("analyse", "recompute feature metrics and figures of a run from its features.npz", _analyse_args)
def run_analyse(args) -> int:
    import json

    from foodlib.analysis import reanalyse

    metrics = reanalyse(args.run_dir, figures=not args.no_figures)
    print(json.dumps({k: v for k, v in metrics.items() if k in ("val", "test")}, indent=2))
    return 0


# ----- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="foodlib", description=__doc__.split("\n")[0])
    import foodlib

    parser.add_argument("--version", action="version", version=f"foodlib {foodlib.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def _load_optional_commands() -> None:
    """Modules that register their own subcommands (suite, report; predict, embed, neighbours, export)."""
    import importlib

    for module in ("foodlib.suite", "foodlib.inference"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (config, data, run folder): one line and exit code 2, no traceback.

    ValueError covers ConfigError, BadFilesError, ClassMismatchError and the value checks of the
    losses and models. Imported only once an error happened, so the CLI starts fast.
    """
    from foodlib.io import FolderBusyError, NoSpaceError
    from foodlib.train import CheckpointError, NonFiniteLossError

    return (ValueError, FileNotFoundError, FileExistsError, FolderBusyError, CheckpointError, NonFiniteLossError,
            NoSpaceError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        print(f"foodlib {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

