"""The CURVE options shared by the commands that connect to the planner (`engine`, `api`).

Either all three keys are given or none: a peer with its own keys but without the planner's public
key used to fall back to plain text without a word. Each option also reads an environment
variable, so that a secret key need not appear in the process list (`ps`); a key that starts with
`-` must be written `--curve-secret-key=KEY`.
"""

from __future__ import annotations

import argparse
import os

from commands.cli import CliError
from wire.security import CurveKeys

_OPTIONS = {  # option -> (environment variable, help)
    "--curve-public-key": ("SLOS_SERVE_CURVE_PUBLIC_KEY", "this peer's public key (Z85)"),
    "--curve-secret-key": ("SLOS_SERVE_CURVE_SECRET_KEY", "this peer's secret key (Z85)"),
    "--curve-server-key": ("SLOS_SERVE_CURVE_SERVER_KEY", "the planner's public key (Z85)"),
}


def add_curve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "CURVE (beyond loopback; all three keys or none; env SLOS_SERVE_CURVE_*_KEY)"
    )
    for option, (variable, help_text) in _OPTIONS.items():
        group.add_argument(option, default=os.environ.get(variable, ""), help=help_text)


def curve_keys(args: argparse.Namespace) -> CurveKeys | None:
    """The keys the options give, None without any; a partial set is a user error."""
    keys = (args.curve_public_key, args.curve_secret_key, args.curve_server_key)
    if not any(keys):
        return None
    missing = [option for option, key in zip(_OPTIONS, keys) if not key]
    if missing:
        raise CliError(
            f"CURVE needs all three keys; missing {', '.join(missing)} "
            "(without them the connection would not be encrypted)"
        )
    return CurveKeys(*keys)  # a malformed key: ValueError, one line
