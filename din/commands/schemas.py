"""``din schemas``: regenerate ``schemas/`` from the contracts and the services' declarations, or check it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from din.schemas import DEFAULT_OUT_DIR, drifted, write_schemas


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``schemas``."""
    parser = subparsers.add_parser(
        "schemas",
        help="generate the JSON Schemas and the AsyncAPI document from the contracts and the services",
        description="Write one JSON Schema per message model and schemas/asyncapi.yaml, whose operations come "
        "from the endpoints and publications each service class declares (shared.channels names the channels). "
        "With --check, write nothing and exit 1 when a committed file differs from a fresh render.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 and name drifted files")
    parser.set_defaults(handler=cmd_schemas)


def cmd_schemas(args: argparse.Namespace) -> int:
    """Write the schemas, or with ``--check`` report the ones that drifted."""
    if args.check:
        stale = drifted(args.out)
        if stale:
            print(f"din: {len(stale)} schema file(s) out of date in {args.out}: {', '.join(stale)}", file=sys.stderr)
            print("run `din schemas` and commit the result", file=sys.stderr)
            return 1
        print(f"schemas in {args.out} are up to date")
        return 0
    written = write_schemas(args.out)
    print(f"wrote {len(written)} files to {args.out}")
    return 0
