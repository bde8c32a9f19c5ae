"""The classes of a folder of images read from a table (`fastrsb data split SOURCE TARGET --labels
TABLE`), as data sets from competitions and labelling tools come: a CSV or TSV with a header row,
one column naming each image (its path below SOURCE, with or without its extension: `a1b2` for
`a1b2.jpg`) and one its class. An image has one class; a row that names no image, an image named
twice with two classes, and a class no folder can be named are refused, naming the row.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.pipelines import IMAGE_EXTENSIONS, DatasetError
from fastrsb.pipelines.image_list import walk_files

_AMBIGUOUS = ""  # an extension-less name two images share (a.jpg, a.png): said where a row uses it


def classes_from_table(source: Path, table: Path, file_column: str | None = None,
                       label_column: str | None = None) -> tuple[dict[str, list[str]], int]:
    """({class: its images' paths below SOURCE}, how many images below SOURCE no row names)."""
    columns, rows = _read(table)
    images = _images_below(source)
    file_column = _file_column(columns, rows, images, table, file_column)
    label_column = _label_column(columns, file_column, table, label_column)
    labelled: dict[str, tuple[str, int]] = {}  # image -> (its class, the row that said so)
    unnamed = []
    for number, row in enumerate(rows, 2):  # the header is line 1
        name, label = (row.get(file_column) or "").strip(), (row.get(label_column) or "").strip()
        image = images.get(name.replace(os.sep, "/"))
        if image is None:
            unnamed.append(name)
            continue
        if image == _AMBIGUOUS:
            raise UserError(f"{table}:{number}: {name!r} names two images below {source} (other extensions): name "
                            "it with its extension")
        _check_class_name(label, table, number)
        first = labelled.setdefault(image, (label, number))
        if first[0] != label:
            raise UserError(f"{table}:{number}: {image} is of class {label!r} here and of {first[0]!r} on line "
                            f"{first[1]}: an image has one class")
    if unnamed:
        more = f" and {len(unnamed) - 3} more" if len(unnamed) > 3 else ""
        raise UserError(f"{len(unnamed):,} row(s) of {table} name no image below {source}: "
                        f"{', '.join(repr(n) for n in unnamed[:3])}{more} (column {file_column!r}: a path below "
                        f"{source}, with or without its extension)")
    classes: dict[str, list[str]] = {}
    for image, (label, _) in sorted(labelled.items()):
        classes.setdefault(label, []).append(image)
    every = {image for image in images.values() if image != _AMBIGUOUS}  # (an ambiguous stem's images: by path)
    return dict(sorted(classes.items())), len(every - labelled.keys())


def _read(table: Path) -> tuple[list[str], list[dict]]:
    """The header's column names and the rows of a CSV or TSV (delimiter sniffed: comma, tab or
    semicolon), UTF-8 with or without a byte-order mark (as spreadsheets save it)."""
    if not table.is_file():
        raise UserError(f"label table {table} {'is a folder' if table.is_dir() else 'does not exist'}")
    try:
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{table} is not UTF-8 text: save the table as UTF-8 CSV") from None
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",\t;")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    columns = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = columns
    rows = [row for row in reader if any((value or "").strip() for value in row.values() if isinstance(value, str))]
    if len(columns) < 2 or not rows:
        raise UserError(f"{table} holds no table of images and classes (a header row, e.g. 'file,label', then a row "
                        "an image)")
    return columns, rows


def _images_below(source: Path) -> dict[str, str]:
    """Every image below SOURCE as the loaders list files (dot-files skipped, symlinked folders
    followed), by its path below SOURCE ('/'-separated) and by that path without its extension."""
    paths, stems = {}, {}
    try:
        for dirpath, names in walk_files(source):
            for name in names:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.relpath(os.path.join(dirpath, name), source).replace(os.sep, "/")
                    paths[path] = path
                    stem = os.path.splitext(path)[0]
                    stems[stem] = path if stems.get(stem, path) == path else _AMBIGUOUS
    except DatasetError as err:
        raise UserError(str(err)) from None
    if not paths:
        raise UserError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return {**stems, **paths}  # a name that is an image's whole path is that image


def _file_column(columns: list[str], rows: list[dict], images: dict[str, str], table: Path, chosen: str | None) -> str:
    """The column naming the images: CHOSEN, or the first whose first value names an image. A header
    whose own values name images is no header: the table's first image would be taken for one."""
    _check_column(chosen, columns, table, "--file-column")
    if any(images.get(name.replace(os.sep, "/")) for name in columns):
        raise UserError(f"{table}'s first line names an image ({', '.join(columns)}): the table needs a header row "
                        "naming its columns (e.g. 'file,label') above the rows")
    if chosen:
        return chosen
    first = rows[0]
    for column in columns:
        if images.get((first.get(column) or "").strip().replace(os.sep, "/")):
            return column
    values = ", ".join(f"{column}={(first.get(column) or '').strip()!r}" for column in columns)
    raise UserError(f"no column of {table} names an image below the source folder in its first row ({values}): name "
                    "the column with --file-column, or give the folder the paths are below")


def _label_column(columns: list[str], file_column: str, table: Path, chosen: str | None) -> str:
    _check_column(chosen, columns, table, "--label-column")
    others = [column for column in columns if column != file_column]
    if chosen:
        return chosen
    if len(others) == 1:
        return others[0]
    raise UserError(f"{table} has the columns {', '.join(columns)}: say which holds the class with --label-column")


def _check_column(name: str | None, columns: list[str], table: Path, option: str) -> None:
    if name is not None and name not in columns:
        raise UserError(f"{option} {name!r}: {table} has the columns {', '.join(columns)}")


def _check_class_name(label: str, table: Path, number: int) -> None:
    """A class becomes a folder's name, which the loaders read back: it must be one."""
    if not label:
        raise UserError(f"{table}:{number}: no class given")
    if "/" in label or "\\" in label or "\0" in label or label in (".", ".."):
        raise UserError(f"{table}:{number}: class {label!r} cannot name a folder (a '/', '\\' or '.' alone)")
    if label.startswith("."):
        raise UserError(f"{table}:{number}: class {label!r} starts with '.': its folder would be hidden, and the "
                        "loaders skip hidden folders")
