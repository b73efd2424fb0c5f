"""Prompt sets: the built-in red-team and benign sets, and a user's JSONL, JSON, CSV and
text files, with errors that name the file and the line."""
import collections
import json

import pytest

from cai.prompts import load_prompts
from engine.errors import InputError


# ---------------------------------------------------------------- built-in sets

@pytest.mark.parametrize("name, at_least, categories", [("redteam", 220, 10),
                                                        ("benign", 120, 8)])
def test_builtin_sets_sizes_and_stratified_split(name, at_least, categories):
    records = load_prompts(name)
    assert len(records) >= at_least
    by_cat = collections.defaultdict(collections.Counter)
    for r in records:
        assert r.category and r.split in ("train", "heldout") and r.messages is None
        by_cat[r.category][r.split] += 1
    assert len(by_cat) >= categories
    for cat, counts in by_cat.items():  # every category is in both splits, ~20% held out
        share = counts["heldout"] / sum(counts.values())
        assert 0.1 <= share <= 0.3, (cat, counts)
    assert len({r.prompt.lower() for r in records}) == len(records)  # no duplicates
    held = load_prompts(name, split="heldout")
    train = load_prompts(name, split="train")
    assert len(held) + len(train) == len(records)
    assert not {r.id for r in held} & {r.id for r in train}
    assert 0.15 <= len(held) / len(records) <= 0.25


def test_redteam_covers_the_harms_and_benign_has_lookalikes():
    cats = {r.category for r in load_prompts("redteam")}
    assert {"weapons", "drugs", "hacking", "fraud", "self_harm", "harassment", "hate",
            "privacy", "dangerous_chemistry", "violence", "extremism", "theft",
            "misinformation"} <= cats
    lookalike = [r.prompt for r in load_prompts("benign") if r.category == "lookalike"]
    assert any("kill a Python process" in p for p in lookalike)


def test_limit_and_bad_arguments():
    assert [r.id for r in load_prompts("redteam", limit=3)] == \
        [r.id for r in load_prompts("redteam")[:3]]
    assert load_prompts("benign", limit=0) == []
    with pytest.raises(InputError, match="split must be one of"):
        load_prompts("redteam", split="test")
    with pytest.raises(InputError, match="limit must be >= 0"):
        load_prompts("redteam", limit=-1)
    with pytest.raises(InputError, match="not a built-in prompt set"):
        load_prompts("nonexistent")


# ---------------------------------------------------------------- user files

def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_prompts_and_messages(tmp_path):
    path = _write(tmp_path, "data.jsonl", "\n".join([
        json.dumps({"prompt": "  Hello there  ", "extra": 1}),
        "",
        json.dumps({"id": "m1", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How do I bake bread?"}], "split": "train"}),
    ]) + "\n")
    a, b = load_prompts(path)
    assert (a.id, a.prompt, a.messages, a.split) == ("data-1", "Hello there", None, None)
    assert b.id == "m1" and b.prompt == "How do I bake bread?" and len(b.messages) == 4


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "ok"}', "{not json"], r"data\.jsonl:2: not valid JSON"),
    (['{"prompt": "ok"}', '{"text": "x"}'], r"data\.jsonl:2: missing 'prompt'"),
    (['"just a string"'], r"data\.jsonl:1: expected a JSON object"),
    (['{"prompt": ""}'], r"data\.jsonl:1: 'prompt' must be a non-empty string"),
    (['{"prompt": 3}'], r"data\.jsonl:1: 'prompt' must be a non-empty string"),
    (['{"prompt": "a", "split": "dev"}'], r"data\.jsonl:1: 'split' must be one of"),
    (['{"messages": []}'], r"data\.jsonl:1: 'messages' must be a non-empty list"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'],
     r"data\.jsonl:1: 'messages' must end with a user turn"),
    (['{"messages": [{"role": "human", "content": "a"}]}'], r"data\.jsonl:1: messages\[0\]"),
    (['{"id": "x", "prompt": "a"}', '{"id": "x", "prompt": "b"}'], r"duplicate id 'x'"),
    (["", "  "], r"data\.jsonl: empty file"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path, "data.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message):
        load_prompts(path)


def test_split_filter_needs_a_split_field(tmp_path):
    path = _write(tmp_path, "d.jsonl", '{"prompt": "a", "split": "heldout"}\n{"prompt": "b"}\n')
    with pytest.raises(InputError, match="record 'd-2' has no 'split'"):
        load_prompts(path, split="heldout")


def test_csv(tmp_path):
    path = _write(tmp_path, "p.csv", 'id,prompt,category\n'
                  'a,"How do I knit, if I have never tried?",craft\n'
                  ',,\n'
                  'b,"Two\nlines",misc\n')
    a, b = load_prompts(path)
    assert (a.id, a.prompt, a.category) == ("a", "How do I knit, if I have never tried?", "craft")
    assert b.prompt == "Two\nlines"
    with pytest.raises(InputError, match=r"q\.csv:1: no 'prompt' column"):
        load_prompts(_write(tmp_path, "q.csv", "text\nhello\n"))
    with pytest.raises(InputError, match=r"r\.csv:3: empty 'prompt'"):
        load_prompts(_write(tmp_path, "r.csv", "prompt,category\nfine,x\n,y\n"))
    with pytest.raises(InputError, match=r"s\.csv: empty file"):
        load_prompts(_write(tmp_path, "s.csv", ""))


def test_plain_text_and_json_array(tmp_path):
    records = load_prompts(_write(tmp_path, "p.txt", "first\n\n  second  \n"))
    assert [(r.id, r.prompt) for r in records] == [("p-1", "first"), ("p-3", "second")]
    records = load_prompts(_write(tmp_path, "p.json", json.dumps(["one", {"prompt": "two"}])))
    assert [r.prompt for r in records] == ["one", "two"]
    with pytest.raises(InputError, match=r"bad\.json: \[1\]: missing 'prompt'"):
        load_prompts(_write(tmp_path, "bad.json", json.dumps(["one", {"q": 1}])))
    with pytest.raises(InputError, match=r"e\.txt: empty file"):
        load_prompts(_write(tmp_path, "e.txt", "\n\n"))
    with pytest.raises(InputError, match="not UTF-8"):
        bad = tmp_path / "latin.txt"
        bad.write_bytes(b"caf\xe9\n")
        load_prompts(bad)
