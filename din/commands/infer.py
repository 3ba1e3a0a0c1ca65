"""``din infer``: send one request to the running stack (or one named by ``--nats-url`` and ``--keys-dir``, such as
a docker compose stack) as a tenant and print the answer.

Without ``--prompt`` it classifies a held-out digit (optionally split across sites with ``--split``);
with ``--prompt`` it streams generated text to stdout as it arrives, then one JSON line summing up the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from din.client import DinClient, DinRequestError, NoAnswerError
from din.commands.target import add_stack_arguments
from din.commands.token import running_tenant
from din.shared.contracts.inference import InferResponseV1, SlaClass, StreamChunkV1
from din.shared.contracts.options import RequestOptionsV1
from din.stack.launcher import DEFAULT_MODEL_REPO
from din.workload import load_digits_test

DIGITS_MODEL = "digits-small"
TEXT_MODEL = "charlm"
DEFAULT_MAX_TOKENS = 32
OPTIONS_NOT_OFFERED = {
    "token": "the tenant's credentials give it",
    "request_id": "the client assigns one per request",
    "traceparent": "a single command has no trace to join",
    "deadline_ms": "--timeout-ms sets the time budget",
}
"""Request options (``RequestOptionsV1`` fields) ``din infer`` has no flag for, and why."""


def register(subparsers: argparse._SubParsersAction) -> None:
    infer = subparsers.add_parser(
        "infer",
        help="send one inference request (a held-out digit, or a prompt to continue) to the running stack "
        "and print the answer",
    )
    infer.add_argument("--tenant", required=True)
    infer.add_argument("--model", help=f"default: {DIGITS_MODEL}, or {TEXT_MODEL} with --prompt")
    infer.add_argument("--sample", type=int, default=0, help="index of the held-out digit to send")
    infer.add_argument("--sla", choices=[c.value for c in SlaClass], default="interactive",
                       help=option_help("sla_class"))
    infer.add_argument("--timeout-ms", type=int, help=option_help("timeout_ms"))
    infer.add_argument("--labels", default="", help=option_help("labels"))
    infer.add_argument("--allow-degrade", action="store_true", help=option_help("allow_degrade"))
    infer.add_argument("--min-accuracy", type=float, help=option_help("min_accuracy"))
    infer.add_argument("--version", help=option_help("model_version"))
    infer.add_argument("--binary", action="store_true", help="send the compact binary tensor form")
    cascade = infer.add_mutually_exclusive_group()
    cascade.add_argument("--cascade", type=float, metavar="THRESHOLD", help=option_help("cascade_threshold"))
    cascade.add_argument("--cascade-rate", type=float, metavar="FRACTION", help=option_help("cascade_target_rate"))
    mode = infer.add_mutually_exclusive_group()
    mode.add_argument("--split", metavar="{auto,none,<point>}", help=option_help("split"))
    mode.add_argument("--prompt", help="generate text continuing this prompt, streamed as it arrives")
    infer.add_argument("--split-protection", help=option_help("split_protection"))
    infer.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"(with --prompt, default {DEFAULT_MAX_TOKENS}) " + option_help("max_tokens"))
    infer.add_argument("--site", help="connect to this site's own NATS server (default: the hub's), as a client "
                       "at that site would")
    infer.add_argument("--model-repo", type=Path, default=Path(os.environ.get("DIN_MODEL_REPO") or DEFAULT_MODEL_REPO),
                       help="where the held-out digits are (default $DIN_MODEL_REPO, else %(default)s)")
    add_stack_arguments(infer)
    infer.set_defaults(handler=cmd_infer)


def pick_model(args: argparse.Namespace) -> str:
    """The model asked for, else the default for the kind of request (generation or digit)."""
    if args.model:
        return args.model
    return TEXT_MODEL if args.prompt is not None else DIGITS_MODEL


def option_help(field: str) -> str:
    """A flag's help: the option's description in the request contract (``%`` escaped for argparse)."""
    return (RequestOptionsV1.model_fields[field].description or "").replace("%", "%%")


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client options (``DinClient.infer`` and ``generate``) the command line asks for.

    Every option of ``RequestOptionsV1`` has a flag but those in ``OPTIONS_NOT_OFFERED``; ``max_tokens`` goes to
    ``generate`` with ``--prompt``.
    """
    return {
        "sla": args.sla,
        "timeout_ms": args.timeout_ms,
        "labels": [label for label in args.labels.split(",") if label],
        "allow_degrade": args.allow_degrade,
        "min_accuracy": args.min_accuracy,
        "version": args.version,
        "binary": args.binary,
        "cascade": args.cascade,
        "cascade_rate": args.cascade_rate,
        "split": args.split,
        "split_protection": args.split_protection,
    }


def error_json(exc: DinRequestError) -> str:
    """The network's error, as ``{"error": {...}}``."""
    return json.dumps({"error": exc.error.model_dump(mode="json", exclude_none=True)}, indent=2)


def answer_json(response: InferResponseV1, label: int, truth: int) -> str:
    """A digit's answer without its raw outputs, with the predicted and the true label."""
    answer = response.model_dump(mode="json", exclude={"outputs"})
    answer["label"] = label
    answer["true_label"] = truth
    return json.dumps(answer, indent=2)


def stream_summary(last: StreamChunkV1) -> str:
    """One JSON line from a stream's last chunk: where it ran, its timings and why it ended."""
    return json.dumps(last.model_dump(mode="json", include={"served_by", "timings_ms", "finish_reason"}))


def report_failure(exc: DinRequestError | NoAnswerError) -> int:
    """Print a failed request (the error's JSON, or one line when nothing answered); the exit code."""
    if isinstance(exc, DinRequestError):
        print(error_json(exc))
    else:
        print(f"din: error: {exc}", file=sys.stderr)
    return 1


async def stream_text(chunks: AsyncIterable[StreamChunkV1], out: TextIO) -> StreamChunkV1 | None:
    """Write each chunk's text to ``out`` as it arrives and end the line; the last chunk.

    When the stream fails after some text, the line is ended before the error propagates.
    """
    last = None
    wrote = False
    try:
        async for chunk in chunks:
            out.write(chunk.text)
            out.flush()
            wrote = wrote or bool(chunk.text)
            last = chunk
    except BaseException:
        if wrote:
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    return last


def cmd_infer(args: argparse.Namespace) -> int:
    url, token, keys, options = running_tenant(args, args.tenant, args.site)
    if args.prompt is not None:
        return asyncio.run(_generate(url, token, keys, options, args))
    x, y = load_digits_test(args.model_repo)
    return asyncio.run(_infer(url, token, keys, options, args, x[args.sample : args.sample + 1],
                              int(y[args.sample])))


async def _infer(url: str, token: str, keys, options: dict, args: argparse.Namespace, row: np.ndarray,
                 truth: int) -> int:
    async with await DinClient.connect(url, args.tenant, token, keys, options=options, site=args.site) as client:
        try:
            result = await client.infer(pick_model(args), {"input": row}, **request_options(args))
        except (DinRequestError, NoAnswerError) as exc:
            return report_failure(exc)
    print(answer_json(result.response, int(result.outputs["label"][0]), truth))
    return 0


async def _generate(url: str, token: str, keys, options: dict, args: argparse.Namespace) -> int:
    async with await DinClient.connect(url, args.tenant, token, keys, options=options, site=args.site) as client:
        chunks = client.generate(pick_model(args), args.prompt, args.max_tokens, **request_options(args))
        try:
            last = await stream_text(chunks, sys.stdout)
        except (DinRequestError, NoAnswerError) as exc:
            return report_failure(exc)
    if last is not None:
        print(stream_summary(last))
    return 0
