"""The ``foodlib`` command.

    foodlib train --data PATH|dishes|digits|food101:ROOT --loss center --epochs 10 --out runs/NAME
    foodlib data-check PATH
    foodlib cache [--prune]
    foodlib analyse RUN_DIR
    foodlib suite suites/NAME.yaml
    foodlib predict RUN_DIR PATH... / embed / export

Every ``train`` flag is a Config field (``--image-size`` sets ``image_size``); ``--config FILE``
loads a YAML first and the flags override it.

The arguments are parsed before torch or any heavy module is imported, so ``foodlib --help`` and a
mistyped command answer at once; each command imports what it needs when it runs. An error caused
by the input (a bad config value, a missing file, an offline download) prints one line,
``foodlib COMMAND: error: ...``, and exits with code 2; ``--debug`` or ``FOODLIB_DEBUG=1`` shows
the full traceback instead.
"""
from __future__ import annotations

import argparse
import os
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
                        help="remove unfinished builds, and caches whose files changed or are gone once unused for an hour")
    parser.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                        help="also remove caches not used for DAYS days (implies --prune)")
    parser.add_argument("--dry-run", action="store_true", help="with --prune: only say what would be removed")


@command("cache", "list the decoded-image caches (size, last use, still current?); --prune removes stale ones",
         _cache_args)
def run_cache(args) -> int:
    from foodlib.data.cache import main_cache

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

#: Subcommands that other modules register with :func:`command`: name -> (module, help). Listed here
#: so that ``foodlib --help`` names them without importing those modules (foodlib.inference imports
#: torch); only the module of the command being run is imported. tests/test_cli.py checks that this
#: table matches what the modules register.
OPTIONAL_COMMANDS: dict[str, tuple[str, str]] = {
    "suite": ("foodlib.suite", "run a suite of experiment notebooks with papermill, then the comparison"),
    "report": ("foodlib.suite", "compare a suite's runs: report.md and figures in the suite folder"),
    "predict": ("foodlib.inference", "top-k classes with probabilities for images, from a run's best checkpoint"),
    "embed": ("foodlib.inference", "embeddings and prediction logits of images, saved as .npz"),
    "neighbours": ("foodlib.inference", "the most similar training images of query images, in a run's embedding space"),
    "export": ("foodlib.inference", "export a run's model (images -> embedding, logits) with its class names"),
    "tune": ("foodlib.tuning", "tune every loss of a suite with the same Optuna budget on val; write the best settings as a suite"),
    "enroll": ("foodlib.enroll", "add dishes to a trained run from a few photos each (no retraining); --list, --remove"),
}


def build_parser(command_name: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``foodlib`` parser.

    Args:
        command_name: with ``lazy``, the command about to run: only its module is imported.
        lazy: True: the other optional commands are listed (name and help) without their arguments
            and without importing their modules. False: every command is complete.
    """
    if lazy:
        if command_name in OPTIONAL_COMMANDS:
            _load_optional_commands([OPTIONAL_COMMANDS[command_name][0]])
    else:
        _load_optional_commands()
    parser = argparse.ArgumentParser(prog="foodlib", description=__doc__.split("\n")[0])
    from foodlib import __version__  # foodlib/__init__.py imports nothing heavy

    parser.add_argument("--version", action="version", version=f"foodlib {__version__}")
    debug = argparse.ArgumentParser(add_help=False)  # --debug before or after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (also FOODLIB_DEBUG=1)")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error (also FOODLIB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        add_arguments(p)
        p.set_defaults(run=run)
    for name, (_module, help_text) in OPTIONAL_COMMANDS.items():
        if name not in COMMANDS:  # not loaded: listed in --help, never parsed
            sub.add_parser(name, help=help_text, description=help_text)
    return parser


def _load_optional_commands(modules=None) -> None:
    """Import the modules that register their own subcommands (default: all of OPTIONAL_COMMANDS')."""
    import importlib

    for module in modules or dict.fromkeys(m for m, _ in OPTIONAL_COMMANDS.values()):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the top-level
    options, --help, --version and --debug, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (config, data, run folder): one line and exit code 2, no traceback.

    ValueError covers ConfigError, SuiteError, BadFilesError, ClassMismatchError and the value checks
    of the losses and models; :class:`foodlib.errors.UserError` the others (an offline download of
    pretrained weights). Imported only once an error happened, so the CLI starts fast.
    """
    from foodlib.errors import UserError
    from foodlib.io import FolderBusyError, NoSpaceError
    from foodlib.train import CheckpointError, NonFiniteLossError

    return (ValueError, FileNotFoundError, FileExistsError, FolderBusyError, CheckpointError, NonFiniteLossError,
            NoSpaceError, UserError)


def _one_line(error: BaseException) -> str:
    """The error's message on one line (the lines of a multi-line message joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv), lazy=True).parse_args(argv)  # before torch is imported
    debug = getattr(args, "debug", False) or os.environ.get("FOODLIB_DEBUG", "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if debug or not isinstance(error, _user_errors()):
            raise
        print(f"foodlib {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m foodlib.cli` runs this file as __main__: use the foodlib.cli module, whose COMMANDS
    # table the suite and inference modules register into.
    from foodlib.cli import main as _main

    sys.exit(_main())

