"""Protocol models <-> gRPC messages (espo_client/proto/espo.proto), one generic mapping for both ends.

The pydantic models of `espo_client.protocol` stay the one definition: a message is turned into the
model's JSON form and validated by the model (so a bad field is the model's complaint, naming the
field), and a model is dumped to JSON and parsed into the message. Messages mirror the models
field for field; where proto3 has no direct form, the mapping here bridges it:

* scalars are `optional` in the proto (presence), so an unset field takes the model's default;
* an empty repeated field or map is "unset" where the model's default is None (`Prompt.token_ids`,
  traces, `logit_bias`);
* lists of lists (`prompt_token_ids`, `top_token_ids`, `top_logprobs`) are repeated wrapper
  messages with one field, `items`;
* null entries of maps (`rule_params`) are left out, and their numbers come back as the rule
  parameter's own type (`map<string, double>` would turn `min_tokens` 8 into 8.0, and the flag
  `cumulative` travels as 0 or 1);
  `Traces.values` uses google.protobuf.Value.

Needs the `grpc` extra (grpcio, protobuf).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, TypeAdapter

from .stop_rule import EspoParams

__all__ = ["WRAPPED_LISTS", "from_message", "to_message"]

WRAPPED_LISTS = frozenset({"prompt_token_ids", "top_token_ids", "top_logprobs"})
"""Fields whose lists of lists travel as `repeated Wrapper {repeated x items}`."""

PARAM_MAPS = frozenset({"rule_params", "rule_defaults"})
"""map<string, double> fields holding EspoParams values."""

T = TypeVar("T")


def _param_types() -> dict[str, type]:
    def kind(hint: Any) -> type:
        args = (hint, *typing.get_args(hint))
        return bool if bool in args else int if int in args else float

    return {name: kind(hint) for name, hint in typing.get_type_hints(EspoParams).items()}


_PARAM_TYPES = _param_types()


def from_message(message: Message, model: type[T]) -> T:
    """A received message -> the protocol model (raises pydantic's ValidationError for bad fields)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return TypeAdapter(model).validate_python(_incoming(data, model))


def to_message(value: Any, message_type: type[Message]) -> Message:
    """A protocol model (or the EspoState dataclass) -> the message to send."""
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json", exclude_none=True)
    else:
        data = TypeAdapter(type(value)).dump_python(value, mode="json")
    return json_format.ParseDict(_outgoing(data, parent=message_type.DESCRIPTOR), message_type())


def _outgoing(value: Any, key: str | None = None, parent: Descriptor | None = None) -> Any:
    """Model JSON -> the JSON form of the message `parent` (None: `value` is a top-level message)."""
    field = parent.fields_by_name.get(key) if parent is not None and key is not None else None
    if isinstance(value, dict):
        if field is not None and _is_map(field):
            if key in PARAM_MAPS:  # map<string, double>: a flag travels as 0 or 1
                return {k: float(v) for k, v in value.items() if v is not None}
            return {k: v for k, v in value.items() if v is not None}
        descriptor = parent if key is None else (field.message_type if field is not None else None)
        return {k: _outgoing(v, k, descriptor) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        if key in WRAPPED_LISTS:
            return [{"items": item} for item in value]
        if key == "values":  # Traces.values: google.protobuf.Value keeps the nulls
            return value
        descriptor = field.message_type if field is not None else None
        return [_outgoing(item, None, descriptor) if isinstance(item, dict) else item for item in value]
    return value


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _incoming(data: Any, model: Any) -> Any:
    """Undo the proto forms on a MessageToDict result, guided by the model's fields."""
    if not isinstance(data, dict):
        return data
    fields = _fields(model)
    if fields is None:
        return data
    out = {}
    for key, value in data.items():
        annotation, default_none = fields.get(key, (None, False))
        if key in WRAPPED_LISTS and isinstance(value, list):
            value = [item.get("items", []) for item in value]
        if default_none and (value == [] or (value == {} and _submodel(annotation) is None)):
            continue  # an empty repeated field or map: unset, the model's None
        if key in PARAM_MAPS and isinstance(value, dict):
            value = {k: _PARAM_TYPES.get(k, float)(v) for k, v in value.items()}
        sub = _submodel(annotation)
        if sub is not None:
            value = [_incoming(v, sub) for v in value] if isinstance(value, list) else _incoming(value, sub)
        out[key] = value
    return out


def _fields(model: Any) -> dict[str, tuple[Any, bool]] | None:
    """name -> (annotation, default is None) of a pydantic model or dataclass."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {
            name: (f.annotation, not f.is_required() and f.default is None and f.default_factory is None)
            for name, f in model.model_fields.items()
        }
    if dataclasses.is_dataclass(model):
        return {f.name: (f.type, f.default is None) for f in dataclasses.fields(model)}
    return None


def _submodel(annotation: Any) -> Any:
    """The model or dataclass inside `X | None`, `list[X]`, ... if any."""
    if annotation is None:
        return None
    if isinstance(annotation, type) and (
        issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
    ):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None
