"""What an executor does for one stage of a multi-stage job: prompts, decode states, intermediates, tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest

from din.services.executor.stages import (
    MAX_PROMPT_CHARS,
    DecodeState,
    decode_state,
    describe,
    encode_state,
    intermediate,
    next_token,
    prompt_tokens,
)
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1, StageKind, StageV1
from din.shared.errors import DinError, ErrorCode
from din.shared.tensors import decode_binary

VOCAB = "\n abch"
HIDDEN = 8


def refused(code: ErrorCode, call) -> DinError:
    with pytest.raises(DinError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def utf8(text: str | bytes) -> dict[str, np.ndarray]:
    raw = text.encode() if isinstance(text, str) else text
    return {"prompt": np.frombuffer(raw, dtype=np.uint8).reshape(1, -1)}


# --- prompt_tokens ---------------------------------------------------------------------------------------------------


def test_a_prompt_becomes_token_ids_in_the_vocabulary_order():
    tokens = prompt_tokens(utf8("ab c\n"), VOCAB)
    assert tokens.dtype == np.int64 and tokens.shape == (1, 5)
    assert tokens.tolist() == [[2, 3, 1, 4, 0]]
    assert prompt_tokens(utf8("h" * MAX_PROMPT_CHARS), VOCAB).shape == (1, MAX_PROMPT_CHARS)


@pytest.mark.parametrize(
    ("inputs", "code", "says"),
    [
        ({}, ErrorCode.SCHEMA_VIOLATION, "UINT8"),
        ({"text": np.frombuffer(b"abc", np.uint8)}, ErrorCode.SCHEMA_VIOLATION, "prompt"),
        ({"prompt": np.array([[97, 98]], dtype=np.int64)}, ErrorCode.SCHEMA_VIOLATION, "UINT8"),
        ({"prompt": np.array([[97.0]], dtype=np.float32)}, ErrorCode.SCHEMA_VIOLATION, "UINT8"),
        (utf8(b"ab\xff"), ErrorCode.BAD_REQUEST, "UTF-8"),
        (utf8(b"\xc3"), ErrorCode.BAD_REQUEST, "UTF-8"),  # a truncated multi-byte character
        (utf8(b""), ErrorCode.BAD_REQUEST, "empty"),
        (utf8("abz"), ErrorCode.BAD_REQUEST, "'z'"),
        (utf8("aé"), ErrorCode.BAD_REQUEST, "vocabulary"),
        (utf8("a" * (MAX_PROMPT_CHARS + 1)), ErrorCode.PAYLOAD_TOO_LARGE, str(MAX_PROMPT_CHARS)),
    ],
    ids=["missing", "misnamed", "int64", "float32", "invalid-utf8", "truncated-utf8", "empty", "out-of-vocab",
         "non-ascii-out-of-vocab", "too-long"],
)
def test_bad_prompts_are_refused_with_a_code(inputs, code, says):
    assert says in refused(code, lambda: prompt_tokens(inputs, VOCAB)).message


# --- decode state ----------------------------------------------------------------------------------------------------


def test_a_decode_state_survives_the_hand_over():
    state = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    back = decode_state(encode_state(DecodeState(state, token=3, made=5)), HIDDEN, len(VOCAB))
    np.testing.assert_array_equal(back.state, state)
    assert back.state.dtype == np.float32
    assert (back.token, back.made) == (3, 5)


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD = {"state": np.zeros((1, HIDDEN), np.float32), "token": np.array([1]), "made": np.array([1])}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not an npz archive",
        b"PK\x03\x04" + b"\x00" * 40,  # a zip header and nothing behind it
        _npz(state=GOOD["state"], token=GOOD["token"]),  # no 'made'
        _npz(**{**GOOD, "token": np.array([], dtype=np.int64)}),
        _npz(**{**GOOD, "state": np.array([{"a": 1}], dtype=object)}),  # would need pickle to read
    ],
    ids=["empty", "garbage", "broken-zip", "missing-made", "empty-token", "pickled-object"],
)
def test_an_unreadable_decode_state_is_a_bad_request(payload):
    assert "not readable" in refused(ErrorCode.BAD_REQUEST, lambda: decode_state(payload, HIDDEN, len(VOCAB))).message


@pytest.mark.parametrize(
    "state",
    [
        np.zeros((1, HIDDEN + 1), np.float32),
        np.zeros((HIDDEN,), np.float32),
        np.zeros((2, HIDDEN), np.float32),
        np.full((1, HIDDEN), np.nan, np.float32),
        np.array([[0.0] * (HIDDEN - 1) + [np.inf]], np.float32),
    ],
    ids=["too-wide", "no-batch-axis", "two-rows", "nan", "inf"],
)
def test_a_decode_state_of_the_wrong_shape_or_not_finite_is_refused(state):
    payload = encode_state(DecodeState(state, token=0, made=1))
    refused(ErrorCode.BAD_REQUEST, lambda: decode_state(payload, HIDDEN, len(VOCAB)))


@pytest.mark.parametrize("token, made", [(-1, 1), (len(VOCAB), 1), (10**9, 1), (0, 0), (0, -3)])
def test_a_decode_state_with_a_token_or_count_out_of_range_is_refused(token, made):
    payload = encode_state(DecodeState(np.zeros((1, HIDDEN), np.float32), token=token, made=made))
    assert "out of range" in refused(ErrorCode.BAD_REQUEST,
                                     lambda: decode_state(payload, HIDDEN, len(VOCAB))).message


# --- intermediate ----------------------------------------------------------------------------------------------------


def split_job(protection: str | None, point: str = "hidden_1") -> JobV1:
    return JobV1(
        request_id="r1", tenant="acme", model="digits-large", sla_class=SlaClass.INTERACTIVE, deadline_ms=10**13,
        reply_to="_INBOX.x", content_type="application/json", received_ms=0.0, split=point, protection=protection,
        plan=[
            StageV1(kind=StageKind.SPLIT_HEAD, model=f"digits-large-head-{point}", site="factory", output=point),
            StageV1(kind=StageKind.SPLIT_TAIL, model=f"digits-large-tail-{point}", site="cloud", output="answer"),
        ],
        stage=0,
    )


HIDDEN_1 = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)


@pytest.mark.parametrize("protection", [None, "none"])
def test_an_unprotected_intermediate_keeps_its_values_under_the_split_points_name(protection):
    body, headers = intermediate(split_job(protection), {"hidden_1": HIDDEN_1, "other": HIDDEN_1 * 2},
                                 np.random.default_rng(0))
    name, array = decode_binary(body, headers)
    assert name == "hidden_1"
    np.testing.assert_array_equal(array, HIDDEN_1)


def test_quantize_protection_changes_the_values_but_keeps_the_shape_and_name():
    body, headers = intermediate(split_job("quantize:4", "hidden_2"), {"hidden_2": HIDDEN_1}, np.random.default_rng(0))
    name, array = decode_binary(body, headers)
    assert name == "hidden_2"
    assert array.shape == HIDDEN_1.shape and array.dtype == np.float32
    assert not np.array_equal(array, HIDDEN_1)
    assert len(np.unique(array[0])) <= 16  # four bits: at most 16 levels per item
    step = (HIDDEN_1.max(axis=1) - HIDDEN_1.min(axis=1)) / 15
    assert np.all(np.abs(array - HIDDEN_1) <= step[:, None] / 2 + 1e-6)


def test_noise_protection_perturbs_the_intermediate():
    body, headers = intermediate(split_job("noise:0.5"), {"hidden_1": HIDDEN_1}, np.random.default_rng(0))
    _, array = decode_binary(body, headers)
    assert array.shape == HIDDEN_1.shape and not np.allclose(array, HIDDEN_1)


def test_a_head_without_the_split_points_output_is_an_internal_error():
    error = refused(ErrorCode.INTERNAL, lambda: intermediate(split_job(None), {"hidden_2": HIDDEN_1},
                                                             np.random.default_rng(0)))
    assert "hidden_1" in error.message


# --- tokens and descriptions -----------------------------------------------------------------------------------------


def test_next_token_is_the_most_likely_one():
    assert next_token(np.array([[0.1, 2.0, -1.0, 1.9]], np.float32)) == 1
    assert next_token(np.array([5.0, 1.0])) == 0


def test_describe_names_kind_model_site_and_executor_or_queue():
    placed = StageV1(kind=StageKind.PREFILL, model="charlm-prefill", site="factory", executor="factory-1",
                     output="state")
    assert describe(placed) == "prefill:charlm-prefill@factory/factory-1"
    queued = placed.model_copy(update={"kind": StageKind.DECODE, "model": "charlm", "executor": None})
    assert describe(queued) == "decode:charlm@factory/queue"
