"""Builtin prompt sets: GenEval's benchmark regenerated, disjoint train/test splits, deterministic and
fast generation, the committed Parquet files, and Parquet validation that names the row or column."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flowgrpo_core.prompts import GENERATED_SETS, PromptSet, builtin_names, draw_prompts, load_prompts
from flowgrpo_core.prompts import generators as prompt_sets
from flowgrpo_core.prompts.generators import BUILTIN_SETS, DATA_DIR, GenEvalGenerator, generate_builtin
from flowgrpo_core.prompts.loading import GENERATED_FAMILIES
from flowgrpo_core.prompts.parquet import SCHEMA, read_prompt_parquet, write_prompt_parquet
from flowgrpo_core.prompts.vocabulary import TAGS, requirement_key
from flowgrpo_core.rewards.ocr import quoted_text


def tags_of(rows) -> dict[str, int]:
    return dict(Counter(row["tag"] for row in rows))


def test_geneval_test_is_genevals_benchmark():
    suite = GenEvalGenerator().suite(np.random.default_rng(43))
    # the first lines of GenEval's prompts/evaluation_metadata.jsonl
    assert [s["prompt"] for s in suite[:3]] == [
        "a photo of a bench",
        "a photo of a cow",
        "a photo of a bicycle",
    ]
    test = generate_builtin("geneval_test")
    assert tags_of(test) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    prompts = {row["prompt"] for row in test}
    for known in (
        "a photo of a dog right of a teddy bear",
        "a photo of a purple wine glass and a black apple",
        "a photo of two clocks",
        "a photo of a pink car",
        "a photo of a stop sign above a fork",
    ):
        assert known in prompts
    counting = next(row for row in test if row["prompt"] == "a photo of two clocks")
    assert counting == {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks",
    }
    assert not any(req["class"] == "person" and "color" in req for row in test for req in row["include"])


def test_sizes_per_tag():
    assert tags_of(generate_builtin("geneval_train")) == {
        "two_object": 1000,
        "counting": 160,
        "colors": 696,
        "position": 1000,
        "color_attr": 1000,
    }
    assert tags_of(generate_builtin("ocr_test")) == {"ocr": 1018} and tags_of(
        generate_builtin("ocr_train")
    ) == {"ocr": 6000}
    assert tags_of(generate_builtin("general_test")) == {"general": 1000} and tags_of(
        generate_builtin("general_train")
    ) == {"general": 4000}
    assert tags_of(generate_builtin("shapes_test")) == {
        "single_object": 1,
        "two_object": 4,
        "counting": 3,
        "colors": 10,
        "position": 12,
        "color_attr": 50,
    }
    assert tags_of(generate_builtin("shapes_train")) == {
        "single_object": 3,
        "two_object": 8,
        "counting": 9,
        "colors": 30,
        "position": 36,
        "color_attr": 150,
    }


@pytest.mark.parametrize("family", ["geneval", "ocr", "shapes", "general"])
def test_train_and_test_share_no_prompt(family):
    train, test = generate_builtin(f"{family}_train"), generate_builtin(f"{family}_test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in test}) == len(test)
    if family in ("geneval", "shapes"):  # nor the same requirements in other words
        assert not {requirement_key(r) for r in train} & {requirement_key(r) for r in test}
    if family == "ocr":

        def norm(row):
            return row["text"].lower().replace(" ", "")

        assert not {norm(r) for r in train} & {norm(r) for r in test}


def test_requirement_key_ignores_wording_and_order():
    generator = GenEvalGenerator()
    a = generator.sample(
        "two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "a cat and a dog"
    )
    b = generator.sample(
        "two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "a dog and a cat"
    )
    assert requirement_key(a) == requirement_key(b)
    right = {
        "tag": "position",
        "include": [
            {"class": "bench", "count": 1},
            {"class": "dog", "count": 1, "position": ["right of", 0]},
        ],
    }
    left = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "bench", "count": 1, "position": ["left of", 0]}],
    }
    above = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "bench", "count": 1, "position": ["above", 0]}],
    }
    assert requirement_key(right) == requirement_key(left) != requirement_key(above)


def test_generation_is_deterministic():
    # no wall-clock bound here: it failed on a loaded machine (1.4 s), and speed belongs to benchmarks/
    for family, make in prompt_sets._PAIRS.items():
        assert make() == make(), family


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_committed_files_match_the_generators(name):
    committed = read_prompt_parquet(DATA_DIR / f"{name}.parquet")
    generated = generate_builtin(name)
    assert committed.prompts == [row["prompt"] for row in generated]
    assert committed.metadata == generated
    loaded = load_prompts(f"builtin:{name}")  # registered by importing prompt_sets
    assert loaded.prompts == committed.prompts


def test_committed_files_are_small_and_have_the_schema():
    files = [DATA_DIR / f"{name}.parquet" for name in BUILTIN_SETS]
    assert sum(f.stat().st_size for f in files) < 1_000_000
    schema = pq.read_schema(files[0])
    assert schema.names == SCHEMA.names and schema.metadata[b"flowgrpo.prompt_set.version"] == b"1"


def test_prefixes_hold_every_tag():
    test = generate_builtin("geneval_test")
    assert len(tags_of(test[:24])) == 6  # evaluation taking the first N prompts still sees all tasks
    first_100 = tags_of(test[:100])
    assert all(abs(first_100[tag] - n * 100 / 553) <= 1 for tag, n in tags_of(test).items())


def test_ocr_prompts_quote_their_text():
    for row in generate_builtin("ocr_test") + generate_builtin("ocr_train"):
        assert quoted_text(row["prompt"]) == row["text"]
        assert 1 <= len(row["text"]) <= 20


def test_parquet_round_trip(tmp_path):
    rows = generate_builtin("shapes_test")
    path = write_prompt_parquet(tmp_path / "shapes.parquet", rows)
    loaded = read_prompt_parquet(path)
    assert loaded.prompts == [r["prompt"] for r in rows] and loaded.metadata == rows


def write_table(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def geneval_row(tag: str = "single_object", prompt: str = "a photo of a cat") -> dict:
    return {"tag": tag, "include": [{"class": "cat", "count": 1}], "prompt": prompt}


def test_missing_column_is_named(tmp_path):
    path = write_table(tmp_path / "bad.parquet", {"prompt": ["a photo of a cat"], "tag": ["single_object"]})
    with pytest.raises(ValueError, match=r"missing column 'metadata' \(columns: prompt, tag"):
        read_prompt_parquet(path)


def test_unknown_tag_names_the_row(tmp_path):
    rows = [
        geneval_row(),
        {"tag": "poses", "include": [{"class": "dog", "count": 1}], "prompt": "a dog sitting"},
    ]
    path = write_table(
        tmp_path / "bad.parquet",
        {
            "prompt": [r["prompt"] for r in rows],
            "tag": [r["tag"] for r in rows],
            "metadata": [json.dumps(r) for r in rows],
        },
    )
    with pytest.raises(ValueError, match=r"bad.parquet: row 1 \('a dog sitting'\): unknown tag 'poses'"):
        read_prompt_parquet(path)


def test_empty_file_fails(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(SCHEMA.empty_table(), path)
    with pytest.raises(ValueError, match=r"empty\.parquet: no rows"):
        read_prompt_parquet(path)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("{not json", r"row 0 .*column 'metadata' is not valid JSON"),
        (
            json.dumps(geneval_row("colors")),
            r"row 0 .*metadata tag 'colors' differs from column 'tag' 'single_object'",
        ),
        (
            json.dumps({**geneval_row(), "include": [{"class": "cat", "count": 1, "color": "teal"}]}),
            r"row 0 .*include\[0\]: unknown color 'teal'",
        ),
        (
            json.dumps({**geneval_row(), "prompt": "a photo of a dog"}),
            r"row 0 .*metadata prompt 'a photo of a dog' differs",
        ),
    ],
)
def test_bad_metadata_names_the_row(tmp_path, metadata, message):
    path = write_table(
        tmp_path / "bad.parquet",
        {"prompt": ["a photo of a cat"], "tag": ["single_object"], "metadata": [metadata]},
    )
    with pytest.raises(ValueError, match=message):
        read_prompt_parquet(path)


def test_bad_rows_are_refused_on_write(tmp_path):
    with pytest.raises(
        ValueError, match=r"row 1: the prompt does not contain the text 'Open' in double quotes"
    ):
        write_prompt_parquet(
            tmp_path / "x.parquet",
            [
                {"tag": "ocr", "text": "Hi", "prompt": 'a sign that says "Hi"'},
                {"tag": "ocr", "text": "Open", "prompt": "a sign that says Open"},
            ],
        )
    with pytest.raises(ValueError, match="row 0: column 'prompt' must be a non-empty string"):
        write_prompt_parquet(tmp_path / "x.parquet", [{"tag": "general", "prompt": " "}])


def test_not_parquet_fails_with_the_path(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match=r"prompts\.parquet: not a readable Parquet file"):
        read_prompt_parquet(path)


def test_draw_by_tag_is_even_over_tasks_and_reproducible():
    train = load_prompts("builtin:shapes_train")  # 150 of its 236 prompts are color_attr
    draw = lambda seed: draw_prompts(train, 60, torch.Generator().manual_seed(seed), by_tag=True)  # noqa: E731
    chosen = draw(0)
    assert Counter(train.metadata[i]["tag"] for i in chosen) == {tag: 10 for tag in TAGS}
    # a tag with 3 prompts repeats only after all 3 were drawn
    singles = [i for i in chosen if train.metadata[i]["tag"] == "single_object"]
    assert all(len(set(singles[k : k + 3])) == 3 for k in range(0, 9, 3))
    assert chosen == draw(0) and chosen != draw(1)
    uniform = draw_prompts(train, 60, torch.Generator().manual_seed(0))
    assert Counter(train.metadata[i]["tag"] for i in uniform)["color_attr"] > 25


def test_draw_by_tag_names_an_untagged_prompt():
    prompts = PromptSet(["a cat", "a dog"], [{"tag": "animals"}, {}])
    with pytest.raises(ValueError, match=r"prompt 1 \('a dog'\) has no metadata 'tag'"):
        draw_prompts(prompts, 2, torch.Generator(), by_tag=True)


def test_named_prompts_keep_their_metadata_and_name_the_missing():
    train = load_prompts("builtin:shapes_train")
    picked = train.named(["three circles", "two circles"])
    assert picked.prompts == ["three circles", "two circles"]
    assert [m["tag"] for m in picked.metadata] == ["counting", "counting"]
    with pytest.raises(KeyError, match="'five circles'"):
        train.named(["three circles", "five circles"])


def test_the_builtin_list_is_static_and_names_what_the_generators_make():
    # prompts.loading lists the generated sets without importing the generators (no registry filled by imports)
    assert tuple(prompt_sets._PAIRS) == GENERATED_FAMILIES and BUILTIN_SETS == GENERATED_SETS
    assert builtin_names() == sorted(["animals", *GENERATED_SETS])
    assert all((DATA_DIR / f"{name}.parquet").is_file() for name in GENERATED_SETS)
    with pytest.raises(
        ValueError, match="unknown prompt set 'builtin:nope'; builtin sets: animals, general_test"
    ):
        load_prompts("builtin:nope")
