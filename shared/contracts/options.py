"""The request options: everything a client may ask of one request, declared once.

Each option is a field of ``RequestOptionsV1`` with its type, default and
description, annotated with a ``WireOption``: the request header that carries it
(a ``RequestHeaders`` name), its key in the OIP ``parameters`` of a JSON body,
how its text is read (raising ``DinError(BAD_REQUEST)`` with a message for the
caller) and written. ``ServingOptionsV1`` holds the options that travel with the
job as they came (``JobV1`` and ``RecordedRequestV1`` inherit them); the rest
(token, time budget, request id, trace context) are resolved at admission.

Admission's intake (``read_options``), the job, the recording and replay
(``option_headers``), the Python client and ``din infer`` derive from these
declarations, so a new option is one new field here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from din.shared.cascade import TARGET_PREFIX, parse_cascade
from din.shared.contracts.inference import JSON_CONTENT_TYPE, TENSOR_CONTENT_TYPE, RequestHeaders, SlaClass
from din.shared.errors import DinError, ErrorCode
from din.shared.privacy import parse_protection

MAX_TIMEOUT_MS = 600_000
DEFAULT_TIMEOUT_MS = {SlaClass.REALTIME: 1_000, SlaClass.INTERACTIVE: 5_000, SlaClass.BATCH: 60_000}
"""A request's timeout when it asks for none, by SLA class (admission's deadline, the gateway's wait)."""
MAX_LABELS = 16
MAX_LABEL = 64
MAX_TOKENS_LIMIT = 512
MAX_REQUEST_ID = 128
MAX_SPLIT_NAME = 64
SPLIT_AUTO = "auto"
SPLIT_NONE = "none"


def _bad(message: str) -> DinError:
    return DinError(ErrorCode.BAD_REQUEST, message)


def parse_flag(raw: object) -> bool:
    """A boolean option: ``true``/``1``/``yes``/``on`` (any case) or a JSON boolean."""
    if isinstance(raw, bool):
        return raw
    return str(raw).strip().lower() in ("1", "true", "yes", "on")


def _sla_class(raw: object) -> SlaClass:
    try:
        return SlaClass(str(raw or SlaClass.INTERACTIVE.value))
    except ValueError:
        raise _bad(f"unknown SLA class {raw!r}: use realtime, interactive or batch") from None


def _whole_ms(raw: object) -> int:
    try:
        return int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise _bad("timeout_ms and deadline_ms must be whole numbers") from None


def _labels(raw: object) -> list[str]:
    if not raw:
        return []
    if isinstance(raw, str):
        labels = [label for label in (s.strip() for s in raw.split(",")) if label]
    elif isinstance(raw, (list, tuple)) and all(isinstance(label, str) for label in raw):
        labels = [label for label in raw if label]
    else:
        raise _bad("labels must be a comma-separated string or a list of strings")
    if len(labels) > MAX_LABELS or any(len(label) > MAX_LABEL or not label.isprintable() for label in labels):
        raise _bad(f"at most {MAX_LABELS} labels, each at most {MAX_LABEL} printable characters")
    return labels


def _accuracy(raw: object) -> float:
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _bad("min_accuracy must be a number between 0 and 1") from None


def _text(raw: object) -> str:
    return str(raw)


def _cascade_threshold(raw: object) -> float | None:
    return parse_cascade(raw).threshold


def _cascade_target_rate(raw: object) -> float | None:
    return parse_cascade(raw).target_rate


def _max_tokens(raw: object) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TOKENS_LIMIT:
        raise _bad(f"max_tokens must be a whole number from 1 to {MAX_TOKENS_LIMIT}, not {raw!r}")
    return value


def _split(raw: object) -> str:
    split = raw.strip() if isinstance(raw, str) else ""
    if not split or not split.isprintable() or len(split) > MAX_SPLIT_NAME:
        raise _bad("split must be 'auto', 'none' or a split point name")
    return split


def _split_protection(raw: object) -> str:
    parse_protection(str(raw))
    return str(raw).strip()


def parse_request_id(raw: object) -> str:
    """A request id: at most ``MAX_REQUEST_ID`` printable characters; ``DinError(BAD_REQUEST)`` otherwise."""
    text = str(raw)
    if not text.isprintable() or len(text) > MAX_REQUEST_ID:
        raise _bad(f"request id must be printable and at most {MAX_REQUEST_ID} characters")
    return text


def _number(value: float) -> str:
    return repr(float(value))


def _comma_joined(labels: list[str]) -> str:
    return ",".join(labels)


def _true(_: bool) -> str:
    return "true"


def _target_rate_text(rate: float) -> str:
    return f"{TARGET_PREFIX}{float(rate)!r}"


@dataclass(frozen=True)
class WireOption:
    """How one option travels on a request: its header, its OIP ``parameters`` key, and its text form.

    ``parse`` reads a header's text or a parameter's JSON value (raising ``DinError`` with the caller's
    message); ``encode`` writes the header text back. ``parameter`` is None for header-only options.
    ``header_doc`` documents the header when its text says more than the field (one header, two fields).
    """

    header: str
    parameter: str | None
    parse: Callable[[object], Any]
    encode: Callable[[Any], str] = str
    header_doc: str | None = None


class ServingOptionsV1(BaseModel):
    """How a request asks to be served: the options that travel with its job, unchanged, to every stage."""

    sla_class: Annotated[SlaClass, WireOption(RequestHeaders.SLA_CLASS, "sla_class", _sla_class, str)] = Field(
        default=SlaClass.INTERACTIVE, description="Service class: realtime, interactive (default) or batch.")
    labels: Annotated[list[str], WireOption(RequestHeaders.LABELS, "labels", _labels, _comma_joined)] = Field(
        default_factory=list,
        description="Data labels (comma-separated in the header); sensitive labels keep the request at the tenant's "
        "allowed sites.")
    allow_degrade: Annotated[bool, WireOption(RequestHeaders.ALLOW_DEGRADE, "allow_degrade", parse_flag, _true)] = (
        Field(default=False, description="true lets a smaller model variant answer when the asked one cannot in "
                                         "time."))
    min_accuracy: Annotated[float | None, WireOption(
        RequestHeaders.MIN_ACCURACY, "min_accuracy", _accuracy, _number)] = Field(
        default=None, description="Lowest held-out accuracy (0..1) of a variant allowed to answer.")
    model_version: Annotated[str | None, WireOption(RequestHeaders.MODEL_VERSION, "model_version", _text)] = Field(
        default=None, description="Model version to run; the newest when absent.")
    cascade_threshold: Annotated[float | None, WireOption(
        RequestHeaders.CASCADE, "cascade", _cascade_threshold, _number,
        header_doc="Large-small cascade with this confidence threshold (e.g. 0.8): the smallest variant of the "
        "model's task answers, and an answer whose top class probability is below the threshold escalates to the most "
        "accurate one; served_by.escalated tells which. Or 'rate:<fraction>' (e.g. rate:0.2): escalate about that "
        "fraction of requests, the least confident, calibrated on the small variant's recent answers.",
    )] = Field(
        default=None,
        description="Large-small cascade: the small variant answers, and an answer whose confidence (top class "
        "probability) is below this threshold escalates to the large one. Absent: no cascade.")
    cascade_target_rate: Annotated[float | None, WireOption(
        RequestHeaders.CASCADE, "cascade", _cascade_target_rate, _target_rate_text)] = Field(
        default=None,
        description="Large-small cascade by target ('rate:<fraction>' on the wire): escalate about this fraction of "
        "requests, the least confident, calibrated on the small variant's recent answers at its executor. Absent: a "
        "fixed threshold or no cascade.")
    max_tokens: Annotated[int | None, WireOption(RequestHeaders.MAX_TOKENS, "max_tokens", _max_tokens)] = Field(
        default=None,
        description="Generation (models with a prefill part, e.g. charlm): stream this many tokens "
        f"(1..{MAX_TOKENS_LIMIT}) back as StreamChunkV1 messages on the reply subject, the last with done=true; the "
        "input is the prompt as a UINT8 tensor named 'prompt' holding UTF-8 text. Absent: one answer.")
    split: Annotated[str | None, WireOption(RequestHeaders.SPLIT, "split", _split)] = Field(
        default=None,
        description="Split inference (models with head/tail parts, e.g. digits-large): 'auto' lets the scheduler pick "
        "the split point per request from link and load measurements; a split point name forces it; 'none' runs "
        "whole. Absent: the model runs whole.")
    split_protection: Annotated[str | None, WireOption(
        RequestHeaders.SPLIT_PROTECTION, "split_protection", _split_protection)] = Field(
        default=None,
        description="Split inference: protect the intermediate tensor before it leaves the data's site: 'none' "
        "(default), 'quantize:<bits 1..8>' or 'noise:<relative sigma>'. Not the payload's crypto protection.")

    def serving_options(self) -> dict[str, Any]:
        """The serving options of this model (a job, a recording, a request) by field name."""
        return {name: getattr(self, name) for name in ServingOptionsV1.model_fields}


class RequestOptionsV1(ServingOptionsV1):
    """Every option of one request: how to serve it, plus its credential, time budget, id and trace context."""

    token: Annotated[str | None, WireOption(RequestHeaders.TOKEN, "token", _text)] = Field(
        default=None, description="Tenant token din1.<tenant>.<expiry>.<signature>; required here or in "
        "parameters.token.")
    timeout_ms: Annotated[int | None, WireOption(RequestHeaders.TIMEOUT_MS, "timeout_ms", _whole_ms)] = Field(
        default=None, description=f"Time the caller will wait, ms (1..{MAX_TIMEOUT_MS}); the deadline is receipt time "
        "plus this. Default by SLA class.")
    deadline_ms: Annotated[int | None, WireOption(RequestHeaders.DEADLINE_MS, "deadline_ms", _whole_ms)] = Field(
        default=None, description=f"Absolute deadline, Unix epoch ms, at most {MAX_TIMEOUT_MS} ms after receipt; "
        "with a timeout as well, the earlier of the two counts (DinClient sends both: time queued before "
        "admission counts, and a client clock running ahead gains nothing).")
    request_id: Annotated[str | None, WireOption(RequestHeaders.REQUEST_ID, None, parse_request_id)] = Field(
        default=None, description=f"Caller's request id (at most {MAX_REQUEST_ID} printable characters; the JSON "
        "body's id otherwise); DIN assigns one when absent.")
    traceparent: Annotated[str | None, WireOption(RequestHeaders.TRACEPARENT, None, _text)] = Field(
        default=None, description="W3C trace context, carried to every stage.")


TRANSPORT_HEADER_DOCS = {
    "CONTENT_TYPE": f"{JSON_CONTENT_TYPE} (default) or {TENSOR_CONTENT_TYPE} for a binary tensor body.",
}
"""Request headers that describe the body rather than ask for an option, by ``RequestHeaders`` attribute."""

Options = TypeVar("Options", bound=ServingOptionsV1)


@cache
def wire_options(model: type[BaseModel] = RequestOptionsV1) -> tuple[tuple[str, WireOption], ...]:
    """``(field name, WireOption)`` of every option field of ``model`` (and of a model inheriting the options)."""
    found = []
    for name, info in model.model_fields.items():
        wire = next((m for m in info.metadata if isinstance(m, WireOption)), None)
        if wire is not None:
            found.append((name, wire))
    return tuple(found)


def read_options(lookup: Callable[[WireOption], object | None], model: type[Options]) -> Options:
    """The options ``lookup`` finds (a header's text or a parameter's value per option, None when absent).

    Raises ``DinError(BAD_REQUEST)`` for a value that does not parse; unset options keep their defaults.
    """
    values: dict[str, Any] = {}
    for name, wire in wire_options(model):
        raw = lookup(wire)
        if raw is not None:
            values[name] = wire.parse(raw)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _bad(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def option_headers(options: ServingOptionsV1) -> dict[str, str]:
    """The request headers that ask for ``options``: one per set option (None, false and empty are unset)."""
    headers: dict[str, str] = {}
    for name, wire in wire_options(type(options)):
        value = getattr(options, name)
        if value is None or value is False or (isinstance(value, list) and not value):
            continue
        headers[wire.header] = wire.encode(value)
    return headers


def check_options(options: ServingOptionsV1) -> None:
    """Raise ``DinError(BAD_REQUEST)`` when options that each parse cannot be asked for together."""
    cascade = options.cascade_threshold is not None or options.cascade_target_rate is not None
    if cascade and options.model_version is not None:
        raise _bad("a cascade picks its own model variants: do not pin a model version")
    if options.split_protection is not None and options.split is None:
        raise _bad("split_protection applies only to split inference: set split too")
    kinds = (cascade, options.max_tokens is not None, options.split not in (None, SPLIT_NONE))
    if sum(kinds) > 1:
        raise _bad("cascade, max_tokens and split cannot be combined in one request")


def check_timeout(timeout_ms: int) -> None:
    """Raise ``DinError(BAD_REQUEST)`` unless ``timeout_ms`` is a budget admission accepts."""
    if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise _bad(f"timeout_ms must be in 1..{MAX_TIMEOUT_MS}")


def request_header_docs() -> dict[str, str]:
    """The description of every ``RequestHeaders`` name (attribute name -> text), from the option declarations."""
    by_header: dict[str, str] = {}
    for name, wire in wire_options(RequestOptionsV1):
        by_header.setdefault(wire.header, wire.header_doc or RequestOptionsV1.model_fields[name].description or "")
    docs = {}
    for attribute in request_header_names():
        header = getattr(RequestHeaders, attribute)
        docs[attribute] = by_header.get(header) or TRANSPORT_HEADER_DOCS[attribute]
    return docs


def request_header_names() -> list[str]:
    """The attribute names of ``RequestHeaders``, in declaration order."""
    return [name for name in vars(RequestHeaders) if name.isupper()]


def lookup_in(headers: Mapping[str, str], parameters: Mapping[str, Any] | None = None,
              header_name: Callable[[str], str] = str) -> Callable[[WireOption], object | None]:
    """A ``read_options`` lookup: an option's header (named by ``header_name``), else its ``parameters`` key."""
    params = parameters or {}

    def lookup(wire: WireOption) -> object | None:
        value = headers.get(header_name(wire.header))
        if value is not None:
            return value
        return params.get(wire.parameter) if wire.parameter is not None else None

    return lookup

