"""The `l3rs` command.

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser, command)`` and
``run(args) -> int`` (``args.command`` names the subcommand). This file only wires them up and turns user
errors into one line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from l3rs.errors import UsageError
from l3rs.version import __version__

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tasks": ("l3rs.tasks.command", "list the built-in tasks"),
    "pretrain": ("l3rs.tasks.command", "pretrain (and cache) a built-in backbone"),
    "meta-train": ("l3rs.meta.command", "meta-train an L3RS optimizer on a task"),
    "evaluate": ("l3rs.evaluate.command", "compare a meta-trained optimizer with tuned baselines; write a report"),
    "inspect": ("l3rs.report.command", "plot what a saved optimizer learned (λ and μ per tensor over time)"),
    "quickstart": ("l3rs.quickstart", "the whole story on the default task, on 2 CPU cores"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (the others just list their help line)."""
    parser = _Parser(prog="l3rs", description="Specialized learned optimizers for fine-tuning (L3RS).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p, name)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.getcwd() not in sys.path:  # "module:function" task specs resolve from here, as with `python -m`
        sys.path.insert(0, os.getcwd())
    from l3rs.optim import CheckpointError

    user_errors: tuple[type[BaseException], ...] = (UsageError, CheckpointError, FileNotFoundError,
                                                    NotADirectoryError)
    try:
        from l3rs.tasks import TaskError

        user_errors += (TaskError,)
    except ImportError:
        pass
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(_command(argv)).parse_args(argv)
        if args.version:
            print(__version__)
            return 0
        if args.command is None:
            build_parser().print_help()
            return 2
        mod = importlib.import_module(COMMANDS[args.command][0])
        return int(mod.run(args) or 0)
    except user_errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"l3rs: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("l3rs: interrupted (use --resume to continue where supported)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
