"""Generation at an executor, minus NATS: a prompt into the prefill model's inputs, decode steps, stream chunks.

The prefill stage reads the prompt and streams the first token; the decode
stage runs one token per step (steps of concurrent streams batch together in
the batcher) and streams each as it comes, then a last ``done`` chunk with the
stream's timings and token counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from din.services.executor.answers import now_ms, rounded
from din.services.executor.batcher import DynamicBatcher, ItemResult
from din.services.executor.stages import DecodeState, next_token, prompt_tokens
from din.shared.contracts.inference import ServedByV1, StreamChunkV1
from din.shared.contracts.job import JobV1
from din.shared.contracts.model_config import ModelConfigV1
from din.shared.errors import DinError, ErrorCode
from din.shared.lifecycle import FIRST_TOKEN_STAMP


@dataclass(frozen=True)
class DecodeStep:
    """One decode step's token (chunk ``seq`` of the stream), the state after it, and the batch it ran in."""

    seq: int
    token: int
    state: DecodeState
    result: ItemResult


def prefill_inputs(job: JobV1, inputs: dict[str, np.ndarray], config: ModelConfigV1) -> dict[str, np.ndarray]:
    """The prefill model's inputs for the request's prompt (the job learns the prompt's length in tokens)."""
    tokens = prompt_tokens(inputs, config.vocab)
    job.prompt_tokens = tokens.shape[1]
    return {"tokens": tokens, "state": np.zeros((1, int(config.hidden)), np.float32)}


def prefill_state(result: ItemResult) -> DecodeState:
    """Where the generation stands after the prefill: its state and first token."""
    return DecodeState(result.outputs["state_out"], next_token(result.outputs["logits"]), 1)


def token_chunk(job: JobV1, seq: int, token: int, vocab: str) -> StreamChunkV1:
    """Chunk ``seq`` of ``job``'s stream: one token."""
    return StreamChunkV1(id=job.request_id, seq=seq, text=vocab[token], token=token)


async def decode_steps(batcher: DynamicBatcher, model: str, job: JobV1, state: DecodeState,
                       cutoff_ms: float) -> AsyncIterator[DecodeStep]:
    """The decode steps from ``state`` to ``job.max_tokens``; ``DEADLINE_EXCEEDED`` once ``cutoff_ms`` passed."""
    for seq in range(state.made, job.max_tokens):
        if now_ms() >= cutoff_ms:
            raise DinError(ErrorCode.DEADLINE_EXCEEDED, "the deadline came before the last token")
        result = await batcher.submit(model, {"token": np.array([state.token], np.int64), "state": state.state},
                                      sla_class=job.sla_class, tenant=job.tenant, deadline_ms=cutoff_ms)
        token = next_token(result.outputs["logits"])
        state = DecodeState(result.outputs["state_out"], token, seq + 1)
        yield DecodeStep(seq, token, state, result)


def stream_timings(job: JobV1, last_token_ms: float, now: float) -> dict[str, float]:
    """A stream's timings, ms: time to first token, per output token, the prefill's compute, the state's hand-off
    (prefill to decode) and the total."""
    stamps = job.stamps_ms
    return {
        "ttft": stamps[FIRST_TOKEN_STAMP] - job.received_ms,
        "tpot": (last_token_ms - stamps[FIRST_TOKEN_STAMP]) / max(1, job.max_tokens - 1),
        "prefill": stamps.get("prefill_compute", 0.0),
        "state_transfer": stamps["decode_start"] - stamps[FIRST_TOKEN_STAMP],
        "total": now - job.received_ms,
    }


def last_chunk(job: JobV1, served: ServedByV1, timings: dict[str, float]) -> StreamChunkV1:
    """The stream's closing chunk: who served it, its token counts and timings."""
    return StreamChunkV1(id=job.request_id, seq=job.max_tokens, text="", done=True, finish_reason="length",
                         served_by=served, prompt_tokens=job.prompt_tokens, completion_tokens=job.max_tokens,
                         timings_ms=rounded(timings))
