"""Tests for jaxgrm.rewards: outcome reward and step verdicts on hand-written traces."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgrm.data.schema import SCALES, STEP_NAMES, RelevanceExample
from jaxgrm.prompts import DEFAULT_CRITERIA, format_trace, parse_text
from jaxgrm.rewards import (
    Verdict,
    bound_holds,
    normalize_list,
    outcome_reward,
    parse_bound,
    score_batch,
    step_accuracy,
    step_counts,
    verify_steps,
)
from jaxgrm.tokenizer import TAGS

C, W, U = Verdict.CORRECT, Verdict.WRONG, Verdict.UNVERIFIABLE
TRUTH = {
    "step1": {"subject": "Running Shoes", "constraints": ["cheap", "for women"], "intent": "buy"},
    "step2": {"subject": "running shoes", "covers": ["subject"], "format": "review"},
    "step3": {"rule": "unmet", "bound": "= 2"},
}


def world(**kw) -> RelevanceExample:
    base = dict(
        qid="w1",
        query="cheap running shoes for women",
        doc="Tried these running shoes for a month...",
        label=2,
        scale="xhs5",
        source="world",
        steps=TRUTH,
    )
    return RelevanceExample(**{**base, **kw})


def real(**kw) -> RelevanceExample:
    base = dict(
        qid="r1",
        query="angle bracket galvanized",
        doc="Simpson Strong-Tie 2 in. x 2 in. Angle Brackets, ZMAX finish",
        doc_title="Strong-Tie Bracket",
        label=2,
        scale="homedepot3",
        source="homedepot",
    )
    return RelevanceExample(**{**base, **kw})


def trace(s1: str = "", s2: str = "", s3: str = "", answer: str = "2") -> str:
    return f"<step1> q {s1} </step1><step2> d {s2} </step2><step3> c {s3} </step3>" + (
        f"<answer> {answer} </answer>"
    )


def verdicts(text: str, ex: RelevanceExample) -> tuple[Verdict, ...]:
    return tuple(verify_steps(parse_text(text, scale=ex.scale), ex).values())


# ---------------------------------------------------------------- outcome reward


@pytest.mark.parametrize(
    "text, reward",
    [
        (trace(answer="2"), 1.0),
        (trace(answer="3"), 0.0),
        (trace(answer="two"), 0.0),
        (trace(answer="2") + "<answer> 2 </answer>", 0.0),  # two answers: malformed
        ("<step1> q </step1>", 0.0),  # no answer
        ("<answer> 2 </answer>", 1.0),  # label-only
        ("", 0.0),
    ],
)
def test_outcome_reward(text, reward):
    assert outcome_reward(parse_text(text, scale="xhs5"), world()) == reward


# ---------------------------------------------------------------- world: truth recorded


def test_world_truth_trace_all_correct():
    text = format_trace(TRUTH, 2, {"step1": "prose"})
    assert verdicts(text, world()) == (C, C, C)


def test_world_normalisation_sets_and_case():
    text = trace(
        "=> subject:  RUNNING   shoes ; constraints: For Women, cheap; intent: Buy",
        "=> subject: running shoes; covers: subject; format: review; present: shoes",
        "=> rule: UNMET; bound: =2",
    )
    assert verdicts(text, world()) == (C, C, C)  # extra claimed keys (present) are ignored


S2_TRUE = "=> subject: running shoes; covers: subject; format: review"


@pytest.mark.parametrize(
    "s1, s2, s3, expected",
    [
        # wrong value, missing list item, missing key
        ("=> subject: shoes; constraints: cheap, for women; intent: buy", "", "", (W, W, W)),
        ("=> subject: running shoes; constraints: cheap; intent: buy", "", "", (W, W, W)),
        ("=> subject: running shoes; constraints: cheap, for women", "", "", (W, W, W)),
        # step2 right but step3 bound wrong / rule wrong
        ("", S2_TRUE, "=> rule: unmet; bound: <= 2", (W, C, W)),
        ("", "", "=> rule: all_met; bound: = 2", (W, W, W)),
        # no conclusion at all in a step with truth
        ("no mark", "", "=> rule: unmet; bound: = 2", (W, W, C)),
    ],
)
def test_world_wrong_claims(s1, s2, s3, expected):
    assert verdicts(trace(s1, s2, s3), world()) == expected


def test_world_missing_and_malformed_steps_are_wrong():
    ok1 = "<step1> => subject: running shoes; constraints: cheap, for women; intent: buy </step1>"
    ok3 = "<step3> => rule: unmet; bound: = 2 </step3>"
    missing2 = ok1 + ok3 + "<answer> 2 </answer>"
    assert verdicts(missing2, world()) == (C, W, C)
    unclosed2 = ok1 + "<step2> => subject: running shoes; covers: subject; format: review" + ok3
    assert verdicts(unclosed2, world()) == (C, W, C)
    dup_key = ok1 + "<step2> => subject: a; subject: running shoes </step2>" + ok3
    assert verdicts(dup_key, world()) == (C, W, C)


def test_partial_truth_falls_back_to_real_checks():
    ex = world(steps={"step2": TRUTH["step2"]})
    text = trace("=> subject: running shoes", "=> subject: boots", "=> bound: >= 2")
    assert verdicts(text, ex) == (C, W, C)  # step1, step3 checked from the text and the label


# ---------------------------------------------------------------- real data: no step truth


@pytest.mark.parametrize(
    "s1, verdict",
    [
        ("=> subject: angle bracket; constraints: galvanized; intent: buy", C),
        ("=> subject: Angle  Bracket", C),
        ("=> subject: angle bracket; constraints: stainless", W),  # not a query word
        ("=> subject: corner brace", W),
        ("=> intent: buy", U),  # intent is not checkable
        ("=> subject: angle bracket; constraints: none", C),
        ("=> constraints: none", U),
        ("=>", U),
        ("no conclusion", W),  # malformed: no `=>`
    ],
)
def test_real_step1(s1, verdict):
    assert verdicts(trace(s1=s1), real())[0] == verdict


@pytest.mark.parametrize(
    "s2, verdict",
    [
        ("=> present: angle bracket", C),  # substring of "Angle Brackets", case-insensitive
        ("=> present: bracket, ANGLE; absent: galvanized", C),
        ("=> absent: galvanized", C),
        ("=> present: galvanized", W),  # claimed present, is absent
        ("=> absent: bracket", W),  # claimed absent, is present (in the title too)
        ("=> present: angle; absent: bracket", W),  # one false claim spoils the step
        ("=> present: zmax", W),  # in the document, but not a query term
        ("=> present: none; absent: none", U),
        ("=> subject: brackets; covers: subject; format: listing", U),
        ("=> present: angle; absent: galvanized; subject: anything", C),
    ],
)
def test_real_step2(s2, verdict):
    assert verdicts(trace(s2=s2), real())[1] == verdict


def test_real_step2_title_and_chinese():
    ex = real(query="bracket only in title", doc="nothing here", doc_title="A Bracket")
    assert verdicts(trace(s2="=> present: bracket; absent: title"), ex)[1] == C
    zh = RelevanceExample(
        qid="k1",
        query="感冒吃什么药",
        doc="感冒了多喝热水，布洛芬可以退烧",
        doc_title="感冒的治疗",
        label=1,
        scale="kuake4",
        source="kuake",
    )
    assert verdicts(trace("=> subject: 感冒药", "=> present: 感冒; absent: 什么药"), zh)[:2] == (
        C,
        C,
    )
    assert verdicts(trace("=> subject: 头痛", "=> absent: 感冒"), zh)[:2] == (W, W)
    assert verdicts(trace(s2="=> present: 感冒、吃"), zh)[1] == W  # 吃 is not in the document


@pytest.mark.parametrize(
    "s3, label, verdict",
    [
        ("=> rule: partial; bound: <= 2", 2, C),
        ("=> bound: <= 2", 3, W),
        ("=> bound: < 2", 1, C),
        ("=> bound: < 2", 2, W),
        ("=> bound: = 1", 1, C),
        ("=> bound: =1", 3, W),
        ("=> bound: >= 2", 3, C),
        ("=> bound: >= 2", 1, W),
        ("=> bound: > 1", 2, C),
        ("=> bound: > 1", 1, W),
        ("=> bound: about two", 2, W),  # unparseable
        ("=> bound: ", 2, W),
        ("=> rule: full_match", 3, U),  # no bound claimed
    ],
)
def test_real_step3(s3, label, verdict):
    assert verdicts(trace(s3=s3), real(label=label))[2] == verdict


def test_real_missing_steps_are_wrong():
    assert verdicts("<answer> 2 </answer>", real()) == (W, W, W)
    assert verdicts("<step3> => bound: = 2 </step3><answer> 2 </answer>", real()) == (W, W, C)


# ---------------------------------------------------------------- bounds, criteria, normalisation


@pytest.mark.parametrize(
    "text, bound",
    [
        ("<= 1", ("<=", 1)),
        ("=3", ("=", 3)),
        (" >=  -1 ", (">=", -1)),
        ("< 2", ("<", 2)),
        ("> +0", (">", 0)),
        ("== 2", None),
        ("=> 2", None),
        ("<= 1.5", None),
        ("2", None),
        ("≤ 2", None),
        ("", None),
    ],
)
def test_parse_bound(text, bound):
    assert parse_bound(text) == bound


def test_default_criteria_bounds_parse_and_lie_on_the_scale():
    for scale, lines in DEFAULT_CRITERIA.items():
        grades = SCALES[scale].grades
        for line in lines:
            assert not any(tag in line for tag in TAGS)
            bound = parse_bound(line.rsplit("bound:", 1)[1])
            assert bound is not None, line
            assert any(bound_holds(bound, g) for g in grades), line
            assert not all(bound_holds(bound, g) for g in grades), line


def test_normalize_list():
    assert normalize_list("A,  b ,none, ,Ｃ") == {"a", "b", "c"}
    assert normalize_list(["X ", "none"]) == {"x"}
    assert normalize_list("none") == frozenset()


# ---------------------------------------------------------------- batches and summaries


def test_score_batch_and_step_accuracy():
    exs = [world(), world(), real(), real(label=3)]
    texts = [
        format_trace(TRUTH, 2),  # all right, reward 1
        trace("=> subject: x", "", "=> rule: unmet; bound: = 2", answer="3"),  # (W, W, C), 0
        trace("=> intent: buy", "=> absent: galvanized", "=> bound: <= 2"),  # (U, C, C), 1
        trace("=> intent: buy", "=> present: none", "=> rule: x", answer="x"),  # (U, U, U), 0
    ]
    parsed = [parse_text(t, scale=e.scale) for t, e in zip(texts, exs, strict=True)]
    rewards_B, verdicts_BP = score_batch(parsed, exs)
    assert rewards_B.dtype == np.float32 and verdicts_BP.dtype == np.int8
    np.testing.assert_array_equal(rewards_B, [1, 0, 1, 0])
    np.testing.assert_array_equal(verdicts_BP, [[1, 1, 1], [0, 0, 1], [-1, 1, 1], [-1, -1, -1]])
    acc = step_accuracy(verdicts_BP)
    # step1: 1 correct of 2 verifiable; step2: 2 of 3; step3: 3 of 3. Verifiable of 4 traces:
    # 2, 3, 3. All verifiable steps right: traces 0 and 2 of the 3 with any verifiable step.
    assert acc["step1/accuracy"] == 0.5 and acc["step2/accuracy"] == pytest.approx(2 / 3)
    assert acc["step3/accuracy"] == 1.0 and acc["step1/verifiable"] == 0.5
    assert acc["all_steps_right"] == pytest.approx(2 / 3)
    halves = [step_counts(verdicts_BP[:1]), step_counts(verdicts_BP[1:])]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert step_accuracy(summed) == acc  # exact under accumulation
    empty = step_accuracy(np.full((2, len(STEP_NAMES)), -1, np.int8))
    assert math.isnan(empty["step1/accuracy"]) and math.isnan(empty["all_steps_right"])
    with pytest.raises(ValueError):
        score_batch(parsed, exs[:2])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([*TAGS, "=>", ";", ":", ",", "present", "absent", "bound", "<=", "2"]),
            st.text(max_size=8),
        ),
        max_size=40,
    ),
    st.booleans(),
)
def test_fuzz_verify_never_raises(parts, with_truth):
    ex = world() if with_truth else real()
    p = parse_text("".join(parts), scale=ex.scale)
    v = verify_steps(p, ex)
    assert set(v) == set(STEP_NAMES) and all(isinstance(x, Verdict) for x in v.values())
    assert outcome_reward(p, ex) in (0.0, 1.0)
