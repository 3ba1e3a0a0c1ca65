"""``din models``: build the model zoo, list it, add your own ONNX model, and serve a version on a running executor.

A load command is signed by the operator principal (the stack's ``operator`` key file): an executor refuses one
that is not (``shared.security.control``)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import nats

from din.commands.target import keys_dir_of
from din.model_import import ModelImportError, add_model
from din.shared.bus.connect import nats_servers
from din.shared.catalog import REFRESH_S, ModelCatalog
from din.shared.contracts.events import LoadModelV1, ModelLoadedV1
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.security import OPERATOR, ControlSigner, PrincipalKeys, key_file
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO, STATE_FILE_NAME, read_state, shown_path, state_nats
from din.stack.processes import StackError
from din.zoo.build import build_zoo, default_cache_dir

LOAD_TIMEOUT_S = 30.0
"""How long a load command waits for the executor (opening and warming a large graph takes a while)."""


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

    add = actions.add_parser(
        "add", help="add an ONNX graph as a model (or the next version of one), its config derived from the graph; "
                    "the network knows it within seconds, no restart")
    add.add_argument("graph", type=Path, help="the .onnx file")
    add.add_argument("--name", required=True, help="model name (A-Z a-z 0-9 _ -)")
    add.add_argument("--version", help="version to add (default: 1, or the model's next number)")
    add.add_argument("--task", help="task, e.g. tabular-classification: models of one task and inputs are variants "
                                    "of each other (default: unknown, or the model's)")
    add.add_argument("--description", default="", help="what the model is")
    add.add_argument("--accuracy", type=float, help="held-out accuracy of this version (prefers it among variants)")
    add.add_argument("--max-batch-size", type=int, help="largest batch one run takes (default: 64, or the graph's)")
    add.add_argument("--repo", type=Path, default=DEFAULT_MODEL_REPO, help="model repository (default %(default)s)")
    add.add_argument("--serve-on", action="append", default=[], metavar="EXECUTOR",
                     help="then make this executor of the running stack serve it (repeatable)")
    add.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR)
    add.set_defaults(handler=cmd_add)

    load = actions.add_parser(
        "load", help="make a running executor serve another version, without failing requests in flight"
    )
    load.add_argument("--executor", required=True, help="executor id")
    load.add_argument("--model", required=True)
    load.add_argument("--version", help="version to serve (default: the newest)")
    load.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR)
    load.set_defaults(handler=cmd_load)


def build_models(out: Path, force: bool = False) -> str:
    """Build the zoo into ``out`` (copied from the cache of built zoos when one was built from the same recipes);
    return a one-line summary."""
    begun = time.monotonic()
    configs = build_zoo(out, force=force, cache_dir=default_cache_dir())
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


def cmd_add(args: argparse.Namespace) -> int:
    try:
        added = add_model(args.repo, args.graph, args.name, version=args.version, task=args.task,
                          description=args.description, accuracy=args.accuracy, max_batch_size=args.max_batch_size)
    except ModelImportError as exc:
        raise StackError(str(exc)) from None
    config = added.config
    print(f"added {config.name} version {added.version} to {shown_path(args.repo)}: inputs "
          f"{_tensors(config.inputs)}, outputs {_tensors(config.outputs)}, max batch {config.max_batch_size}")
    if added.left_out:
        print(f"left out (not tensors): {', '.join(added.left_out)}")
    for executor in args.serve_on:
        loaded = serve_on(args.din_dir, executor, config.name, added.version)
        print(f"{executor} now serves {loaded.name} version {loaded.version}")
    if not args.serve_on:
        print(f"admission, classifier and scheduler know it within {REFRESH_S:g} s; serve it with "
              f"`din models load --executor ID --model {config.name}` (or list it in the topology's executors)")
    return 0


def _tensors(tensors) -> str:
    return ", ".join(f"{t.name} {t.datatype.value}{t.shape}" for t in tensors)


def cmd_load(args: argparse.Namespace) -> int:
    loaded = serve_on(args.din_dir, args.executor, args.model, args.version)
    print(f"{args.executor} now serves {loaded.name} version {loaded.version}")
    return 0


def serve_on(din_dir: Path, executor: str, model: str, version: str | None) -> ModelLoadedV1:
    """Make ``executor`` of the stack running from ``din_dir`` serve ``model`` at ``version``, signed by the
    stack's operator key."""
    state = read_state(din_dir / STATE_FILE_NAME)
    if state is None:
        raise StackError("no stack is running: start one with `din up`")
    url, options = state_nats(state)
    operator = key_file(keys_dir_of(state), OPERATOR)
    signer = ControlSigner(PrincipalKeys.load(operator).identity if operator.exists() else None)
    return asyncio.run(load_model(url, options, executor, LoadModelV1(model=model, version=version), signer))


async def load_model(url: str, options: dict, executor: str, command: LoadModelV1,
                     signer: ControlSigner) -> ModelLoadedV1:
    """Send ``command``, signed by ``signer`` (the operator's), to ``executor``; its answer, or ``StackError``."""
    nc = await nats.connect(nats_servers(url), **options)
    subject, body = Subjects.control("executor", executor), command.model_dump_json().encode()
    try:
        reply = await nc.request(subject, body, headers=signer.headers(subject, body), timeout=LOAD_TIMEOUT_S)
    except nats.errors.NoRespondersError:
        raise StackError(f"no executor {executor!r} is running") from None
    except nats.errors.TimeoutError:
        raise StackError(f"executor {executor!r} did not answer within {LOAD_TIMEOUT_S:g} s: see its log") from None
    finally:
        await nc.close()
    if reply.headers and DIN_ERROR_HEADER in reply.headers:
        raise StackError(ErrorReplyV1.model_validate_json(reply.data).error.message)
    return ModelLoadedV1.model_validate_json(reply.data)
