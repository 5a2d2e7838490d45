"""Hypothesis strategies for any protobuf message of the federation protocol: arbitrary field values, read off its descriptor.

`messages(Type)` draws every field (scalars over their whole range, NaN and inf included, enums
with unknown values, strings and bytes of any content, nested messages, repeated and map
fields). `near(valid)` starts from a valid message and replaces a drawn subset of its fields,
so that a fuzzed request gets past the checks a random one fails first (run id, domain, round).
Sizes are kept small: the property is about values, the size limits have their own tests.
"""

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_TEXT = 40
MAX_BYTES = 300
MAX_REPEATED = 4

_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Any integer of the range, with its edges and small values drawn often."""
    edges = [value for value in (0, 1, 2, 3, low, high, high - 1, low + 1) if low <= value <= high]
    return st.one_of(st.sampled_from(edges), st.integers(0, min(high, 1000)) if low <= 0 else st.nothing(), st.integers(low, high))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Values of one (non-repeated) field."""
    kind = field.type
    if kind in _INTEGER_RANGES:
        return _integers(*_INTEGER_RANGES[kind])
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=MAX_TEXT)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=MAX_BYTES)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(1 << 31), (1 << 31) - 1))  # proto3 enums are open
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    raise NotImplementedError(f"field type {kind} of {field.full_name}")


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Values of one field: a scalar, a list, or a map's dict."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=MAX_REPEATED)
    if field.is_repeated:
        return st.lists(_scalar(field, depth), max_size=MAX_REPEATED)
    return _scalar(field, depth)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set one field of `message` to a drawn value (messages copied in, containers replaced)."""
    name = field.name
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        container = getattr(message, name)
        container.clear()
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.message_type is not None:
                container[key].CopyFrom(item)
            else:
                container[key] = item
    elif field.is_repeated:
        container = getattr(message, name)
        del container[:]
        if field.message_type is not None:
            for item in value:
                container.add().CopyFrom(item)
        else:
            container.extend(value)
    elif field.message_type is not None:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def _message(descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with every field drawn (nested messages left empty past depth 2)."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    fields = {field.name: st.one_of(st.none(), _field(field, depth)) for field in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            if value is not None:
                _assign(message, descriptor.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def messages(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Messages of type `cls` with arbitrary values in any of their fields."""
    return _message(cls.DESCRIPTOR, 0)


def near(valid: Message) -> st.SearchStrategy[Message]:
    """`valid` with a drawn, non-empty subset of its fields (nested ones too) replaced by arbitrary values."""
    descriptor = valid.DESCRIPTOR
    paths: list[tuple[FieldDescriptor, ...]] = []
    for field in descriptor.fields:
        paths.append((field,))
        if field.message_type is not None and not field.is_repeated:
            paths.extend((field, inner) for inner in field.message_type.fields)

    def replace(changes: list[tuple[tuple[FieldDescriptor, ...], Any]]) -> Message:
        message = type(valid)()
        message.CopyFrom(valid)
        for path, value in changes:
            owner = message
            for step in path[:-1]:
                owner = getattr(owner, step.name)
            _assign(owner, path[-1], value)
        return message

    change = st.sampled_from(paths).flatmap(lambda path: st.tuples(st.just(path), _field(path[-1], len(path))))
    return st.lists(change, min_size=1, max_size=3).map(replace)
