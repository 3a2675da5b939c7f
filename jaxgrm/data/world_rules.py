"""The business criteria of the synthetic relevance world, and facts that make a given rule fire.

Each domain has an ordered list of (rule, grade); the first rule that applies to a note decides
its grade. A rule's `op` says what its step3 bound claims: "=" for rules that settle the grade
(spam, ad-banned, off-topic, other-subject, full-match), "<=" for defects that cap it
(passing-mention, ad-capped, constraint-violated, constraint-missing, format-mismatch). In this
world the cap is always reached, so the bound's number is the grade.
"""

from __future__ import annotations

import dataclasses
import random

from jaxgrm.data.world_text import Facts, Query
from jaxgrm.data.world_vocab import COMPATIBLE, FORMATS


@dataclasses.dataclass(frozen=True)
class Rule:
    """A criterion: `op` is "=" (settles the grade) or "<=" (a defect that caps it)."""

    name: str
    op: str
    text: str


RULES = {
    r.name: r
    for r in (
        Rule("spam", "=", "keyword stuffing, scams or fake giveaways"),
        Rule("ad-banned", "=", "any ad or sponsored post, whatever its subject"),
        Rule("off-topic", "=", "about a subject of another domain; the query subject not named"),
        Rule("other-subject", "=", "about another {domain} subject; the query subject not named"),
        Rule("passing-mention", "<=", "names the query subject only in passing, is about another"),
        Rule("ad-capped", "<=", "an ad or sponsored post"),
        Rule("constraint-violated", "<=", "contradicts a constraint of the query"),
        Rule("constraint-missing", "<=", "leaves a constraint of the query unaddressed"),
        Rule(
            "format-mismatch",
            "<=",
            "its format does not serve the intent ("
            + "; ".join(f"{i}: {', '.join(f)}" for i, f in COMPATIBLE.items())
            + ")",
        ),
        Rule("full-match", "=", "none of the rules above applies"),
    )
}
# Ordered (rule, grade) per domain; the first rule that applies decides.
DOMAIN_CRITERIA: dict[str, tuple[tuple[str, int], ...]] = {
    "food": (
        ("spam", -1), ("off-topic", 0), ("other-subject", 1), ("passing-mention", 1),
        ("ad-capped", 1), ("constraint-violated", 2), ("constraint-missing", 2),
        ("full-match", 3),
    ),
    "travel": (
        ("spam", -1), ("off-topic", 0), ("other-subject", 1), ("passing-mention", 1),
        ("constraint-violated", 1), ("constraint-missing", 2), ("format-mismatch", 2),
        ("full-match", 3),
    ),
    "beauty": (
        ("spam", -1), ("ad-banned", -1), ("off-topic", 0), ("other-subject", 0),
        ("passing-mention", 1), ("constraint-violated", 1), ("constraint-missing", 2),
        ("format-mismatch", 2), ("full-match", 3),
    ),
    "home": (
        ("spam", -1), ("off-topic", 0), ("other-subject", 1), ("passing-mention", 1),
        ("ad-capped", 1), ("constraint-violated", 2), ("format-mismatch", 2), ("full-match", 3),
    ),
    "fitness": (
        ("spam", -1), ("ad-banned", -1), ("off-topic", 0), ("other-subject", 1),
        ("passing-mention", 0), ("constraint-violated", 2), ("constraint-missing", 2),
        ("format-mismatch", 1), ("full-match", 3),
    ),
}  # fmt: skip


def bound(domain: str, rule: str) -> str:
    """The step3 bound of `rule` in `domain`, e.g. "= 0" or "<= 2"."""
    return f"{RULES[rule].op} {dict(DOMAIN_CRITERIA[domain])[rule]}"


def criteria_lines(domain: str) -> list[str]:
    """The criteria block of `domain`: one line per rule, in the order they are applied."""
    return [
        f"{name}: {RULES[name].text.format(domain=domain)}; bound {bound(domain, name)}"
        for name, _ in DOMAIN_CRITERIA[domain]
    ]


def _fires(rule: str, facts: Facts, intent: str) -> bool:
    if rule == "spam":
        return facts.spam
    if rule in ("ad-banned", "ad-capped"):
        return facts.format == "ad"
    if rule in ("off-topic", "other-subject", "passing-mention"):
        return facts.relation == {"off-topic": "other-domain", "passing-mention": "mention"}.get(
            rule, rule
        )
    if rule == "constraint-violated":
        return "violated" in facts.status.values()
    if rule == "constraint-missing":
        return "missing" in facts.status.values()
    if rule == "format-mismatch":
        return facts.format not in COMPATIBLE[intent]
    return rule == "full-match"


def apply_criteria(domain: str, facts: Facts, intent: str) -> tuple[str, int]:
    """(rule, grade) of the first rule of `domain` that applies to `facts`."""
    for rule, grade in DOMAIN_CRITERIA[domain]:
        if _fires(rule, facts, intent):
            return rule, grade
    raise AssertionError("full-match always applies")


def _set(rule: str, facts: Facts, rng: random.Random, query: Query, domain_has_ad: bool):
    """Make `rule` apply to `facts` (moving only what it needs)."""
    words = list(query.constraints)
    if rule == "spam":
        facts.spam, facts.relation, facts.format = True, "same", "ad"
    elif rule in ("ad-banned", "ad-capped"):
        facts.format = "ad"
    elif rule in ("off-topic", "other-subject", "passing-mention"):
        facts.relation = {"off-topic": "other-domain", "passing-mention": "mention"}.get(rule, rule)
    elif rule == "constraint-violated":
        for w in rng.sample(words, rng.randint(1, len(words))):
            facts.status[w] = "violated"
    elif rule == "constraint-missing":
        facts.status[rng.choice(words)] = "missing"
    elif rule == "format-mismatch":
        bad = [f for f in FORMATS if f not in COMPATIBLE[query.intent]]
        facts.format = rng.choice([f for f in bad if f != "ad"] if domain_has_ad else bad)


def _unset(rule: str, facts: Facts, rng: random.Random, query: Query, domain_has_ad: bool):
    """Make `rule` not apply to `facts`, moving towards a clean note."""
    if rule == "spam":
        facts.spam = False
    elif rule in ("ad-banned", "ad-capped") and facts.format == "ad":
        facts.format = rng.choice(FORMATS[:-1])
    elif rule in ("off-topic", "other-subject", "passing-mention") and _fires(
        rule, facts, query.intent
    ):
        facts.relation = "same"
    elif rule == "constraint-violated":
        for w, s in facts.status.items():
            if s == "violated":
                facts.status[w] = rng.choice(("met", "missing"))
    elif rule == "constraint-missing":
        facts.status = {w: "met" if s == "missing" else s for w, s in facts.status.items()}
    elif rule == "format-mismatch" and _fires(rule, facts, query.intent):
        good = COMPATIBLE[query.intent]
        facts.format = rng.choice([f for f in good if f != "ad"] if domain_has_ad else good)


def feasible(rule: str, query: Query) -> bool:
    return not (rule.startswith("constraint-") and not query.constraints)


def sample_facts(rng: random.Random, query: Query, rule: str) -> Facts:
    """Random facts for which `rule` is the first rule of the query's domain that applies."""
    order = [r for r, _ in DOMAIN_CRITERIA[query.domain]]
    has_ad = "ad-banned" in order or "ad-capped" in order
    for _ in range(100):
        facts = Facts(
            spam=False,
            relation=rng.choices(
                ("same", "mention", "other-subject", "other-domain"), (6, 1, 2, 2)
            )[0],
            format=rng.choice(FORMATS) if rng.random() < 0.6 else rng.choice(FORMATS[:-1]),
            status={
                w: rng.choices(("met", "missing", "violated"), (11, 5, 4))[0]
                for w in query.constraints
            },
        )
        for earlier in order[: order.index(rule)]:
            _unset(earlier, facts, rng, query, has_ad)
        _set(rule, facts, rng, query, has_ad)
        if apply_criteria(query.domain, facts, query.intent)[0] == rule:
            return facts
    raise RuntimeError(f"could not make {rule} fire for {query}")
