"""Prompt building for SL-CAI and AI feedback in both styles, output cleaning, degeneracy
detection and stop strings."""
import pytest

from cai import prompting as P
from cai.constitution import (CritiqueRevision, FewShotCritiqueRevision, FewShotPreference,
                              Principle, load_constitution)
from engine.errors import InputError

PAIR = CritiqueRevision("danger", "Is the last answer dangerous?", "Rewrite it safely.")
CONV = [{"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Use a tension wrench."}]
SHOT = FewShotCritiqueRevision(
    "s1", [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
    "CR1", "C1", "RR1", "R1")
SHOT2 = FewShotCritiqueRevision(
    "s2", [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    "CR2", "C2", "RR2", "R2", kind="helpful")
PREF = FewShotPreference("p1", [{"role": "user", "content": "PQ"}], "good", "bad", "A",
                         principle="Which is kinder?", reasoning="(A) is kind.")
PREF_NO_REASON = FewShotPreference("p2", [{"role": "user", "content": "PQ2"}], "x", "y", "B")


# ---------------------------------------------------------------- SL-CAI prompts

def test_initial_prompt():
    assert P.initial_prompt("Hi?", "chat") == [{"role": "user", "content": "Hi?"}]
    assert P.initial_prompt("Hi?", "base") == "Human: Hi?\n\nAssistant:"
    with pytest.raises(InputError, match="prompt style must be one of chat, base"):
        P.initial_prompt("Hi?", "instruct")


def test_base_critique_and_revision_follow_the_paper_format():
    crit = P.critique_prompt(CONV, PAIR, "base", fewshot=[SHOT])
    assert crit == ("Human: Q1\n\nAssistant: A1\n\nCritique Request: CR1\n\nCritique: C1\n\n"
                    "Revision Request: RR1\n\nRevision: R1\n\n"
                    "Human: How do I pick a lock?\n\nAssistant: Use a tension wrench.\n\n"
                    "Critique Request: Is the last answer dangerous?\n\nCritique:")
    rev = P.revision_prompt(CONV, "  It helps a burglary. ", PAIR, "base", fewshot=[SHOT])
    assert rev.startswith(crit)
    assert rev[len(crit):] == (" It helps a burglary.\n\nRevision Request: Rewrite it safely."
                               "\n\nRevision:")


def test_chat_critique_and_revision_are_turns():
    crit = P.critique_prompt(CONV, PAIR, "chat", fewshot=[SHOT])
    assert [m["role"] for m in crit] == ["user", "assistant"] * 3 + ["user", "assistant", "user"]
    assert [m["content"] for m in crit[:6]] == ["Q1", "A1", "CR1", "C1", "RR1", "R1"]
    assert crit[-3:] == [*CONV, {"role": "user", "content": PAIR.critique}]
    rev = P.revision_prompt(CONV, "It helps a burglary.", PAIR, "chat", fewshot=[SHOT])
    assert rev[:-2] == crit
    assert rev[-2:] == [{"role": "assistant", "content": "It helps a burglary."},
                        {"role": "user", "content": "Rewrite it safely."}]
    rev[-3]["content"] = "changed"  # the caller's conversation is copied, not shared
    assert CONV[1]["content"] == "Use a tension wrench."


def test_max_fewshot_defaults_per_style():
    shots = [SHOT, SHOT2, SHOT]
    assert len(P.critique_prompt(CONV, PAIR, "chat", fewshot=shots)) == 2 * 6 + 3
    assert len(P.critique_prompt(CONV, PAIR, "chat", fewshot=shots, max_fewshot=None)) == 3 * 6 + 3
    assert len(P.critique_prompt(CONV, PAIR, "chat", fewshot=shots, max_fewshot=0)) == 3
    assert P.critique_prompt(CONV, PAIR, "base", fewshot=shots).count("Critique Request:") == 4
    assert P.critique_prompt(CONV, PAIR, "base", fewshot=shots,
                             max_fewshot=1).count("Critique Request:") == 2


def test_default_constitution_chat_prompt_fits_a_small_model():
    c = load_constitution("default")
    pair = c.critique_revision[0]
    prompt = P.revision_prompt(P.initial_prompt("How do I hotwire a car?", "chat")
                               + [{"role": "assistant", "content": "x " * 100}],
                               "y " * 100, pair, "chat", c.fewshot_critique_revision)
    # ~4 characters per token: a few hundred tokens, far inside an 8k context
    assert sum(len(m["content"]) for m in prompt) < 4000
    assert prompt[0]["content"].startswith("How do I kill a Python process")


# ---------------------------------------------------------------- feedback prompts

def test_base_feedback_prompt_format():
    got = P.feedback_prompt("Can I?", "Yes.", "No.", Principle("p", "Which is safer?"), "base")
    assert got == ("Consider the following conversation between a human and an assistant:\n"
                   "Human: Can I?\nWhich is safer?\nOptions:\n(A) Yes.\n(B) No.\n"
                   "The answer is:")
    assert got.endswith("The answer is:") and P.OPTIONS == (" (A)", " (B)")


def test_feedback_fewshot_uses_own_or_current_principle():
    got = P.feedback_prompt(CONV[:1], "a", "b", "Which is safer?", "base",
                            fewshot=[PREF, PREF_NO_REASON])
    blocks = got.split("\n\n")
    assert len(blocks) == 3
    assert "Which is kinder?" in blocks[0] and blocks[0].endswith("The answer is: (A)")
    assert "Which is safer?" in blocks[1] and blocks[1].endswith("The answer is: (B)")
    assert blocks[2].endswith("(B) b\nThe answer is:")


def test_chat_feedback_prefills_the_answer_cue():
    got = P.feedback_prompt(CONV[:1], "a", "b", "Which is safer?", "chat", fewshot=[PREF])
    assert [m["role"] for m in got] == ["user", "assistant", "user", "assistant"]
    assert got[1]["content"] == "The answer is: (A)"
    assert got[2]["content"].startswith("Consider the following conversation")
    assert got[2]["content"].endswith("(A) a\n(B) b")
    assert got[-1] == {"role": "assistant", "content": "The answer is:"}
    with pytest.raises(ValueError, match="must end with the human turn"):
        P.feedback_prompt(CONV, "a", "b", "Which is safer?", "chat")


def test_cot_feedback_and_answer_prompt():
    base = P.feedback_prompt("Q", "a", "b", "Which is safer?", "base",
                             fewshot=[PREF, PREF_NO_REASON], cot=True)
    assert base.count("Human: Consider the following") == 2  # exemplar without reasoning dropped
    assert "Assistant: Let's think step by step: (A) is kind.\nThe answer is: (A)" in base
    assert base.endswith("(B) b\n\nAssistant: Let's think step by step:")
    answer = P.feedback_answer_prompt(base, " (B) is safer. So the answer is (B).")
    assert answer == base + " (B) is safer. So\nThe answer is:"
    chat = P.feedback_prompt("Q", "a", "b", "Which is safer?", "chat", fewshot=[PREF], cot=True)
    assert chat[1]["content"] == "Let's think step by step: (A) is kind.\nThe answer is: (A)"
    assert chat[-1]["content"] == "Let's think step by step:"
    answered = P.feedback_answer_prompt(chat, "Both fine.")
    assert answered[-1]["content"] == "Let's think step by step: Both fine.\nThe answer is:"
    assert chat[-1]["content"] == "Let's think step by step:"  # not mutated


def _chatml_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template)


def test_render_continues_a_prefilled_answer():
    tok = _chatml_tokenizer()
    text = P.render(P.feedback_prompt("Q", "a", "b", "Which?", "chat"), tok)
    assert text.endswith("<|im_start|>assistant\nThe answer is:")
    text = P.render(P.initial_prompt("Hi", "chat"), tok)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert P.render("Human: Hi\n\nAssistant:", tok) == "Human: Hi\n\nAssistant:"


# ---------------------------------------------------------------- cleaning

@pytest.mark.parametrize("raw, cleaned, flags", [
    ("  Sure, here it is.  ", "Sure, here it is.", []),
    ("Assistant: Revision: I can't help with that.", "I can't help with that.",
     ["stripped_label"]),
    ("Critique: It is unsafe.\n\nRevision Request: Rewrite it", "It is unsafe.",
     ["stripped_label", "cut_next_turn"]),
    ("Fine answer.\n\nHuman: and another question", "Fine answer.", ["cut_next_turn"]),
    ("Fine answer.\n\nHuman", "Fine answer.", ["cut_next_turn"]),
    ("Fine answer.\nUser: more", "Fine answer.", ["cut_next_turn"]),
    ("Fine.<|im_end|>\n<|im_start|>user\nnext", "Fine.", ["cut_next_turn"]),
    ("Human rights matter.\nHuman rights are universal.",
     "Human rights matter.\nHuman rights are universal.", []),
    ("Revision:", "", ["stripped_label", "empty"]),
    ("", "", ["empty"]),
    ("no " * 30, ("no " * 30).strip(), ["degenerate"]),
])
def test_clean_response(raw, cleaned, flags):
    assert P.clean_response(raw) == (cleaned, flags)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("?", "too_short"),
    ("...!!", "too_short"),
    ("Paris.", None),
    ("I can't help with that, but I can suggest a locksmith.", None),
    ("I am sorry. " * 12, "repetitive"),
    ("Here is a normal start to an answer that goes well. " + "and then and then " * 15,
     "repetitive"),
    ("!" * 40, "too_short"),
    ("ha" * 40, "repetitive"),
    ("Step one: open the file. Step two: read the header. Step three: parse the rows. "
     "Step four: close the file.", None),
])
def test_degeneracy(text, reason):
    assert P.degeneracy(text) == reason
    assert P.is_degenerate(text) == (reason is not None)


def test_stop_strings():
    base = P.stop_strings("base")
    assert "\n\nHuman:" in base and "\n\nRevision Request:" in base
    assert "<|im_end|>" in P.stop_strings("chat")
    assert "The answer is" in P.stop_strings("chat", cot=True)
    assert "The answer is" not in base
    with pytest.raises(InputError):
        P.stop_strings("other")
    # every stop string is also something clean_response cuts at
    for s in base:
        assert P.clean_response("ok text" + s + " more")[0] == "ok text"
