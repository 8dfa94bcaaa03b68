"""Table schemas derived from record dataclasses: a record's fields are its table's columns (STYLE.md,
"Records"), so a column exists once, where the record is defined. Used by the client DB
(``loadgen/records.py``) and the server DB (``server/records.py``, ``server/store.py``)."""

import dataclasses
import typing


def columns_of(record_class) -> dict[str, type]:
    """A record dataclass's fields as sqlite-utils column types, in field order (the schema's one source).
    ``X | None`` is column type ``X`` (NULL allowed)."""
    hints = typing.get_type_hints(record_class)
    columns = {}
    for f in dataclasses.fields(record_class):
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        columns[f.name] = kinds[0]
    return columns


def as_row(record) -> dict:
    """A record (dataclass) or an already-built row (dict) as a dict for sqlite-utils."""
    # vars(), not asdict(): record fields are scalars, and asdict deep-copies (~60 µs a row).
    return dict(vars(record)) if dataclasses.is_dataclass(record) else dict(record)
