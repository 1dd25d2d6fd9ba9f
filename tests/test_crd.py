"""The LossSearch CRD generated from the pydantic models (no cluster: see tests/cluster/test_crd_api.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from amlfs import crd
from amlfs.spec import STORAGE_URI, STORAGE_URI_CEL, LossSearchSpec, Model, cel, immutable, immutable_paths
from amlfs.status import LossSearchStatus

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "crds" / "losssearch.yaml"

#: keywords a structural schema node may carry (apiextensions.k8s.io/v1 JSONSchemaProps, minus what
#: structural schemas forbid or this project never needs: $ref, anyOf/allOf/oneOf/not, definitions, ...)
ALLOWED = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "required",
    "nullable",
    "properties",
    "items",
    "additionalProperties",
    "example",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def structural_problems(node: Any, path: str = "") -> list[str]:
    """Why `node` is not a structural schema (empty: it is). A small subset of the API server's checks,
    plus this project's own rules (no titles, OpenAPI v3 exclusive bounds)."""
    where = path or "<root>"
    if not isinstance(node, dict):
        return [f"{where}: not a mapping"]
    problems = [f"{where}: keyword {k!r} not allowed" for k in node if k not in ALLOWED]
    typ = node.get("type")
    if typ is None and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{where}: no type")
    elif typ is not None and typ not in TYPES:
        problems.append(f"{where}: unknown type {typ!r}")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node:
            if not isinstance(node[key], bool):
                problems.append(f"{where}: {key} must be a boolean (OpenAPI v3)")
            elif ("minimum" if key == "exclusiveMinimum" else "maximum") not in node:
                problems.append(f"{where}: {key} without its bound")
    if "default" in node and node["default"] is None:
        problems.append(f"{where}: default null")
    if "properties" in node or "additionalProperties" in node:
        if typ != "object":
            problems.append(f"{where}: properties on a non-object")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
        if node.get("additionalProperties") in (False, True):
            problems.append(f"{where}: additionalProperties must be a schema")
    if (
        typ == "object"
        and path != ".metadata"
        and not (
            "properties" in node or "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        )
    ):
        problems.append(f"{where}: object without properties, additionalProperties or preserve-unknown-fields")
    if typ == "array" and "items" not in node:
        problems.append(f"{where}: array without items")
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            problems.append(f"{where}: required {name!r} is not a property")
    for rule in node.get("x-kubernetes-validations", []):
        if set(rule) - {"rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf"}:
            problems.append(f"{where}: odd validation rule {rule}")
        if not rule.get("rule") or not rule.get("message"):
            problems.append(f"{where}: validation rule without rule or message: {rule}")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    return problems


def walk(node: dict, path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def apply_defaults(node: dict, value: Any) -> Any:
    """What the API server's defaulting does to `value` (absent fields get their schema defaults, then
    defaulting recurses into them)."""
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = sub["default"]
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    return value


@pytest.fixture(scope="module")
def schema() -> dict:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_yaml_is_current():
    assert CHECKED_IN.read_text() == crd.render_yaml(), (
        "crds/losssearch.yaml is stale: regenerate with `python -m amlfs.crd > crds/losssearch.yaml`"
    )


def test_render_is_stable_and_headed():
    text = crd.render_yaml()
    assert text == crd.render_yaml()
    assert text.startswith("# generated by `amlfs crd`; do not edit")
    assert yaml.safe_load(text) == crd.build_crd()


def test_names_scope_columns_and_subresource():
    c = crd.build_crd()
    assert c["apiVersion"] == "apiextensions.k8s.io/v1" and c["kind"] == "CustomResourceDefinition"
    assert c["metadata"]["name"] == "losssearches.amlfs.io"
    spec = c["spec"]
    assert spec["group"] == "amlfs.io" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "LossSearch",
        "listKind": "LossSearchList",
        "plural": "losssearches",
        "singular": "losssearch",
        "shortNames": ["lfs"],
        "categories": ["amlfs"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    cols = {col["name"]: (col["type"], col["jsonPath"]) for col in version["additionalPrinterColumns"]}
    assert cols == {
        "Phase": ("string", ".status.phase"),
        "Epoch": ("integer", ".status.epoch"),
        "Epochs": ("integer", ".spec.search.epochs"),
        "Best": ("number", ".status.best.reward"),
        "Metric": ("string", ".status.rewardMetric"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }


def test_schema_is_structural(schema):
    assert structural_problems(schema) == []
    assert "$ref" not in crd.render_yaml() and "anyOf" not in crd.render_yaml()
    assert "title:" not in crd.render_yaml()


def test_structural_checker_catches_problems():
    bad = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/x"},
            "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "c": {"type": "number", "exclusiveMinimum": 0},
            "d": {"type": "object", "additionalProperties": False, "properties": {}},
            "e": {"type": "object"},
            "f": {"type": "string", "title": "F"},
        },
    }
    problems = "\n".join(structural_problems(bad))
    for field in ("a", "b", "c", "d", "e", "f"):
        assert f".{field}:" in problems


def test_every_spec_field_has_a_description(schema):
    missing = [
        path
        for path, node in walk(schema["properties"]["spec"], ".spec")
        if not path.endswith("[]") and not node.get("description", "").strip()
    ]
    assert missing == [], f"add a description= to these fields in amlfs/spec.py: {missing}"


def test_spec_fields_match_the_models(schema):
    spec = schema["properties"]["spec"]
    assert set(spec["properties"]) == {f.alias for f in LossSearchSpec.model_fields.values()}
    search = spec["properties"]["search"]["properties"]
    assert search["samplesPerEpoch"] == {
        **search["samplesPerEpoch"],
        "type": "integer",
        "minimum": 2,
        "maximum": 256,
        "default": 4,
    }
    assert search["sigma"]["minimum"] == 0.0 and search["sigma"]["exclusiveMinimum"] is True
    assert search["space"]["enum"] == ["amlfs", "search-softmax"]
    task = spec["properties"]["task"]["properties"]
    assert "imagefolder" in task["dataset"]["enum"]
    assert task["valFraction"]["exclusiveMaximum"] is True and task["valFraction"]["maximum"] == 1.0
    pod = spec["properties"]["trainer"]["properties"]["podTemplate"]
    assert pod["type"] == "object" and pod["x-kubernetes-preserve-unknown-fields"] is True
    assert pod["default"] == {}


def test_defaults_reproduce_the_models_defaults(schema):
    spec = schema["properties"]["spec"]
    # nested objects default to {} so the API server fills in their fields
    for name in ("task", "model", "optimizer", "search", "storage", "trainer"):
        assert spec["properties"][name]["default"] == {}
    assert spec["default"] == {}
    defaulted = apply_defaults(schema, {"spec": {}})["spec"]
    assert defaulted == LossSearchSpec().model_dump(mode="json", by_alias=True)
    partial = apply_defaults(schema, {"spec": {"search": {"epochs": 3, "init": {"preset": "gce"}}}})["spec"]
    expected = LossSearchSpec.model_validate({"search": {"epochs": 3, "init": {"preset": "gce"}}})
    assert partial == expected.model_dump(mode="json", by_alias=True)
    assert defaulted["optimizer"]["milestones"] == [0.5, 0.75]  # a default_factory list


def test_status_schema(schema):
    status = schema["properties"]["status"]
    assert set(status["properties"]) == {f.alias for f in LossSearchStatus.model_fields.values()}
    assert not [p for p, node in walk(status, ".status") if "default" in node], "status carries no defaults"
    props = status["properties"]
    assert props["best"]["nullable"] is True and props["best"]["type"] == "object"
    assert props["start"]["nullable"] is True
    rewards = props["history"]["items"]["properties"]["rewards"]["items"]
    assert rewards == {"type": "number", "nullable": True}
    cond = props["conditions"]
    assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]
    item = cond["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert set(item["required"]) >= {"type", "status", "lastTransitionTime"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert props["observedGeneration"]["type"] == "integer"


def test_cel_rules_name_the_field_and_the_fix(schema):
    rules = [(path, r) for path, node in walk(schema) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 18
    for path, r in rules:
        assert re.match(r"^(spec|metadata)\.", r["message"]), (path, r)
        assert re.search(r"; (set|use|fix|lower|delete|correct)", r["message"]), (path, r)
    immutable = {path for path, r in rules if r["rule"] == "self == oldSelf"}
    assert immutable == {
        ".spec.task",
        ".spec.model",
        ".spec.search.space",
        ".spec.search.parameterization",
        ".spec.search.intervals",
        ".spec.search.mode",
        ".spec.search.seed",
        ".spec.search.init",
        ".spec.search.logitRange",
        ".spec.search.commonRandomNumbers",
        ".spec.search.reward",
        ".spec.search.antithetic",
        ".spec.optimizer.name",
        ".spec.search.priorAdjustment",
        ".spec.search.polyTerm",
    }
    # the knobs a user raises on a running search stay mutable (sigma and the optimiser's hyper-parameters
    # apply from the next epoch)
    for path in (".spec.search.epochs", ".spec.search.sigma", ".spec.suspend", ".spec.optimizer.lr", ".spec.trainer"):
        assert path not in immutable
    # the runner's resume check reads the same markers
    assert {f".spec.{p}" for p in immutable_paths()} == immutable


def test_immutable_paths_find_every_marker():
    class Leaf(Model):
        model_config = {**Model.model_config, "json_schema_extra": cel(immutable("spec.b.frozen", "why"))}
        x: int = 0

    class Inner(Model):
        kept: int = Field(0, json_schema_extra=cel(immutable("spec.b.kept", "why"), ("self > 0", "spec.b.kept")))
        free: int = Field(0, json_schema_extra=cel(("self >= 0", "spec.b.free must be >= 0; set 0")))
        frozen: Leaf = Field(default_factory=Leaf)

    class Outer(Model):
        a_whole: Inner = Field(default_factory=Inner, json_schema_extra=cel(immutable("spec.aWhole", "why")))
        b: Inner = Field(default_factory=Inner)
        c: int = 0

    # camelCase paths; a frozen field is listed once, not its children; a marker on a model class counts
    assert immutable_paths(Outer) == ["aWhole", "b.kept", "b.frozen"]


def test_storage_uri_rule_matches_the_python_regex():
    cel = re.compile(STORAGE_URI_CEL)
    for uri in (
        "s3://bucket/prefix",
        "s3://my.bucket-1",
        "s3://b/",
        "file:///tmp/x",
        "/abs",
        "s3://ab/x",
        "s3://Bucket/x",
        "s3://-bucket/x",
        "http://x/y",
        "relative",
        "file://",
        "/",
        "s3://abc",
    ):
        assert bool(cel.match(uri)) == bool(STORAGE_URI.match(uri)), uri


def test_unsupported_shapes_are_refused():
    class Union(BaseModel):
        x: int | str = 0

    with pytest.raises(crd.SchemaError, match="union"):
        crd._Converter(Union, defaults=True).convert()


def test_typed_and_free_form_dicts():
    class Dicts(BaseModel):
        weights: dict[str, float] = Field(default_factory=dict, description="w")
        anything: dict[str, Any] = Field(default_factory=dict, description="a")
        tags: set[str] = Field(default_factory=set, description="t")
        maybe: float | None = Field(None, gt=0, description="m")

    props = crd._Converter(Dicts, defaults=True).convert()["properties"]
    assert props["weights"] == {
        "type": "object",
        "additionalProperties": {"type": "number"},
        "description": "w",
        "default": {},
    }
    assert props["anything"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "additionalProperties" not in props["anything"]
    assert props["tags"]["x-kubernetes-list-type"] == "set" and "uniqueItems" not in props["tags"]
    assert props["maybe"] == {
        "type": "number",
        "nullable": True,
        "minimum": 0,
        "exclusiveMinimum": True,
        "description": "m",
    }
