"""V1 schemas only grow: the comparison itself (table-driven), and every rendered schema against its git history."""

from __future__ import annotations

import copy
import json

import pytest

from din.schema_compat import breaking_changes, committed_versions
from din.schemas import DEFAULT_OUT_DIR, JSON_DIR, REPO_ROOT, render_schemas

BASE = {
    "$defs": {
        "SlaClass": {"enum": ["realtime", "interactive", "batch"], "type": "string", "title": "SlaClass"},
        "ServedByV1": {
            "properties": {"site": {"type": "string", "description": "Site."},
                           "batch_size": {"type": "integer"}},
            "required": ["site"],
            "type": "object",
        },
    },
    "properties": {
        "id": {"type": "string", "description": "Request id."},
        "sla_class": {"$ref": "#/$defs/SlaClass"},
        "served_by": {"$ref": "#/$defs/ServedByV1"},
        "error_code": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "outputs": {"items": {"type": "number"}, "type": "array"},
        "timings_ms": {"additionalProperties": {"type": "number"}, "type": "object"},
        "kind": {"const": "din.v1.completion", "type": "string"},
    },
    "required": ["id", "served_by"],
    "type": "object",
}


def changed(edit):
    schema = copy.deepcopy(BASE)
    edit(schema)
    return schema


def _set(path: list, value):
    def edit(schema):
        node = schema
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _drop(path: list):
    def edit(schema):
        node = schema
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


BREAKING = {
    "removed property": (_drop(["properties", "error_code"]), "$.error_code: property removed"),
    "removed nested property": (_drop(["$defs", "ServedByV1", "properties", "batch_size"]),
                                "$.served_by.batch_size: property removed"),
    "changed type": (_set(["properties", "id", "type"], "integer"), "$.id: type changed"),
    "changed nested type": (_set(["$defs", "ServedByV1", "properties", "site", "type"], "number"),
                            "$.served_by.site: type changed"),
    "changed item type": (_set(["properties", "outputs", "items"], {"type": "string"}),
                          "$.outputs[items]: type changed"),
    "changed map value type": (_set(["properties", "timings_ms", "additionalProperties"], {"type": "string"}),
                               "$.timings_ms[additionalProperties]: type changed"),
    "nullable made non-null": (_set(["properties", "error_code"], {"type": "string"}),
                                    "$.error_code: type changed"),
    "made nullable": (_set(["properties", "id"], {"anyOf": [{"type": "string"}, {"type": "null"}]}),
                      "$.id: type changed"),
    "ref to another shape": (_set(["properties", "sla_class"], {"$ref": "#/$defs/ServedByV1"}),
                             "$.sla_class: type changed"),
    "new required property": (
        lambda s: (s["properties"].update(tenant={"type": "string"}), s["required"].append("tenant")),
        "$.tenant: new required property",
    ),
    "optional made required": (lambda s: s["required"].append("error_code"),
                               "$.error_code: optional property made required"),
    "removed enum value": (_set(["$defs", "SlaClass", "enum"], ["realtime", "interactive"]),
                           "$.sla_class: enum value 'batch' removed"),
    "changed constant": (_set(["properties", "kind", "const"], "din.v2.completion"),
                         "$.kind: constant changed"),
}

COMPATIBLE = {
    "identical": lambda s: None,
    "new optional property": lambda s: s["properties"].update(tenant={"type": "string", "default": ""}),
    "new optional nested property": lambda s: s["$defs"]["ServedByV1"]["properties"].update(
        stages={"items": {"type": "string"}, "type": "array"}),
    "new enum value": _set(["$defs", "SlaClass", "enum"], ["realtime", "interactive", "batch", "bulk"]),
    "description edit": _set(["properties", "id", "description"], "The request's id, as the client sent it."),
    "title and default edits": lambda s: s["properties"]["error_code"].update(title="Code", default="none"),
    "required made optional": _set(["required"], ["id"]),
    "anyOf branches reordered": _set(["properties", "error_code", "anyOf"], [{"type": "null"}, {"type": "string"}]),
    "def renamed, same shape": lambda s: (s["$defs"].update(ServiceClass=s["$defs"].pop("SlaClass")),
                                          s["properties"].update(sla_class={"$ref": "#/$defs/ServiceClass"})),
}


@pytest.mark.parametrize("name", sorted(BREAKING))
def test_breaking_change_is_named(name):
    edit, expected = BREAKING[name]
    problems = breaking_changes(BASE, changed(edit))
    assert any(problem.startswith(expected) for problem in problems), problems


@pytest.mark.parametrize("name", sorted(COMPATIBLE))
def test_additive_change_passes(name):
    assert breaking_changes(BASE, changed(COMPATIBLE[name])) == []


def test_recursive_definitions_terminate():
    tree = {"$defs": {"Node": {"properties": {"child": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
                               "type": "object"}},
            "$ref": "#/$defs/Node"}
    assert breaking_changes(tree, copy.deepcopy(tree)) == []
    broken = copy.deepcopy(tree)
    del broken["$defs"]["Node"]["properties"]["child"]
    assert breaking_changes(tree, broken) == ["$.child: property removed"]


def test_rendered_v1_schemas_are_compatible_with_every_committed_version():
    """The baseline is the git history of ``schemas/json`` (see ``din.schema_compat``)."""
    folder = DEFAULT_OUT_DIR.relative_to(REPO_ROOT) / JSON_DIR
    try:
        history = list(committed_versions(REPO_ROOT, folder.as_posix()))
    except FileNotFoundError as exc:
        pytest.skip(f"no git history to compare with: {exc}")
    assert history, f"no committed version of {folder} in git history"
    rendered = {f"{folder.as_posix()}/{name.removeprefix(JSON_DIR + '/')}": json.loads(text)
                for name, text in render_schemas().items() if name.startswith(JSON_DIR + "/")}
    problems = []
    for commit, path, text in history:
        if path not in rendered:
            problems.append(f"{path} (as of {commit[:10]}): the message schema is gone; add a V2 beside it instead")
            continue
        problems += [f"{path} vs {commit[:10]}: {p}" for p in breaking_changes(json.loads(text), rendered[path])]
    assert not problems, "breaking V1 schema change(s); make a V2 model instead:\n" + "\n".join(problems)
