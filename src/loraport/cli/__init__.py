"""The ``loraport`` command line: thin wrappers over the library API, no math here.

One module per sub-command (``transfer``, ``batch``, ``inspect``, ``evaluate``, ``fuse``, ``demo``); each
registers itself with :func:`register_command` when imported.

Bad input exits with status 2 and a one-line ``loraport: error: ...`` naming the file or
module; progress bars go to stderr; results and summaries to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from ..errors import LoraportError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def register_command(
    name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None], handler: Handler
) -> None:
    """Add a sub-command: ``add_arguments`` fills its parser, ``handler`` runs it (returns the exit code)."""
    _COMMANDS[name] = (add_arguments, handler, help_text)


def quiet_loading() -> None:
    """``--quiet``: no progress bars from ``transformers`` either (its weight-loading bar)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# Sub-command modules, in the order ``loraport --help`` lists them.
COMMAND_MODULES = ("transfer", "batch", "inspect", "evaluate", "fuse", "demo")


def _load_commands() -> None:
    """Import the sub-command modules (each registers itself)."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="loraport",
        description="Port LoRA adapters between base models without training data; fuse fine-tuned models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _one_level_prefix(record: logging.LogRecord) -> bool:
    """Report warnings (which start with ``WARNING:`` for the reports' notes) with the level named once."""
    prefix = f"{record.levelname}: "
    if isinstance(record.msg, str) and record.msg.startswith(prefix):
        record.msg = record.msg[len(prefix) :]
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="loraport: %(levelname)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_level_prefix)
    try:
        return _COMMANDS[args.command][1](args)
    except LoraportError as exc:
        print(f"loraport: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
