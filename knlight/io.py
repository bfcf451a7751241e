"""Small JSON / JSONL helpers that turn every input problem into a :class:`DataError` naming file and line."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

from knlight.errors import DataError


def resolved_from(path: Path | str) -> str:
    """For an error message about a relative path: where it was looked for (empty for an absolute path).

    Args:
        path: The path as the user gave it.

    Returns:
        ``""`` when ``path`` is absolute, else ``" (looked for <absolute path>, relative to the working
        directory <cwd>)"``.
    """
    path = Path(path)
    if path.is_absolute():
        return ""
    return f" (looked for {path.resolve()}, relative to the working directory {Path.cwd()})"


def require_dir(path: Path, what: str, expected: str) -> Path:
    """Checks that a folder exists.

    Args:
        path: The folder.
        what: What the folder is, for the message (e.g. "mParaRel root").
        expected: The layout expected inside it, for the message.

    Returns:
        The same path.

    Raises:
        DataError: If the folder does not exist.
    """
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"{what} {path} {state}{resolved_from(path)}; expected the layout {expected}. Pass the right folder."
        )
    return path


def require_file(path: Path, what: str, expected: str) -> Path:
    """Checks that a file exists.

    Args:
        path: The file.
        what: What the file is, for the message.
        expected: The layout or content expected, for the message.

    Returns:
        The same path.

    Raises:
        DataError: If the file does not exist.
    """
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(
            f"{what} {path} {state}{resolved_from(path)}; expected {expected}. Pass the right folder or file."
        )
    return path


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, object)`` for each non-blank line of a JSONL file.

    Args:
        path: The JSONL file (UTF-8).

    Yields:
        The 1-based line number and the decoded JSON object of each non-blank line.

    Raises:
        DataError: If the file is not UTF-8, a line is not valid JSON, or a line is not a JSON object.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}:{line_number}: malformed JSON line ({error.msg} at column {error.colno}); "
                        "fix or remove that line (one JSON object per line)."
                    ) from None
                if not isinstance(value, dict):
                    raise DataError(
                        f"{path}:{line_number}: expected a JSON object per line, got {type(value).__name__}; "
                        "fix or remove that line."
                    )
                yield line_number, value
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason}); re-encode the file as UTF-8.") from None


def read_json(path: Path) -> Any:
    """Reads a whole JSON file.

    Args:
        path: The JSON file (UTF-8).

    Returns:
        The decoded value.

    Raises:
        DataError: If the file is not UTF-8 or not valid JSON (the message gives line and column).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno}); fix the file."
        ) from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason}); re-encode the file as UTF-8.") from None


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Writes a file so that readers never see a half-written file (any format: text, safetensors, ...).

    ``write`` fills a temporary file in the same folder, which is flushed to disk, given the permissions of a
    normally created file and then replaces ``path`` in one step. On any error the temporary file is removed
    and ``path`` is left as it was.

    Args:
        path: The destination; its folder is created if needed.
        write: Writes the content to the file path it is given (e.g. ``lambda t: save_file(tensors, t)``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        flushed = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(flushed)
        finally:
            os.close(flushed)
        # mkstemp creates the file private (0600); give it the permissions of a normally created file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Writes a text file atomically (see :func:`write_atomically`).

    Args:
        path: The destination; its folder is created if needed.
        text: The UTF-8 text to write.
    """

    def write(target: str) -> None:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_atomically(path, write)


def json_safe(value: Any) -> Any:
    """A JSON-ready copy of a value: NaN and infinities become null (valid JSON), recursively.

    Args:
        value: Floats, dicts, lists and tuples (tuples become lists) are converted; anything else is kept.
    """
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of flat dict rows: the columns of the first row, floats by ``repr`` (NaN as ``nan``).

    Args:
        rows: The rows (no rows: empty text).
    """
    out = StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def short_hash(value: Any) -> str:
    """16 hex digits of the SHA-256 of a JSON-serialisable value (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_lines_atomically(path: Path, lines: Iterable[str]) -> None:
    """Write text lines (each ending with a newline) atomically."""
    write_text_atomically(path, "".join(line + "\n" for line in lines))


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file (a missing file has none)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
