"""Constitution loading: our YAML, the open-recipe JSON, the paper's files, validation
errors that name the file and the entry, and the `cai constitution` command."""
import argparse
import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cai import constitution_cmd
from cai.constitution import load_constitution
from cai.constitution_formats import parse_transcript
from engine.errors import InputError

FIX = Path(__file__).parent / "fixtures" / "constitutions"
SMALL = yaml.safe_load((FIX / "small.yaml").read_text())


# ---------------------------------------------------------------- the default

def test_default_meets_the_issue_minimums():
    c = load_constitution("default")
    assert c.source == "default"
    assert len(c.critique_revision) >= 16 and len(c.principles) >= 16
    assert len({tag for p in c.critique_revision for tag in p.tags}) >= 16
    kinds = [s.kind for s in c.fewshot_critique_revision]
    assert kinds.count("harmful") >= 4 and kinds.count("helpful") >= 1
    assert len(c.fewshot_preference) >= 3
    assert {s.answer for s in c.fewshot_preference} == {"A", "B"}
    assert all(p.text.startswith("Which of these") and p.text.endswith("?")
               for p in c.principles)
    # exemplars carry the request texts of the pair they name
    pairs = {p.id: p for p in c.critique_revision}
    shot = c.fewshot_critique_revision[1]
    assert shot.critique_request in {p.critique for p in pairs.values()}


def test_default_yaml_points_to_its_schema():
    text = (Path(__file__).parent.parent / "constitutions" / "default.yaml").read_text()
    assert "SCHEMA.md" in text.splitlines()[0]


def test_small_yaml_round_trip():
    c = load_constitution(FIX / "small.yaml")
    assert [p.id for p in c.critique_revision] == ["danger", "weapons"]
    assert c.critique_revision[0].tags == ["general"]
    assert c.fewshot_critique_revision[0].revision_request.startswith("Rewrite the answer with no")
    assert c.fewshot_preference[0].principle == "Which of these responses is safer?"
    assert c.fewshot_preference[0].reasoning.startswith("(A)")
    assert c.counts() == {"critique_revision_pairs": 2, "preference_principles": 2,
                          "fewshot_critique_revision": 1, "fewshot_preference": 1}


def test_principle_tags_split_comparisons_by_aspect(tmp_path):
    data = copy.deepcopy(SMALL)
    data["principles"][0]["tags"] = ["harmlessness"]
    c = load_constitution(_write_yaml(tmp_path, data))
    assert [p.tags for p in c.principles] == [["harmlessness"], []]
    assert [p.id for p in c.principles_for("harmlessness")] == ["safer", "kinder"]
    assert [p.id for p in c.principles_for("helpfulness")] == ["kinder"]  # untagged judges both
    assert len(c.principles_for(None)) == 2
    data["principles"][1]["tags"] = ["harmlessness"]
    c = load_constitution(_write_yaml(tmp_path, data, "y.yaml"))
    with pytest.raises(InputError, match=r"y\.yaml: no principle judges helpfulness"):
        c.principles_for("helpfulness")


def test_default_tags_keep_harm_questions_off_benign_pairs():
    c = load_constitution("default")
    harmless = {p.id for p in c.principles_for("harmlessness")}
    helpful = {p.id for p in c.principles_for("helpfulness")}
    assert "least_harmful" in harmless and "least_harmful" not in helpful
    assert "benign_helpfulness" in helpful and "benign_helpfulness" not in harmless
    assert {"no_weapons_or_chemistry", "legality", "privacy"}.isdisjoint(helpful)
    assert "helpful_honest_harmless" in harmless & helpful


# ---------------------------------------------------------------- published formats

def test_open_recipe_json():
    c = load_constitution(FIX / "open_recipe.json")
    assert [p.id for p in c.critique_revision] == ["critic0", "critic1"]
    assert c.critique_revision[1].revision == \
        "Rewrite the answer to be polite and fair to everyone."
    assert c.principles == [] and c.fewshot_preference == []
    first, second = c.fewshot_critique_revision
    assert first.conversation == [
        {"role": "user", "content": "How do I get into my brother's phone? He changed the code."},
        {"role": "assistant", "content": "Try his birthday, then 0000, then 1234."}]
    assert first.critique.startswith("Guessing") and first.revision.startswith("I can't")
    assert (first.kind, second.kind) == ("harmful", "helpful")
    with pytest.raises(InputError, match="has no principles"):
        c.require("critique_revision", "principles")


def test_paper_folder_strips_framing_and_parses_transcripts():
    c = load_constitution(FIX / "paper")
    ids = [p.id for p in c.critique_revision]
    assert ids == ["harmful0", "harmful1.0", "harmful1.1", "honest0"]
    h0 = c.critique_revision[0]
    assert h0.critique == "Point out anything dangerous or illegal in the assistant's last answer."
    assert h0.revision == "Rewrite the assistant's answer with nothing dangerous or illegal in it."
    assert c.critique_revision[2].critique == "Is the last answer unkind to any group of people?"
    assert [p.text for p in c.principles] == [
        "Which of these responses is kinder and less harmful?",
        "Which of these responses is more honest?",
        "Which of these responses gives less help with crimes?"]
    assert c.principles_for("helpfulness") == c.principles_for("harmlessness") == c.principles  # untagged
    dog, capital, game = c.fewshot_critique_revision
    assert dog.conversation[-1]["content"] == "Put him in a duffel bag and use the side entrance."
    assert dog.revision.endswith("find one nearby.")  # trailing "Human:" dropped
    assert len(capital.conversation) == 4 and capital.conversation[2]["role"] == "user"
    assert capital.critique_request.startswith("Is the last answer more confident")
    assert (dog.kind, game.kind) == ("harmful", "helpful")
    # 1x1 + 1x2 correct/incorrect pairs, the correct option alternating A, B, A
    prefs = c.fewshot_preference
    assert [s.answer for s in prefs] == ["A", "B", "A"]
    assert prefs[0].response_a.startswith("It might help")
    assert prefs[1].response_b.startswith("Lead with") and prefs[1].response_a.startswith("I can't")
    assert prefs[1].conversation[-1] == {"role": "user", "content": "A bakery assistant job."}
    assert prefs[0].principle is None


def test_paper_single_file_and_partial_folder(tmp_path):
    c = load_constitution(FIX / "paper" / "RLMadisonInstructions.json")
    assert len(c.principles) == 3 and c.critique_revision == []
    shutil.copy(FIX / "paper" / "CritiqueRevisionInstructions.json", tmp_path)
    c = load_constitution(tmp_path)
    assert len(c.critique_revision) == 4 and c.fewshot_critique_revision == []
    with pytest.raises(InputError, match="not a constitution folder"):
        load_constitution(tmp_path / "..")  # pytest's base folder holds none of the files


def test_parse_transcript_labels():
    turns = parse_transcript("Human: hi\nAssistant: hello\n\nCritique Request: r\nCritique: c"
                             "\n\nRevisionRequest: q\n\nRevision: v\n\nHuman:")
    assert [t[0] for t in turns] == ["Human", "Assistant", "CritiqueRequest", "Critique",
                                     "RevisionRequest", "Revision"]
    assert turns[-1] == ("Revision", "v")


# ---------------------------------------------------------------- validation errors

def _write_yaml(tmp_path, data, name="x.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _mutated(fn):
    data = copy.deepcopy(SMALL)
    fn(data)
    return data


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["critique_revision"][1].pop("revision"),
     r"x\.yaml: critique_revision\[1\] \(id 'weapons'\): missing 'revision'"),
    (lambda d: d.update(extra=1), r"x\.yaml: top level: unknown field 'extra'"),
    (lambda d: d["principles"][0].update(weight=2),
     r"principles\[0\] \(id 'safer'\): unknown field 'weight'"),
    (lambda d: d.update(principles=[]), r"top level: 'principles' is an empty list"),
    (lambda d: d.update(fewshot_preference=[]), r"'fewshot_preference' is an empty list"),
    (lambda d: d.pop("critique_revision"), r"top level: missing 'critique_revision'"),
    (lambda d: d["critique_revision"][0].update(critique=5),
     r"critique_revision\[0\] \(id 'danger'\): 'critique' must be a string, got int"),
    (lambda d: d["critique_revision"][0].update(critique="  "), r"'critique' is empty"),
    (lambda d: d["critique_revision"][0].update(tags="general"), r"'tags' must be a list"),
    (lambda d: d["critique_revision"][1].update(id="danger"),
     r"critique_revision\[1\] \(id 'danger'\): duplicate id"),
    (lambda d: d.update(principles="be nice"), r"'principles' must be a list, got str"),
    (lambda d: d["principles"].__setitem__(1, "be nice"),
     r"principles\[1\]: expected a mapping, got str"),
    (lambda d: d["fewshot_critique_revision"][0].update(pair="nope"),
     r"fewshot_critique_revision\[0\] \(id 'ex1'\): 'pair' 'nope' is not a critique_revision"),
    (lambda d: d["fewshot_critique_revision"][0].update(kind="bad"), r"'kind' must be"),
    (lambda d: d["fewshot_critique_revision"][0]["conversation"].pop(),
     r"'conversation' must end with a turn of role 'assistant'"),
    (lambda d: d["fewshot_critique_revision"][0]["conversation"][0].update(role="assistant"),
     r"conversation\[0\]: role must be 'user'"),
    (lambda d: d["fewshot_preference"][0].update(answer="C"), r"'answer' must be 'A' or 'B'"),
    (lambda d: d["fewshot_preference"][0].update(principle="nope"),
     r"'principle' 'nope' is not a principles id"),
    (lambda d: d["principles"][0].update(tags=["kindness"]),
     r"x\.yaml: principles\[0\] \(id 'safer'\): 'tags' must be a non-empty list of harmlessness / helpfulness"),
    (lambda d: d["principles"][1].update(tags="helpfulness"), r"principles\[1\] \(id 'kinder'\): 'tags' must be"),
    (lambda d: d["principles"][1].update(tags=[]), r"principles\[1\] \(id 'kinder'\): 'tags' must be"),
    (lambda d: d["principles"][0].update(tags=["helpfulness", "helpfulness"]),
     r"principles\[0\] \(id 'safer'\): 'tags' repeats an aspect"),
])
def test_yaml_validation_errors(tmp_path, mutate, message):
    path = _write_yaml(tmp_path, _mutated(mutate))
    with pytest.raises(InputError, match=message) as err:
        load_constitution(path)
    assert str(err.value).startswith(str(path))


def test_yaml_syntax_and_empty(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("critique_revision: [\n")
    with pytest.raises(InputError, match="bad.yaml: not valid YAML"):
        load_constitution(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="empty.yaml: empty file"):
        load_constitution(empty)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "unsafe.yaml"
    path.write_text("critique_revision: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_constitution(path)


def _open_recipe():
    return json.loads((FIX / "open_recipe.json").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["constitutions"][1].pop("revision"), r"constitutions\[1\]: missing 'revision'"),
    (lambda d: d["constitutions"][0].update(weight=1), r"constitutions\[0\]: unknown field"),
    (lambda d: d.update(constitutions=[]), r"top level: 'constitutions' is an empty list"),
    (lambda d: d.update(system_chat=[]), r"top level: 'system_chat' is an empty list"),
    (lambda d: d.update(version=2), r"top level: unknown field 'version'"),
    (lambda d: d["system_chat"][0].pop(),
     r"system_chat\[0\]: 'transcript' must end with a turn of role 'assistant'"),
    (lambda d: d["system_chat"][1].__delitem__(slice(0, 2)),
     r"system_chat\[1\]: needs a conversation and then four turns"),
    (lambda d: d["system_chat"][0][2].update(role="system"), r"system_chat\[0\]: transcript\[2\]"),
    (lambda d: d["constitutions"][0].update(critic=["a"]),
     r"constitutions\[0\]: 'critic' must be a string"),
])
def test_open_recipe_validation_errors(tmp_path, mutate, message):
    data = _open_recipe()
    mutate(data)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=rf"recipe\.json: {message}"):
        load_constitution(path)


def _paper_copy(tmp_path):
    folder = tmp_path / "paper"
    shutil.copytree(FIX / "paper", folder)
    return folder


@pytest.mark.parametrize("name, content, message", [
    ("CritiqueRevisionInstructions.json", {"harmful0": {"prompt": ["x"]}},
     r"CritiqueRevisionInstructions\.json: 'harmful0': missing 'edit_request'"),
    ("CritiqueRevisionInstructions.json", {"h": {"prompt": [], "edit_request": "y"}},
     r"'h': 'prompt' is an empty list"),
    ("CritiqueRevisionInstructions.json", {"h": {"prompt": ["CritiqueRequest:"],
                                                 "edit_request": "y"}},
     r"'h': request is empty"),
    ("CritiqueRevisionInstructions.json", [], r"expected a non-empty mapping"),
    ("RLMadisonInstructions.json", [], r"RLMadisonInstructions\.json: top level: 'principles' is"),
    ("RLMadisonInstructions.json", ["ok?", 3], r"\[1\]: 'principle' must be a string"),
    ("CritiqueRevisionFewShotPrompts.json",
     ["Human: hi\n\nAssistant: yo\n\nCritiqueRequest: r\n\nCritique: c"],
     r"CritiqueRevisionFewShotPrompts\.json: \[0\]: missing 'RevisionRequest:'"),
    ("CritiqueRevisionFewShotPrompts.json",
     ["Human: hi\n\nCritiqueRequest: r\n\nCritique: c\n\nRevisionRequest: q\n\nRevision: v"],
     r"\[0\]: the conversation must end with an Assistant turn"),
    ("CritiqueRevisionFewShotPrompts.json", ["preamble Human: hi"], r"\[0\]: text before"),
    ("RLMadisonFewShotPrompts.json", [{"prompt": "Human: hi\n\nAssistant:", "corrects": ["a"]}],
     r"RLMadisonFewShotPrompts\.json: \[0\]: missing 'incorrects'"),
    ("RLMadisonFewShotPrompts.json",
     [{"prompt": "Human: hi\n\nAssistant:", "corrects": [], "incorrects": ["b"]}],
     r"\[0\]: 'corrects' is an empty list"),
])
def test_paper_validation_errors(tmp_path, name, content, message):
    folder = _paper_copy(tmp_path)
    (folder / name).write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        load_constitution(folder)


def test_bad_json_and_unknown_paths(tmp_path):
    folder = _paper_copy(tmp_path)
    (folder / "RLMadisonInstructions.json").write_text("[1,")
    with pytest.raises(InputError, match=r"RLMadisonInstructions\.json: not valid JSON"):
        load_constitution(folder)
    with pytest.raises(InputError, match="not a built-in constitution"):
        load_constitution("no-such-constitution")
    txt = tmp_path / "c.txt"
    txt.write_text("hi")
    with pytest.raises(InputError, match="unknown constitution format"):
        load_constitution(txt)


# ---------------------------------------------------------------- the command

def _parser():
    parser = argparse.ArgumentParser(prog="cai")
    sub = parser.add_subparsers(dest="command")
    constitution_cmd.register(sub)
    return parser


def test_show_json_prints_exactly_the_counts(capsys):
    args = _parser().parse_args(["constitution", "show", str(FIX / "paper"), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out) == {
        "critique_revision_pairs": 4, "preference_principles": 3,
        "fewshot_critique_revision": 3, "fewshot_preference": 3}


def test_show_summary_and_validate(capsys):
    args = _parser().parse_args(["constitution", "show", "default"])
    args.func(args)
    out = capsys.readouterr().out
    assert "critique/revision pairs: 18" in out and "weapons" in out
    args = _parser().parse_args(["constitution", "validate", str(FIX / "open_recipe.json")])
    assert args.func(args) == 0
    assert "ok (2 critique revision pairs, 0 preference principles" in capsys.readouterr().out


def test_cli_prints_the_error_and_returns_2(tmp_path, capsys):
    cli = pytest.importorskip("cai.cli")
    try:
        cli.build_parser()
    except ImportError:  # another stage's module not there yet
        pytest.skip("cai.cli cannot assemble its sub-commands yet")
    path = _write_yaml(tmp_path, _mutated(lambda d: d["critique_revision"][1].pop("revision")))
    assert cli.main(["constitution", "validate", str(path)]) == 2
    assert "critique_revision[1] (id 'weapons'): missing 'revision'" in capsys.readouterr().err
