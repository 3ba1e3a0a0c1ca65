"""The generated schemas: committed files match a fresh render, and the contracts they come from are complete."""

from __future__ import annotations

import json
import re
import typing

import pytest
import yaml
from pydantic import BaseModel

import din.shared.contracts
from din.schemas import ASYNCAPI_FILE, DEFAULT_OUT_DIR, JSON_DIR, render_schemas, subject_pattern
from din.shared import envelope
from din.shared.contracts import MESSAGE_MODELS
from din.shared.contracts.inference import STREAM_SEQ_HEADER, RequestHeaders
from din.shared.contracts.job import HEADER_PREFIX as JOB_HEADER_PREFIX
from din.shared.contracts.job import STAGE_DONE_HEADER
from din.shared.naming import Subjects, Topics
from din.shared.security import SIGNER_HEADER
from din.shared.tensors import TENSOR_DATATYPE_HEADER, TENSOR_NAME_HEADER, TENSOR_SHAPE_HEADER

RERUN = "run `din schemas` and commit the result"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return render_schemas()


@pytest.fixture(scope="module")
def asyncapi(rendered) -> dict:
    return yaml.safe_load(rendered[ASYNCAPI_FILE])


def test_committed_schemas_match_a_fresh_render(rendered):
    committed = {
        path.relative_to(DEFAULT_OUT_DIR).as_posix(): path.read_text()
        for path in DEFAULT_OUT_DIR.rglob("*")
        if path.is_file()
    }
    missing = sorted(set(rendered) - set(committed))
    stale = sorted(set(committed) - set(rendered))
    changed = sorted(rel for rel in set(rendered) & set(committed) if rendered[rel] != committed[rel])
    drift = f"missing {missing}, stale {stale}, changed {changed}"
    assert not (missing or stale or changed), f"schemas/ drifted ({drift}): {RERUN}"


def test_render_is_deterministic(rendered):
    assert render_schemas() == rendered


def test_every_message_model_has_a_json_schema(rendered):
    for name, model in MESSAGE_MODELS.items():
        text = rendered.get(f"{JSON_DIR}/{name}.schema.json")
        assert text is not None, f"no JSON Schema for {name}: {RERUN}"
        schema = json.loads(text)
        assert schema["$id"] == f"{name}.schema.json"
        assert name in schema["title"]
        assert set(model.model_fields) <= set(schema["properties"])
        kept = set(schema["properties"]) - set(model.model_fields)
        undocumented = [p for p in kept if not schema["properties"][p].get("description", "").startswith("Deprecated")]
        assert not undocumented, f"{name}: schema properties that are neither fields nor deprecated: {undocumented}"


def _models_reachable(roots) -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo = list(roots)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            stack = [field.annotation]
            while stack:
                tp = stack.pop()
                if isinstance(tp, type) and issubclass(tp, BaseModel):
                    todo.append(tp)
                stack.extend(typing.get_args(tp))
    return seen


def test_every_contract_field_has_a_description():
    exported = [getattr(din.shared.contracts, name) for name in din.shared.contracts.__all__]
    roots = [*MESSAGE_MODELS.values(), *(m for m in exported if isinstance(m, type) and issubclass(m, BaseModel))]
    missing = [
        f"{model.__name__}.{name}"
        for model in sorted(_models_reachable(roots), key=lambda m: m.__name__)
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_asyncapi_lists_every_topic_and_the_infer_subject(asyncapi):
    assert asyncapi["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in asyncapi["channels"].values()}
    assert set(Topics.ALL) <= addresses
    infer = subject_pattern(Subjects.infer, "tenant", "model")
    assert infer == "din.v1.infer.{tenant}.{model}"
    assert infer in addresses
    assert Subjects.infer("acme", "digits-small") == infer.format(tenant="acme", model="digits-small")


def test_asyncapi_parameters_match_addresses(asyncapi):
    for key, channel in asyncapi["channels"].items():
        names = set(re.findall(r"\{(\w+)\}", channel["address"] or ""))
        assert names == set(channel.get("parameters", {})), key


def test_asyncapi_references_resolve(asyncapi):
    def resolve(ref: str):
        node = asyncapi
        for part in ref.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    resolve(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(asyncapi)


def test_every_message_model_is_in_the_asyncapi_components(asyncapi):
    schemas = asyncapi["components"]["schemas"]
    assert {model.__name__ for model in MESSAGE_MODELS.values()} <= set(schemas)


def test_every_channel_has_a_sender(asyncapi):
    operations = asyncapi["operations"].values()
    sent = {op["channel"]["$ref"].rsplit("/", 1)[-1] for op in operations if op["action"] == "send"}
    assert sent == set(asyncapi["channels"])


def _message_keys(operation: dict) -> set[str]:
    return {m["$ref"].rsplit("/", 1)[-1] for m in operation["messages"]}


def test_asyncapi_documents_every_reply_message_and_behaviour_header(asyncapi):
    operations = asyncapi["operations"]
    assert _message_keys(operations["executor_send_inferReply"]) == {"inferResponse", "streamChunk", "errorReply"}
    assert _message_keys(operations["client_receive_inferReply"]) == {"inferResponse", "streamChunk", "errorReply"}
    for service in ("admission", "classifier", "scheduler"):
        assert _message_keys(operations[f"{service}_send_inferReply"]) == {"errorReply"}, service
    schemas = asyncapi["components"]["schemas"]
    headers = {name for key, schema in schemas.items() if key.endswith("Headers") for name in schema["properties"]}
    for name in (STAGE_DONE_HEADER, STREAM_SEQ_HEADER, JOB_HEADER_PREFIX + "V1", SIGNER_HEADER,
                 envelope.SIGNATURE_HEADER, *envelope.ENVELOPE_HEADERS, TENSOR_NAME_HEADER, TENSOR_SHAPE_HEADER,
                 TENSOR_DATATYPE_HEADER, *(getattr(RequestHeaders, n) for n in vars(RequestHeaders) if n.isupper())):
        assert name in headers, f"header {name} is not documented"


def test_asyncapi_lists_the_executors_stage_hand_offs_and_hand_backs(asyncapi):
    operations = asyncapi["operations"]
    assert _message_keys(operations["executor_send_schedule"]) == {"job"}
    for channel in ("execute", "work"):
        assert _message_keys(operations[f"executor_send_{channel}"]) == {"stageJob"}
        assert _message_keys(operations[f"scheduler_send_{channel}"]) == {"job"}
    for service in ("classifier", "scheduler", "executor", "telemetry", "keymanager"):
        assert f"{service}_send_topic_deadletter" in operations, service
