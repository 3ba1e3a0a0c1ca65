"""The generated schemas: committed files match a fresh render, and the contracts they come from are complete."""

from __future__ import annotations

import json
import re
import typing

import pytest
import yaml
from pydantic import BaseModel

import shared.contracts
from din.schemas import ASYNCAPI_FILE, DEFAULT_OUT_DIR, JSON_DIR, render_schemas, subject_pattern
from shared.contracts import MESSAGE_MODELS
from shared.naming import Subjects, Topics

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
        assert set(schema["properties"]) == set(model.model_fields)


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
    exported = [getattr(shared.contracts, name) for name in shared.contracts.__all__]
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
