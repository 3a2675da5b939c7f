"""Outcome reward and rule-based step verifiers (method.md: SAM, step verifiers; OURS).

`outcome_reward` is exact match of the parsed grade with the human label. `verify_steps` gives
each reasoning step a `Verdict`:

- With recorded truth for a step (`example.steps[step]`, the synthetic world): every key of the
  truth must be claimed with an equal value: lists compared as sets, text case- and
  whitespace-insensitively (after NFKC), bounds as (operator, grade). Claimed keys the truth does
  not record are ignored. CORRECT or WRONG, never UNVERIFIABLE.
- Without truth (real data), only what the text and the grade can check:
    step1  the claimed subject and constraints must be made of query words (for CJK text, query
           characters): CORRECT / WRONG; nothing claimed -> UNVERIFIABLE. Intent is not checked.
    step2  `present` / `absent` claims: each term must occur in the query (it is a query term) and
           occur / not occur in the document (title + full text, case-insensitive substring, so
           Chinese terms match as character substrings). All true -> CORRECT, any false -> WRONG,
           no claims -> UNVERIFIABLE.
    step3  `bound` (`<= g`, `< g`, `= g`, `> g`, `>= g`) against the human label: CORRECT / WRONG;
           unparseable -> WRONG; not claimed -> UNVERIFIABLE. The rule name is not checked.
- In both cases a step that is missing or malformed (block not OK, or no parsable conclusion) is
  WRONG: the format asks for every step, and a trace that skips one is not a faithful one.

Verdict codes are ints (CORRECT 1, WRONG 0, UNVERIFIABLE -1) so that `c_ik` of SAM is the code
where the code is >= 0. Verify reasoning traces only: a label-only trace has every step WRONG.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxgrm.data.schema import LIST_KEYS, STEP_NAMES, RelevanceExample
from jaxgrm.prompts import BlockStatus, ParsedTrace


class Verdict(enum.IntEnum):
    CORRECT = 1
    WRONG = 0
    UNVERIFIABLE = -1


def outcome_reward(parsed: ParsedTrace, example: RelevanceExample) -> float:
    """1.0 if the parsed grade equals the label, else 0.0 (a missing or malformed answer: 0)."""
    return 1.0 if parsed.grade is not None and parsed.grade == example.label else 0.0


# ---- grade bounds (the `bound` syntax of step3) ------------------------------------------------
_BOUND_RE = re.compile(r"(<=|>=|=|<|>)\s*([+-]?[0-9]+)", re.ASCII)
_BOUND_OPS: dict[str, Callable[[int, int], bool]] = {
    "<=": lambda g, v: g <= v,
    ">=": lambda g, v: g >= v,
    "=": lambda g, v: g == v,
    "<": lambda g, v: g < v,
    ">": lambda g, v: g > v,
}


def parse_bound(text: str) -> tuple[str, int] | None:
    """`'<= 1'` -> ('<=', 1). Operators <, <=, =, >=, >; an integer grade. None if unparseable."""
    m = _BOUND_RE.fullmatch(str(text).strip())
    return (m.group(1), int(m.group(2))) if m else None


def bound_holds(bound: tuple[str, int], grade: int) -> bool:
    op, value = bound
    return _BOUND_OPS[op](grade, value)


# ---- value normalisation --------------------------------------------------------------------
def normalize(text: object) -> str:
    """NFKC, case-folded, whitespace collapsed and stripped."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def normalize_list(value: object) -> frozenset[str]:
    """A list value (comma-separated text or a sequence) as a set; `none` and blanks dropped."""
    items = (
        re.split(r"[,、]", normalize(value)) if isinstance(value, str) else map(normalize, value)
    )
    return frozenset(i for i in (normalize(x) for x in items) if i and i != "none")


def _same(key: str, claimed: str, truth: object) -> bool:
    if key in LIST_KEYS:
        return normalize_list(claimed) == normalize_list(truth)
    if key == "bound":
        a, b = parse_bound(normalize(claimed)), parse_bound(normalize(truth))
        if a is not None and b is not None:
            return a == b
    return normalize(claimed) == normalize(truth)


# ---- text checks ----------------------------------------------------------------------------
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_UNIT_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def _units(term: str) -> list[str]:
    """Words of a term, and each CJK character on its own (CJK text has no spaces)."""
    return _UNIT_RE.findall(normalize(term))


def made_of(term: str, text: str) -> bool:
    """Every word (or CJK character) of `term` occurs in `text` (case-insensitive substring)."""
    text = normalize(text)
    return all(u in text for u in _units(term))


def contains(text: str, term: str) -> bool:
    """`term` occurs in `text`, case-insensitively, whitespace collapsed (a substring match)."""
    return normalize(term) in normalize(text)


def _doc_text(example: RelevanceExample) -> str:
    return f"{example.doc_title}\n{example.doc}"


def _check_step1(claims: Mapping[str, str], example: RelevanceExample) -> Verdict:
    terms = [claims["subject"]] if claims.get("subject", "").strip() else []
    terms += sorted(normalize_list(claims.get("constraints", "none")))
    terms = [t for t in terms if _units(t)]
    if not terms:
        return Verdict.UNVERIFIABLE
    ok = all(made_of(t, example.query) for t in terms)
    return Verdict.CORRECT if ok else Verdict.WRONG


def _check_step2(claims: Mapping[str, str], example: RelevanceExample) -> Verdict:
    doc = _doc_text(example)
    checks = [
        made_of(term, example.query) and contains(doc, term) == (key == "present")
        for key in ("present", "absent")
        for term in sorted(normalize_list(claims.get(key, "none")))
    ]
    if not checks:
        return Verdict.UNVERIFIABLE
    return Verdict.CORRECT if all(checks) else Verdict.WRONG


def _check_step3(claims: Mapping[str, str], example: RelevanceExample) -> Verdict:
    if "bound" not in claims:
        return Verdict.UNVERIFIABLE
    bound = parse_bound(normalize(claims["bound"]))
    if bound is None:
        return Verdict.WRONG
    return Verdict.CORRECT if bound_holds(bound, example.label) else Verdict.WRONG


_REAL_CHECKS = {"step1": _check_step1, "step2": _check_step2, "step3": _check_step3}


def verify_step(parsed: ParsedTrace, example: RelevanceExample, step: str) -> Verdict:
    """The verdict on one step of a parsed trace (rules in the module docstring)."""
    claims = parsed.conclusions.get(step)
    if parsed.status.get(step) is not BlockStatus.OK or claims is None:
        return Verdict.WRONG
    truth = (example.steps or {}).get(step)
    if truth:
        ok = all(k in claims and _same(k, claims[k], v) for k, v in truth.items())
        return Verdict.CORRECT if ok else Verdict.WRONG
    return _REAL_CHECKS[step](claims, example)


def verify_steps(parsed: ParsedTrace, example: RelevanceExample) -> dict[str, Verdict]:
    """{step name: Verdict} for every step of STEP_NAMES."""
    return {step: verify_step(parsed, example, step) for step in STEP_NAMES}


# ---- batches --------------------------------------------------------------------------------
def score_batch(
    parsed: Sequence[ParsedTrace], examples: Sequence[RelevanceExample]
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards_B float32, verdicts_BP int8) for B traces and their examples (repeat each
    example G times for G traces per prompt). Verdict codes: 1 correct, 0 wrong, -1 unverifiable;
    columns in STEP_NAMES order."""
    if len(parsed) != len(examples):
        raise ValueError(f"{len(parsed)} traces but {len(examples)} examples")
    rewards_B = np.zeros(len(parsed), np.float32)
    verdicts_BP = np.full((len(parsed), len(STEP_NAMES)), int(Verdict.UNVERIFIABLE), np.int8)
    for b, (p, ex) in enumerate(zip(parsed, examples, strict=True)):
        rewards_B[b] = outcome_reward(p, ex)
        verdicts_BP[b] = [int(v) for v in verify_steps(p, ex).values()]
    return rewards_B, verdicts_BP


def step_counts(verdicts_BP: np.ndarray) -> dict[str, np.ndarray]:
    """Sums to accumulate exactly over batches (add them, then call `step_accuracy`).

    traces: B. correct_P, verifiable_P: per step, traces with the step CORRECT / verifiable.
    all_right, any_verifiable: traces whose verifiable steps are all CORRECT (and at least one
    is verifiable) / traces with at least one verifiable step.
    """
    v = np.asarray(verdicts_BP)
    verifiable = v >= 0
    correct = v == int(Verdict.CORRECT)
    any_verifiable = verifiable.any(axis=1)
    all_right = any_verifiable & (correct == verifiable).all(axis=1)
    return {
        "traces": np.asarray(v.shape[0]),
        "correct_P": correct.sum(axis=0),
        "verifiable_P": verifiable.sum(axis=0),
        "all_right": np.asarray(all_right.sum()),
        "any_verifiable": np.asarray(any_verifiable.sum()),
    }


def step_accuracy(counts_or_verdicts: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, float]:
    """Per-step accuracy over verifiable steps (`step1/accuracy`, ...), the fraction of steps
    that were verifiable (`step1/verifiable`, of traces), and `all_steps_right` (of traces with
    a verifiable step). NaN where the denominator is 0. Takes verdicts_BP or `step_counts`."""
    c = counts_or_verdicts
    if not isinstance(c, Mapping):
        c = step_counts(c)

    def ratio(a, b) -> float:
        return float(a) / float(b) if b else float("nan")

    out = {}
    for k, name in enumerate(STEP_NAMES):
        out[f"{name}/accuracy"] = ratio(c["correct_P"][k], c["verifiable_P"][k])
        out[f"{name}/verifiable"] = ratio(c["verifiable_P"][k], c["traces"])
    out["all_steps_right"] = ratio(c["all_right"], c["any_verifiable"])
    return out
