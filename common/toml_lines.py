"""The line of every key and table of a TOML text, so that a config error can point at it (tomllib keeps no positions).

A line scanner, not a second parser: the text has already parsed with tomllib, so only headers
(`[a.b]`, `[[a]]`) and `key = ...` lines need recognising. Keys inside inline tables and
multi-line arrays map to the line of the key that holds them.
"""

import re

_PART = re.compile(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)')
_DOTTED = r'(?:"(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+))*'
_HEADER = re.compile(rf"^\s*(\[\[|\[)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")

Path = tuple[str, ...]


def _parts(dotted: str) -> Path:
    """The key parts of a dotted key, quotes removed."""
    return tuple(next(group for group in match.groups() if group is not None) for match in _PART.finditer(dotted))


def key_lines(text: str) -> dict[Path, int]:
    """{key path: 1-based line}; elements of arrays of tables are numbered like pydantic's locations ("domains", "0", ...)."""
    lines: dict[Path, int] = {}
    arrays: dict[Path, int] = {}  # array of tables -> how many elements seen so far
    table: Path = ()
    in_string: str | None = None

    def resolve(parts: Path) -> Path:
        """A header's path with the current element of every array of tables on the way."""
        resolved: Path = ()
        for part in parts:
            resolved = (*resolved, part)
            if resolved in arrays:
                resolved = (*resolved, str(arrays[resolved] - 1))
        return resolved

    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header is not None:
            parts = _parts(header.group(2))
            if header.group(1) == "[[":
                parent = resolve(parts[:-1])
                array = (*parent, parts[-1])
                lines.setdefault(array, number)
                arrays[array] = arrays.get(array, 0) + 1
                table = (*array, str(arrays[array] - 1))
            else:
                table = resolve(parts)
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key is not None:
            parts = _parts(key.group(1))
            for end in range(1, len(parts) + 1):
                lines.setdefault((*table, *parts[:end]), number)
            rest = line[key.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
                    break
    return lines
