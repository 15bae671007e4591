"""Input files that are not what they should be (a prompt file with a 20 MB line, Latin-1 bytes, a folder
where a file belongs, a missing file) are refused at once, naming the file and the line."""

import json
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowgrpo_core.config import MAX_CONFIG_BYTES, ConfigError, load_config
from flowgrpo_core.prompts import load_prompts
from flowgrpo_core.prompts.loading import MAX_LINE_BYTES
from flowgrpo_core.prompts.parquet import SCHEMA
from flowgrpo_core.prompts.sets import MAX_PROMPT_CHARS

HUGE = 20_000_000  # bytes in the line that used to hang a run


@pytest.mark.parametrize(
    ("name", "line"),
    [("p.txt", b"x" * HUGE), ("p.jsonl", b'{"prompt": "' + b"x" * HUGE + b'"}')],
)
def test_a_20_mb_prompt_line_is_refused_at_once_naming_file_and_line(tmp_path, name, line):
    path = tmp_path / name
    first = b'{"prompt": "a cat"}' if name.endswith(".jsonl") else b"a cat"
    path.write_bytes(first + b"\n" + line + b"\n")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: line longer than {MAX_LINE_BYTES} bytes")):
        load_prompts(str(path))
    assert time.perf_counter() - started < 2.0  # measured: well under 10 ms


def test_a_prompt_over_the_length_limit_is_refused_in_every_format(tmp_path):
    long = "y" * (MAX_PROMPT_CHARS + 1)
    txt, jsonl, parquet = tmp_path / "p.txt", tmp_path / "p.jsonl", tmp_path / "p.parquet"
    txt.write_text(f"a cat\n{long}\n")
    jsonl.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    metadata = [json.dumps({"tag": "general", "prompt": p}) for p in ("a cat", long)]
    pq.write_table(
        pa.table({"prompt": ["a cat", long], "tag": ["general"] * 2, "metadata": metadata}, schema=SCHEMA),
        parquet,
    )
    limit = f"the prompt has {MAX_PROMPT_CHARS + 1} characters; the limit is {MAX_PROMPT_CHARS}"
    for path, where in ((txt, f"{txt}:2"), (jsonl, f"{jsonl}:2"), (parquet, f"{parquet}: row 1")):
        with pytest.raises(ValueError, match=re.escape(where) + r".*: " + re.escape(limit)):
            load_prompts(str(path))
    txt.write_text("y" * MAX_PROMPT_CHARS + "\n")
    assert load_prompts(str(txt)).prompts == ["y" * MAX_PROMPT_CHARS]


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl"])
def test_a_non_utf8_prompt_file_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    second = (
        "un café au lait" if name.endswith(".txt") else json.dumps({"prompt": "un café"}, ensure_ascii=False)
    )
    path.write_bytes(b"a cat\n" if name.endswith(".txt") else b'{"prompt": "a cat"}\n')
    with path.open("ab") as stream:
        stream.write(second.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text (byte 0xe9")):
        load_prompts(str(path))


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\na café\n".encode())
    assert load_prompts(str(path)).prompts == ["a cat", "a café"]


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl", "prompts.parquet"])
def test_a_folder_or_a_missing_file_given_as_prompt_file(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    with pytest.raises(
        ValueError, match=re.escape(f"prompt file {str(folder)!r} is a directory, expected a file")
    ):
        load_prompts(str(folder))
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"prompt file {str(tmp_path / 'no' / name)!r} does not")
    ):
        load_prompts(str(tmp_path / "no" / name))


def test_config_files_that_are_not_yaml_text_are_refused_naming_file_and_line(tmp_path):
    where = lambda path: re.escape(f"config file {str(path)!r}")  # noqa: E731
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  beta: 0.1\ntracking:\n  run_name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=where(latin) + r", line 4: not UTF-8 text \(byte 0xe9\)"):
        load_config("tiny", latin)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"train:\n  beta: 0.1\n# " + b"x" * HUGE + b"\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=where(huge) + f" is larger than {MAX_CONFIG_BYTES} bytes"):
        load_config("tiny", huge)
    assert time.perf_counter() - started < 2.0
    long_line = tmp_path / "long.yaml"
    long_line.write_bytes(b"tracking:\n  run_name: " + b"x" * (200 << 10) + b"\n")
    with pytest.raises(ConfigError, match=where(long_line) + r", line 2: longer than 65536 bytes"):
        load_config("tiny", long_line)
    folder = tmp_path / "conf.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=where(folder) + " is a directory, expected a file"):
        load_config("tiny", folder)
    with pytest.raises(ConfigError, match=where(tmp_path / "none.yaml") + " does not exist"):
        load_config("tiny", tmp_path / "none.yaml")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain:\n  beta: 0.2\n")
    assert load_config("tiny", bom).train.beta == 0.2
