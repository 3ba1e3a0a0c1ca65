"""``din access``: write or check ``docs/access.md``, the bus's access table generated from the rules."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("access", help="write or check docs/access.md (who may do what on the bus)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file drifted")
    parser.set_defaults(handler=cmd_access)


def cmd_access(args: argparse.Namespace) -> int:
    from din.access import ACCESS_DOC, drifted, write_access

    if args.check:
        if drifted():
            print(f"{ACCESS_DOC} drifted: run `din access`")
            return 1
        print(f"{ACCESS_DOC} is current")
        return 0
    print(f"wrote {write_access()}")
    return 0
