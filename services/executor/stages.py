"""What an executor does for one stage of a multi-stage job, minus NATS: payloads in and out, prompts, tokens.

Between stages travels either

* an **intermediate tensor** (split inference): the head's output, protected
  (``shared.privacy``) and sent in the binary tensor form under the tail
  model's input name, so the tail reads it like any binary request; or
* a **decode state** (generation): the recurrent state after the prompt and the
  last token, as a NumPy ``.npz`` archive (read with ``allow_pickle=False``).

Either is sealed to the next stage's site by the executor; this module only
encodes and decodes, and refuses anything malformed with ``DinError``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from din.shared.contracts.job import JobV1, StageV1
from din.shared.errors import DinError, ErrorCode
from din.shared.privacy import Protection, parse_protection, protect
from din.shared.tensors import encode_binary

STATE_CONTENT_TYPE = "application/vnd.din.state+npz"
PROMPT_INPUT = "prompt"
MAX_PROMPT_CHARS = 16_384


@dataclass(frozen=True)
class DecodeState:
    """Where a generation stands: the recurrent state after the last token, that token, and tokens made so far."""

    state: np.ndarray
    token: int
    made: int


def describe(stage: StageV1) -> str:
    """``<kind>:<model>@<site>/<executor>`` for ``served_by.stages``."""
    return f"{stage.kind.value}:{stage.model}@{stage.site}/{stage.executor or 'queue'}"


def prompt_tokens(inputs: dict[str, np.ndarray], vocab: str) -> np.ndarray:
    """The ``prompt`` input (UTF-8 bytes as a UINT8 tensor) as token ids, shape [1, T]; characters outside the
    model's vocabulary are refused."""
    raw = inputs.get(PROMPT_INPUT)
    if raw is None or raw.dtype != np.uint8:
        raise DinError(ErrorCode.SCHEMA_VIOLATION, f"generation needs a UINT8 input named {PROMPT_INPUT!r} "
                                                   "holding the prompt's UTF-8 bytes")
    try:
        text = bytes(np.ascontiguousarray(raw).reshape(-1)).decode("utf-8")
    except UnicodeDecodeError:
        raise DinError(ErrorCode.BAD_REQUEST, "the prompt is not valid UTF-8") from None
    if not text:
        raise DinError(ErrorCode.BAD_REQUEST, "the prompt is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise DinError(ErrorCode.PAYLOAD_TOO_LARGE, f"the prompt has {len(text)} characters; at most "
                                                    f"{MAX_PROMPT_CHARS}")
    index = {char: i for i, char in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        raise DinError(ErrorCode.BAD_REQUEST, f"the prompt has characters outside the model's vocabulary: "
                                              f"{''.join(unknown[:10])!r}")
    return np.array([[index[c] for c in text]], dtype=np.int64)


def encode_state(state: DecodeState) -> bytes:
    """A decode state as the payload handed from prefill to decode."""
    buffer = io.BytesIO()
    np.savez(buffer, state=np.asarray(state.state, dtype=np.float32),
             token=np.array([state.token], dtype=np.int64), made=np.array([state.made], dtype=np.int64))
    return buffer.getvalue()


def decode_state(payload: bytes, hidden: int, vocab_size: int) -> DecodeState:
    """Read ``encode_state``'s payload; ``DinError(BAD_REQUEST)`` when it is not one for a model with a state of
    ``hidden`` and ``vocab_size`` tokens."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            state = np.asarray(archive["state"], dtype=np.float32)
            token = int(archive["token"][0])
            made = int(archive["made"][0])
    except Exception:
        raise DinError(ErrorCode.BAD_REQUEST, "the decode state handed on is not readable") from None
    if state.shape != (1, hidden):
        raise DinError(ErrorCode.BAD_REQUEST, f"the decode state has shape {state.shape}, expected (1, {hidden})")
    if not np.isfinite(state).all():
        raise DinError(ErrorCode.BAD_REQUEST, "the decode state holds values that are not finite")
    if not 0 <= token < vocab_size or made < 1:
        raise DinError(ErrorCode.BAD_REQUEST, f"the decode state's token {token} or count {made} is out of range")
    return DecodeState(state, token, made)


def intermediate(job: JobV1, outputs: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[bytes, dict[str, str]]:
    """The split head's output, protected as the job asks, in the binary tensor form named for the tail's input."""
    point = job.plan[job.stage].output
    if point not in outputs:
        raise DinError(ErrorCode.INTERNAL, f"the head produced no tensor {point!r}")
    method, strength = parse_protection(job.split_protection) if job.split_protection else (Protection.NONE, 0.0)
    return encode_binary(point, protect(outputs[point], method, strength, rng))


def next_token(logits: np.ndarray) -> int:
    """Greedy decoding: the most likely next token."""
    return int(np.asarray(logits).reshape(-1).argmax())
