"""Reading template.yaml and translating it to CloudFormation, so the local stack is the deployed one."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ARTIFACT_BUCKET = "imagepipe-local-artifacts"


class _CfnLoader(yaml.SafeLoader):
    pass


def _intrinsic(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


@dataclass(frozen=True)
class Template:
    path: Path
    body: dict[str, Any]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def resources(self) -> dict[str, Any]:
        return self.body.get("Resources", {})

    def resources_of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: r for name, r in self.resources.items() if r.get("Type") == kind}

    def parameter(self, name: str) -> dict[str, Any]:
        return self.body.get("Parameters", {}).get(name, {})

    def code_dir(self, logical_id: str) -> Path:
        props = self.resources[logical_id].get("Properties", {})
        uri = props.get("CodeUri") or props.get("ContentUri")
        return (self.base_dir / uri).resolve()

    def function_property(self, logical_id: str, name: str) -> Any:
        """A function property, falling back to Globals.Function as SAM does."""
        props = self.resources[logical_id].get("Properties", {})
        if name in props:
            return props[name]
        return self.body.get("Globals", {}).get("Function", {}).get(name)


def load_template(path: Path) -> Template:
    with open(path, encoding="utf-8") as handle:
        body = yaml.load(handle, Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass
    return Template(Path(path).resolve(), body)


def translate(template: Template, parameters: dict[str, str], region: str) -> dict[str, Any]:
    """The CloudFormation template that `sam deploy` would create, with local code pointing at
    zips in ARTIFACT_BUCKET (what `sam package` does with S3 URIs)."""
    from samtranslator.translator.transform import transform

    sam = copy.deepcopy(template.body)
    for logical_id, resource in sam.get("Resources", {}).items():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if isinstance(props.get(key), str) and not props[key].startswith("s3://"):
                props[key] = f"s3://{ARTIFACT_BUCKET}/{logical_id}.zip"
    previous = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = region  # the translator reads the region for pseudo parameters
    try:
        return transform(sam, parameters, _NoManagedPolicies())
    finally:
        if previous is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = previous


class _NoManagedPolicies:
    """The template names no AWS managed policy by its short name, so nothing needs looking up."""

    def load(self) -> dict[str, str]:
        return {}


class ParameterError(ValueError):
    """A parameter override the template does not allow: one line for the user."""


def parse_overrides(tokens: list[str], source: str) -> dict[str, str]:
    """`sam deploy --parameter-overrides` syntax: K=V tokens, or ParameterKey=K,ParameterValue=V."""
    values: dict[str, str] = {}
    for token in tokens:
        if token.startswith("ParameterKey="):
            key_part, _, value_part = token.partition(",")
            name, value = key_part[len("ParameterKey=") :], value_part.partition("ParameterValue=")[2]
            if not value_part.startswith("ParameterValue="):
                raise ParameterError(f"{source}: {token!r} is not ParameterKey=K,ParameterValue=V")
        else:
            name, sep, value = token.partition("=")
            if not sep or not name:
                raise ParameterError(f"{source}: {token!r} is not NAME=VALUE")
        values[name] = value
    return values


def samconfig_overrides(path: Path, env: str = "default") -> dict[str, str]:
    """`parameter_overrides` of samconfig.toml's [<env>.deploy.parameters], as `sam deploy --config-env` reads
    them; nothing if the file, the environment or the key is missing. The rest of the section (capabilities,
    region, confirm_changeset, resolve_s3 ...) is about deploying to AWS and means nothing locally."""
    import shlex
    import tomllib

    if not path.is_file():
        return {}
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ParameterError(f"{path}: cannot read it: {exc}") from None
    raw = ((config.get(env) or {}).get("deploy") or {}).get("parameters", {}).get("parameter_overrides")
    if raw is None:
        return {}
    tokens = shlex.split(raw) if isinstance(raw, str) else [str(t) for t in raw]
    return parse_overrides(tokens, f"{path} [{env}.deploy.parameters] parameter_overrides")


def check_parameter(template: Template, name: str, value: str, source: str) -> None:
    """As CloudFormation checks a parameter value: the template declares it, and the value fits its Type,
    AllowedValues, AllowedPattern, MinValue/MaxValue and MinLength/MaxLength."""
    import re

    declared = template.body.get("Parameters", {})
    if name not in declared:
        raise ParameterError(
            f"{source}: {name} is not a parameter of {template.path.name} (it has {', '.join(declared)})"
        )
    spec = declared[name]
    where = f"{source}: {name}={value!r}"
    if spec.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            raise ParameterError(f"{where} is not a number") from None
        low, high = spec.get("MinValue"), spec.get("MaxValue")
        if (low is not None and number < float(low)) or (high is not None and number > float(high)):
            raise ParameterError(f"{where} must be between {low} and {high}")
    allowed = spec.get("AllowedValues")
    if allowed is not None and value not in [str(v) for v in allowed]:
        raise ParameterError(f"{where} must be one of {', '.join(str(v) for v in allowed)}")
    pattern = spec.get("AllowedPattern")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise ParameterError(f"{where} does not match {pattern}")
    if "MinLength" in spec and len(value) < int(spec["MinLength"]):
        raise ParameterError(f"{where} is shorter than {spec['MinLength']} characters")
    if "MaxLength" in spec and len(value) > int(spec["MaxLength"]):
        raise ParameterError(f"{where} is longer than {spec['MaxLength']} characters")
