"""``din infer``: send one request to the running stack as a tenant and print the answer."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from din.client import DinClient, DinRequestError
from din.commands.token import running_tenant
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO
from din.workload import load_digits_test
from shared.contracts.inference import SlaClass


def register(subparsers: argparse._SubParsersAction) -> None:
    infer = subparsers.add_parser(
        "infer", help="send one inference request (a held-out digit) to the running stack and print the answer"
    )
    infer.add_argument("--tenant", required=True)
    infer.add_argument("--model", default="digits-small")
    infer.add_argument("--sample", type=int, default=0, help="index of the held-out digit to send")
    infer.add_argument("--sla", choices=[c.value for c in SlaClass], default="interactive")
    infer.add_argument("--timeout-ms", type=int)
    infer.add_argument("--labels", default="", help="comma-separated sensitivity labels, e.g. pii")
    infer.add_argument("--allow-degrade", action="store_true")
    infer.add_argument("--version")
    infer.add_argument("--binary", action="store_true", help="send the compact binary tensor form")
    infer.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR)
    infer.set_defaults(handler=cmd_infer)


def cmd_infer(args: argparse.Namespace) -> int:
    url, token, keys = running_tenant(args.din_dir, args.tenant)
    x, y = load_digits_test(DEFAULT_MODEL_REPO)
    return asyncio.run(_infer(url, token, keys, args, x[args.sample : args.sample + 1], int(y[args.sample])))


async def _infer(url: str, token: str, keys, args: argparse.Namespace, row: np.ndarray, truth: int) -> int:
    async with await DinClient.connect(url, args.tenant, token, keys) as client:
        try:
            result = await client.infer(
                args.model, {"input": row}, sla=args.sla, timeout_ms=args.timeout_ms,
                labels=[label for label in args.labels.split(",") if label], allow_degrade=args.allow_degrade,
                version=args.version, binary=args.binary,
            )
        except DinRequestError as exc:
            print(json.dumps({"error": exc.error.model_dump(mode="json", exclude_none=True)}, indent=2))
            return 1
    answer = result.response.model_dump(mode="json", exclude={"outputs"})
    answer["label"] = int(result.outputs["label"][0])
    answer["true_label"] = truth
    print(json.dumps(answer, indent=2))
    return 0
