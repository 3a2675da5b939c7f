"""Criteria-augmented prompts and step-tagged traces (method.md, OURS).

A trace is

    <step1> prose => subject: ...; constraints: ...; intent: ... </step1>
    <step2> prose => subject: ...; covers: ...; format: ... </step2>
    <step3> prose => rule: ...; bound: ... </step3>
    <answer> grade </answer>

(one line, no newlines between steps); the conclusion keys are those of
`jaxgrm.data.schema.STEP_KEYS`, in that order, each present only when known.
"""

from __future__ import annotations

from collections.abc import Mapping

from jaxgrm.data.schema import CONCLUSION_MARK, LIST_KEYS, STEP_KEYS, STEP_NAMES


def format_value(key: str, value) -> str:
    """A conclusion value as text: lists comma-separated (`none` when empty)."""
    if key in LIST_KEYS:
        items = [value] if isinstance(value, str) else list(value)
        items = [str(i).strip() for i in items if str(i).strip() and str(i).strip() != "none"]
        return ", ".join(items) if items else "none"
    return str(value).strip()


def format_conclusion(step: str, values: Mapping[str, object]) -> str:
    """`key: value; key: value` in the order of STEP_KEYS[step]; unknown keys are an error."""
    unknown = set(values) - set(STEP_KEYS[step])
    if unknown:
        raise ValueError(f"{step}: unknown conclusion keys {sorted(unknown)}")
    return "; ".join(f"{k}: {format_value(k, values[k])}" for k in STEP_KEYS[step] if k in values)


def format_trace(
    steps: Mapping[str, Mapping[str, object]],
    grade: int | str,
    prose: Mapping[str, str] | None = None,
) -> str:
    """The response text for step conclusions `steps`, optional prose per step, and a grade."""
    parts = []
    for name in STEP_NAMES:
        text = (prose or {}).get(name, "").strip()
        conclusion = format_conclusion(name, steps.get(name, {}))
        body = (
            f"{text} {CONCLUSION_MARK} {conclusion}" if text else f"{CONCLUSION_MARK} {conclusion}"
        )
        parts.append(f"<{name}> {body} </{name}>")
    parts.append(f"<answer> {grade} </answer>")
    return "".join(parts)
