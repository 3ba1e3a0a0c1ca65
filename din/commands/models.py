"""``din models``: build the model zoo, list it, and serve a new version on a running executor.

A load command is signed by the operator principal (the stack's ``operator`` key file): an executor refuses one
that is not (``shared.security.control``)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import nats

from din.commands.target import keys_dir_of
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO, STATE_FILE_NAME, read_state, shown_path, state_nats
from din.stack.processes import StackError
from shared.bus.connect import nats_servers
from shared.catalog import ModelCatalog
from shared.contracts.events import LoadModelV1, ModelLoadedV1
from shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from shared.naming import Subjects
from shared.security import OPERATOR, ControlSigner, PrincipalKeys, key_file
from zoo.build import build_zoo


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="build, list and roll out models")
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build", help="train the zoo on scikit-learn's bundled digits and export it to ONNX (deterministic)"
    )
    build.add_argument("--out", type=Path, default=DEFAULT_MODEL_REPO, help="model repository (default %(default)s)")
    build.add_argument("--force", action="store_true", help="rebuild even when the repository is current")
    build.set_defaults(handler=cmd_build)

    listing = actions.add_parser("list", help="models in the repository with versions and held-out accuracy")
    listing.add_argument("--repo", type=Path, default=DEFAULT_MODEL_REPO)
    listing.set_defaults(handler=cmd_list)

    load = actions.add_parser(
        "load", help="make a running executor serve another version, without failing requests in flight"
    )
    load.add_argument("--executor", required=True, help="executor id")
    load.add_argument("--model", required=True)
    load.add_argument("--version", help="version to serve (default: the newest)")
    load.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR)
    load.set_defaults(handler=cmd_load)


def build_models(out: Path, force: bool = False) -> str:
    """Build the zoo into ``out``; return a one-line summary."""
    begun = time.monotonic()
    configs = build_zoo(out, force=force)
    names = ", ".join(
        f"{c.name} (v{', v'.join(sorted(c.accuracy))}: accuracy "
        f"{', '.join(f'{a:.3f}' for _, a in sorted(c.accuracy.items()))})"
        for c in configs
    )
    return f"models: {names} in {shown_path(out)} ({time.monotonic() - begun:.1f}s)"


def cmd_build(args: argparse.Namespace) -> int:
    print(build_models(args.out, args.force))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    catalog = ModelCatalog.from_repository(args.repo)
    if not catalog.names():
        raise StackError(f"no models in {args.repo}: run `din models build`")
    for name in catalog.names():
        entry = catalog.get(name)
        versions = ",".join(entry.versions)
        accuracy = "unknown" if entry.accuracy is None else f"{entry.accuracy:.3f}"
        print(f"{name:16} task={entry.task:22} versions={versions:6} best accuracy={accuracy}")
    for reason in catalog.skipped:
        print(f"left out: {reason}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    state = read_state(args.din_dir / STATE_FILE_NAME)
    if state is None:
        raise StackError("no stack is running: start one with `din up`")
    url, options = state_nats(state)
    operator = key_file(keys_dir_of(state), OPERATOR)
    signer = ControlSigner(PrincipalKeys.load(operator).identity if operator.exists() else None)
    loaded = asyncio.run(load_model(url, options, args.executor, LoadModelV1(model=args.model, version=args.version),
                                    signer))
    print(f"{args.executor} now serves {loaded.name} version {loaded.version}")
    return 0


async def load_model(url: str, options: dict, executor: str, command: LoadModelV1,
                     signer: ControlSigner) -> ModelLoadedV1:
    """Send ``command``, signed by ``signer`` (the operator's), to ``executor``; its answer, or ``StackError``."""
    nc = await nats.connect(nats_servers(url), **options)
    subject, body = Subjects.control("executor", executor), command.model_dump_json().encode()
    try:
        reply = await nc.request(subject, body, headers=signer.headers(subject, body), timeout=30)
    except nats.errors.NoRespondersError:
        raise StackError(f"no executor {executor!r} is running") from None
    finally:
        await nc.close()
    if reply.headers and DIN_ERROR_HEADER in reply.headers:
        raise StackError(ErrorReplyV1.model_validate_json(reply.data).error.message)
    return ModelLoadedV1.model_validate_json(reply.data)
