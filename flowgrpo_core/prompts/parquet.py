"""Prompt sets as Parquet files: the schema (one row per prompt: ``prompt``, ``tag`` and ``metadata``, a JSON
object), the writer, and a reader whose errors name the file and the column or row at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flowgrpo_core.prompts.sets import PromptSet, check_prompt_length
from flowgrpo_core.prompts.vocabulary import KNOWN_TAGS, TAGS, validate_metadata

SCHEMA_VERSION = "1"
SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False, metadata={"description": "the text-to-image prompt"}),
        pa.field(
            "tag",
            pa.string(),
            nullable=False,
            metadata={"description": f"one of {', '.join(TAGS)}, ocr, general"},
        ),
        pa.field(
            "metadata", pa.string(), nullable=False, metadata={"description": "JSON object, GenEval format"}
        ),
    ],
    metadata={"flowgrpo.prompt_set.version": SCHEMA_VERSION},
)


def write_prompt_parquet(path: str | Path, metadata: Iterable[Mapping[str, Any]]) -> Path:
    """Write metadata dicts (each with ``tag`` and ``prompt``) as a prompt-set Parquet file."""
    rows = list(metadata)
    for index, meta in enumerate(rows):
        _validate_row(meta.get("prompt"), meta.get("tag"), dict(meta), f"row {index}")
    table = pa.table(
        {
            "prompt": [m["prompt"] for m in rows],
            "tag": [m["tag"] for m in rows],
            "metadata": [json.dumps(m, separators=(",", ":")) for m in rows],
        },
        schema=SCHEMA,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", compression_level=19)
    return path


def read_prompt_parquet(path: str | Path) -> PromptSet:
    """A prompt set from Parquet; errors name the file and the column or row at fault."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column {', '.join(map(repr, missing))} (columns: {', '.join(table.column_names)}; "
            f"expected: {', '.join(SCHEMA.names)})"
        )
    for name in SCHEMA.names:
        if not pa.types.is_string(table.schema.field(name).type) and not pa.types.is_large_string(
            table.schema.field(name).type
        ):
            raise ValueError(
                f"{path}: column {name!r} must hold strings, not {table.schema.field(name).type}"
            )
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows; a prompt set needs at least one prompt")
    prompts, tags, raw = (table.column(name).to_pylist() for name in SCHEMA.names)
    metadata = []
    for index, (prompt, tag, text) in enumerate(zip(prompts, tags, raw)):
        # the prompt's start only: a prompt over the length limit must not fill the message
        where = f"{path}: row {index}" + (f" ({prompt[:80]!r})" if isinstance(prompt, str) else "")
        try:
            meta = json.loads(text) if isinstance(text, str) else None
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: column 'metadata' is not valid JSON ({error.msg})") from None
        _validate_row(prompt, tag, meta, where)
        metadata.append(meta)
    return PromptSet(prompts, metadata)


def _validate_row(prompt: Any, tag: Any, meta: Any, where: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: column 'prompt' must be a non-empty string")
    check_prompt_length(prompt, where)
    if tag not in KNOWN_TAGS:
        raise ValueError(f"{where}: unknown tag {tag!r}; known tags: {', '.join(KNOWN_TAGS)}")
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: column 'metadata' must be a JSON object")
    if meta.get("tag") != tag:
        raise ValueError(f"{where}: metadata tag {meta.get('tag')!r} differs from column 'tag' {tag!r}")
    if "prompt" in meta and meta["prompt"] != prompt:
        raise ValueError(f"{where}: metadata prompt {meta['prompt']!r} differs from column 'prompt'")
    try:
        if tag in TAGS:
            validate_metadata(meta)
        elif tag == "ocr":
            text = meta.get("text")
            if not isinstance(text, str) or not text.strip() or '"' in text:
                raise ValueError("OCR metadata needs a non-empty 'text' without double quotes")
            if f'"{text}"' not in prompt:
                raise ValueError(f"the prompt does not contain the text {text!r} in double quotes")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
