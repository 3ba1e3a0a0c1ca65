"""OpenAI-style completions over DIN's token streams. No HTTP here.

A ``CompletionRequestV1`` becomes a generation request (the prompt's UTF-8
bytes as a ``UINT8`` ``prompt`` tensor, ``Din-Max-Tokens``); the stream's
``StreamChunkV1`` messages become ``CompletionV1`` events (one per token, the
last with ``finish_reason`` and ``usage``), or, without ``stream``, one
completion of all the text.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import ValidationError

from din.shared.contracts.gateway import CompletionChoiceV1, CompletionRequestV1, CompletionUsageV1, CompletionV1
from din.shared.contracts.inference import StreamChunkV1
from din.shared.errors import DinError, ErrorCode

PROMPT_INPUT = "prompt"
SSE_DONE = b"data: [DONE]\n\n"


def read_completion(body: bytes) -> CompletionRequestV1:
    """Validate a completion request; ``DinError`` (bad_request, schema_violation) when it is not one DIN serves."""
    try:
        request = CompletionRequestV1.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise DinError(ErrorCode.BAD_REQUEST, "body is not valid JSON") from None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise DinError(ErrorCode.SCHEMA_VIOLATION, f"{where}: {first['msg']}") from None
    if request.n != 1:
        raise DinError(ErrorCode.BAD_REQUEST, "only n=1 is served (DIN decodes one greedy choice)")
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise DinError(ErrorCode.BAD_REQUEST, "exactly one prompt per request is served")
    return request


def prompt_text(request: CompletionRequestV1) -> str:
    return request.prompt[0] if isinstance(request.prompt, list) else request.prompt


def prompt_inputs(request: CompletionRequestV1) -> dict[str, np.ndarray]:
    """The generation request's input: the prompt's UTF-8 bytes, one row."""
    text = prompt_text(request)
    if not text:
        raise DinError(ErrorCode.BAD_REQUEST, "the prompt is empty")
    return {PROMPT_INPUT: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[None, :]}


def _usage(chunk: StreamChunkV1) -> CompletionUsageV1:
    prompt, completion = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    return CompletionUsageV1(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def stream_event(chunk: StreamChunkV1, model: str, created: int) -> bytes:
    """One server-sent event for a chunk of the stream."""
    event = CompletionV1(
        id=chunk.id, created=created, model=model,
        choices=[CompletionChoiceV1(index=0, text=chunk.text, finish_reason=chunk.finish_reason if chunk.done
                                    else None)],
        usage=_usage(chunk) if chunk.done else None,
    )
    return b"data: " + event.model_dump_json(exclude_none=True).encode() + b"\n\n"


def error_event(document: bytes) -> bytes:
    """A server-sent event carrying an error (the stream's end): OpenAI's ``{"error": {...}}`` shape."""
    error = json.loads(document)
    return b"event: error\ndata: " + json.dumps({"error": {"message": error["error"], "type": error["code"],
                                                           "code": error["code"]}}).encode() + b"\n\n"


def whole_completion(chunks: list[StreamChunkV1], model: str, created: int) -> CompletionV1:
    """All the stream's text as one completion (``chunks`` in order, the last with ``done``)."""
    last = chunks[-1]
    return CompletionV1(
        id=last.id, created=created, model=model,
        choices=[CompletionChoiceV1(index=0, text="".join(c.text for c in chunks), finish_reason=last.finish_reason)],
        usage=_usage(last),
    )
