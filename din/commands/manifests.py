"""``din manifests``: regenerate the Kubernetes manifests (``ops/kubernetes/*.yaml``) from their topologies, or
check them; and ``din manifests secrets``, the Secrets they reference, made outside the repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from din.generated import check_or_write
from din.kubernetes import MANIFESTS, drifted, write_manifests, write_secrets
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_TOPOLOGY


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``manifests``."""
    sources = ", ".join(f"ops/kubernetes/{name} from {path.name}" for name, path in MANIFESTS.items())
    parser = subparsers.add_parser(
        "manifests",
        help="generate the Kubernetes manifests (ops/kubernetes) from the topologies",
        description=f"Write {sources} (ops/topology): NATS, Kafka, every DIN service and executor with the "
        "environment `din up` gives it, each executor pool as a StatefulSet scaled by a KEDA ScaledObject, "
        "Prometheus. With --check, write nothing and exit 1 when a committed file differs from a fresh render. "
        "`din manifests secrets` makes the Secrets they reference.",
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 and name drifted files")
    parser.set_defaults(handler=cmd_manifests)
    steps = parser.add_subparsers(dest="manifests_step", metavar="STEP")

    secrets = steps.add_parser(
        "secrets", help="make a deployment's keys and credentials and write them as Kubernetes Secrets",
        description="Make (or complete: existing ones are kept) what `din compose init` makes for a topology — "
        "keys, the bus for the Service host names, tenants' credentials, each server's files — in --out, "
        "and write <out>/secrets.yaml (mode 0600) for `kubectl apply -f`: din-keys with only the files some "
        "pod mounts, nats-<site>-bus per site, kafka-bus. Keep --out private; never commit it.")
    secrets.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    secrets.add_argument("--out", type=Path, help="where the secrets go (default: $DIN_DIR/kubernetes/<topology>)")
    secrets.set_defaults(handler=cmd_secrets)


def cmd_manifests(args: argparse.Namespace) -> int:
    """Write the manifests, or with ``--check`` report the ones that drifted."""
    return check_or_write(args.check, "Kubernetes manifest(s)", drifted, write_manifests,
                          current="the Kubernetes manifests are up to date",
                          command="manifests")


def cmd_secrets(args: argparse.Namespace) -> int:
    out = args.out or DEFAULT_DIN_DIR / "kubernetes" / args.topology.stem
    try:
        target = write_secrets(args.topology, out)
    except ValueError as exc:  # a file the pods mount that the init step did not make
        print(f"din: error: {exc}", file=sys.stderr)
        return 2
    print(f"din manifests secrets: wrote {target}; apply it with `kubectl apply -f {target}` before the manifest")
    return 0
