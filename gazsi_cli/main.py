"""The ``gazsi`` command. Each sub-command lives in its own module with ``register(subparsers)``.

Modules import their heavy dependencies inside their handlers, so ``gazsi --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gazsi_cluster.errors import GazsiError

__all__ = ["build_parser", "main"]

# Sub-command modules under gazsi_cli, in help order.
COMMANDS = ("edge", "keys", "nodes", "up", "certs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gazsi", description="GAZSI Cluster: an inference delivery network.")
    parser.add_argument("--config", help="YAML/JSON settings file (env GAZSI_* overrides it)")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gazsi_cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"gazsi_cli.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per HTTP call from httpx drowns the CLI's own progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result = args.handler(args)
    except GazsiError as exc:
        print(f"gazsi: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
