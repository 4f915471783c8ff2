"""Dataset format: built-ins, JSON and JSONL round trips, clear errors naming file and checksum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personachat.prompts import (
    DatasetError,
    PersonaDataset,
    builtin_names,
    from_json,
    load_builtin,
    load_dataset,
    load_dataset_file,
)

SEED_003 = {
    "neutral": ["default", "default_assistant", "default_llm", "default_helpful"],
    "professional": ["assistant", "analyst", "evaluator", "generalist"],
    "creative": ["storyteller", "philosopher", "artist", "rebel", "mystic"],
    "specialized": ["trader", "rationalist", "cynic", "naive"],
    "fantastical": ["ghost", "bohemian", "oracle", "bard", "trickster", "jester"],
}

SMALL = {
    "name": "small",
    "personas": [
        {"name": "default", "system_prompt": ""},
        {"name": "pirate", "system_prompt": "You are a pirate.", "category": "fantastical"},
    ],
    "questions": ["Where is Paris?", "What is the sea?"],
    "responses": [{"persona": "pirate", "question": "Where is Paris?", "response": "Arr, France."}],
    "pairs": [{"name": "pirate_default", "high": "pirate", "low": "default", "kind": "x"}],
}


def test_builtin_personas_follow_the_assistant_axis_study() -> None:
    assert set(builtin_names()) >= {"personas", "big_five", "roles"}
    ds = load_builtin("personas")
    by_cat: dict[str, list[str]] = {}
    for p in ds.personas:
        by_cat.setdefault(p.category, []).append(p.name)
        if p.name != "default":
            assert len(p.system_prompt) > 20, p.name
    assert by_cat == SEED_003
    assert len(ds.questions) >= 18


def test_builtin_traits_and_roles() -> None:
    big5 = load_builtin("big_five")
    assert [p.name for p in big5.pairs] == [
        "openness",
        "conscientiousness",
        "extraversion",
        "agreeableness",
        "neuroticism",
    ]
    assert all(
        big5.persona(p.high).system_prompt != big5.persona(p.low).system_prompt for p in big5.pairs
    )
    assert "When meeting new people, I usually" in big5.questions
    roles = load_builtin("roles")
    kinds = {p.name: p.kind for p in roles.pairs}
    assert kinds == {
        "teacher_student": "role",
        "professor_pupil": "role",
        "doctor_nurse": "role",
        "manager_intern": "role",
        "man_woman": "gender",
        "male_doctor_female_doctor": "gender",
        "son_daughter": "gender",
    }
    assert roles.persona("female_doctor").system_prompt.startswith("You are a female doctor.")


def test_json_and_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SMALL))
    ds = load_dataset(str(path))
    assert ds.response("pirate", "Where is Paris?") == "Arr, France."
    assert ds.response("pirate", "What is the sea?") is None
    assert not ds.has_all_responses()
    lines = [{"type": "meta", "name": "small"}]
    lines += [{"type": "persona", **p} for p in SMALL["personas"]]
    lines += [{"type": "question", "text": q} for q in SMALL["questions"]]
    lines += [{"type": "response", **r} for r in SMALL["responses"]]
    lines += [{"type": "pair", **c} for c in SMALL["pairs"]]
    jsonl = tmp_path / "small.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    again = load_dataset_file(jsonl)
    assert again.sha256 == ds.sha256 == from_json(ds.to_json()).sha256
    changed = from_json({**SMALL, "questions": [*SMALL["questions"], "New?"]})
    assert changed.sha256 != ds.sha256


def test_select_keeps_order_and_rejects_unknown() -> None:
    ds = load_builtin("personas")
    sub = ds.select(["jester", "default"])
    assert sub.persona_names == ["jester", "default"]
    with pytest.raises(DatasetError, match=r"unknown persona 'pirate'.*known: \['default'"):
        ds.select(["pirate"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(personas=[]), "'personas' must be a non-empty list"),
        (lambda d: d.update(questions=[]), "'questions' must be a non-empty list"),
        (lambda d: d["personas"].append(dict(d["personas"][0])), "duplicate persona names"),
        (lambda d: d["personas"][1].update(name="../evil"), "not allowed"),
        (lambda d: d["responses"][0].update(persona="ghost"), "unknown persona 'ghost'"),
        (lambda d: d["responses"][0].update(question="Who?"), "is not in 'questions'"),
        (lambda d: d["pairs"][0].update(low="nobody"), "unknown persona 'nobody'"),
        (lambda d: d.update(extra=1), "unknown top-level keys \\['extra'\\]"),
        (lambda d: d["personas"][0].pop("system_prompt"), "'system_prompt' must be"),
    ],
)
def test_bad_files_name_the_file_and_field(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(json.dumps(SMALL))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset(path)
    assert "bad.json (sha256 " in str(err.value)


def test_empty_missing_and_malformed_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_file(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="neither a built-in dataset"):
        load_dataset("no_such_dataset")
    broken = tmp_path / "broken.json"
    broken.write_text('{"personas": [')
    with pytest.raises(DatasetError, match="invalid JSON at line 1"):
        load_dataset(broken)
    lines = tmp_path / "typeless.jsonl"
    lines.write_text('{"name": "x"}\n')
    with pytest.raises(DatasetError, match=r"typeless\.jsonl.*:1: each line needs a 'type'"):
        load_dataset(lines)


def test_generated_responses_are_seeded_and_cached(tmp_path: Path) -> None:
    from personachat.pipeline.responses import GenerationConfig, ensure_responses
    from tests.conftest import tiny

    lm = tiny("llama")
    ds = from_json({**SMALL, "responses": []})
    cfg = GenerationConfig(max_new_tokens=4, seed=3, batch_size=3)
    first = ensure_responses(lm, ds, cfg=cfg, cache_dir=tmp_path / "a", progress=False)
    assert first.has_all_responses() and len(first.responses) == 4
    again = ensure_responses(lm, ds, cfg=cfg, cache_dir=tmp_path / "b", progress=False)
    assert dict(again.responses) == dict(first.responses)  # same seed, same replies
    (cache,) = (tmp_path / "a").glob("*.json")
    rows = json.loads(cache.read_text())
    rows[0]["response"] = "FROM THE CACHE"
    cache.write_text(json.dumps(rows))
    cached = ensure_responses(lm, ds, cfg=cfg, cache_dir=tmp_path / "a", progress=False)
    assert "FROM THE CACHE" in cached.responses.values()
    # given responses are kept, and only the missing cells are generated
    partial = ensure_responses(lm, load_dataset_from(SMALL), cfg=cfg, cache_dir=tmp_path / "c")
    assert partial.response("pirate", "Where is Paris?") == "Arr, France."
    assert len(partial.responses) == 4


def load_dataset_from(data: dict) -> PersonaDataset:  # type: ignore[type-arg]
    return from_json(json.loads(json.dumps(data)))


def test_demo_is_a_builtin_built_from_the_planted_corpus() -> None:
    from personachat.prompts import load_dataset

    ds = load_dataset("demo")
    assert "demo" in builtin_names()
    assert ds.persona_names[0] == "default" and "pirate" in ds.persona_names
    assert len(ds.responses) == len(ds.personas) * len(ds.questions)
    assert {p.name for p in ds.pairs} >= {"pirate_vs_default"}


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_a_hundred_thousand_personas_load_in_linear_time(tmp_path: Path) -> None:
    """Loading, selecting and hashing grow linearly with the personas (a quadratic scan over
    100k names takes minutes; this takes about a second)."""
    n = 100_000
    data = {
        "name": "big",
        "personas": [{"name": f"p{i}", "system_prompt": f"You are {i}."} for i in range(n)],
        "questions": ["Who are you?"],
        "responses": [
            {"persona": f"p{i}", "question": "Who are you?", "response": "Me."}
            for i in range(0, n, 10)
        ],
        "pairs": [{"name": f"pair{i}", "high": f"p{i}", "low": f"p{i + 1}"} for i in range(1000)],
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))
    dataset = load_dataset_file(path)
    half = dataset.select([f"p{i}" for i in range(0, n, 2)])
    assert len(half.personas) == n // 2 and half.persona("p99998").system_prompt == "You are 99998."
    assert len(dataset.sha256) == 64
