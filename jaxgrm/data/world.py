"""The synthetic relevance world: generated queries and notes whose grade and step truth are known.

Grades follow domain-dependent business criteria (`DOMAIN_CRITERIA`): an ordered list of rules
per domain, the first rule that applies decides, and each rule carries the bound it implies.
Which rules a domain has, and the grade each gives, differ by domain (in beauty and fitness any ad
is -1, in food and home an ad is capped at 1, in travel an ad is judged like any note; in food a
format mismatch is tolerated, in home a constraint the note leaves open is), so a model must read
the prompt's criteria block (`meta["criteria"]`).

Generation picks the grade first, then a rule of the query's domain that gives it, then facts
that make exactly that rule fire first, then text. Step truth (schema.py contract):

    step1  subject, constraints (list), intent       -- words of the query
    step2  subject, covers (list), format           -- the note's main subject, the query
                                                        constraints it meets, its format
    step3  rule, bound                              -- the firing rule; bound `= g` for rules that
                                                        settle the grade, `<= g` for rules that
                                                        cap it (a defect); the grade is always g

So `rule_oracle` reads the grade off the recorded `bound`. Splits: train, validation, random (same
distribution) and longtail (held-out subjects, or pairs of constraint values kept out of every
other split); queries are disjoint across splits by (subject, constraints, intent).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Mapping

from jaxgrm.data.schema import RelevanceExample
from jaxgrm.data.world_rules import (
    DOMAIN_CRITERIA,
    RULES,
    apply_criteria,
    bound,
    criteria_lines,
    feasible,
    sample_facts,
)
from jaxgrm.data.world_text import Query, note_text, query_text, step_prose
from jaxgrm.data.world_vocab import ATTRIBUTES, DOMAINS, FORMATS, HEADS, INTENTS, PIECES, all_words
from jaxgrm.prompts import format_trace

__all__ = [
    "DOMAIN_CRITERIA",
    "GRADES",
    "RULES",
    "SPLITS",
    "WorldConfig",
    "apply_criteria",
    "criteria_lines",
    "format_stats",
    "generate",
    "make_inventory",
    "rule_oracle",
    "stats_report",
    "teacher_trace",
]

SPLITS = ("train", "validation", "random", "longtail")
GRADES = (-1, 0, 1, 2, 3)
SOURCE = "world"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the generated world; the same config gives the same examples.

    Sizes count query-note pairs. heldout_fraction: share of subject names kept for LONGTAIL.
    longtail_entity_share: share of LONGTAIL queries about held-out subjects (the rest use a rare
    pair of constraint values). rare_pair_fraction: share of constraint-value pairs kept out of
    non-LONGTAIL queries. grade_weights: target share of grades -1..3. teacher_propagation: chance
    that a wrong step1/step2 of the teacher also makes its step3 wrong. noise_rate: chance of each
    noise event in a note (emoji, typo in a filler sentence).
    """

    seed: int = 0
    train_size: int = 20000
    validation_size: int = 2000
    random_size: int = 2000
    longtail_size: int = 2000
    teacher_error_rate: float = 0.15
    teacher_propagation: float = 0.5
    num_names: int = 30
    subjects_per_domain: int = 40
    heldout_fraction: float = 0.2
    longtail_entity_share: float = 0.5
    rare_pair_fraction: float = 0.15
    notes_per_query: tuple[int, int] = (3, 7)
    constraint_weights: tuple[float, float, float] = (0.15, 0.5, 0.35)
    grade_weights: tuple[float, ...] = (0.14, 0.2, 0.24, 0.22, 0.2)
    filler_sentences: tuple[int, int] = (1, 3)
    extra_attributes: tuple[int, int] = (0, 2)
    noise_rate: float = 0.3

    def __post_init__(self):
        sizes = (self.train_size, self.validation_size, self.random_size, self.longtail_size)
        if min(sizes) < 1:
            raise ValueError(f"split sizes must be positive, got {sizes}")
        for name in ("teacher_error_rate", "teacher_propagation", "noise_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in ("heldout_fraction", "longtail_entity_share", "rare_pair_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1)")
        for name in ("notes_per_query", "filler_sentences", "extra_attributes"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max")
        if self.notes_per_query[0] < 1:
            raise ValueError("notes_per_query needs at least one note per query")
        if len(self.grade_weights) != len(GRADES) or min(self.grade_weights) <= 0:
            raise ValueError(f"grade_weights needs {len(GRADES)} positive weights")
        if len(self.constraint_weights) != 3 or min(self.constraint_weights) < 0:
            raise ValueError("constraint_weights: 3 non-negative weights (0, 1, 2 constraints)")
        if not 4 <= self.num_names <= len(PIECES) ** 2 // 2:
            raise ValueError(f"num_names must be in [4, {len(PIECES) ** 2 // 2}]")
        if self.subjects_per_domain < 4:
            raise ValueError("subjects_per_domain must be at least 4")

    @classmethod
    def small(cls, seed: int = 0) -> WorldConfig:
        """A small world for tests and quick looks (the same rules, fewer pairs)."""
        return cls(
            seed=seed, train_size=3000, validation_size=300, random_size=600, longtail_size=600
        )

    def size(self, split: str) -> int:
        return getattr(self, f"{split}_size")


# ---- entities ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Inventory:
    """Subjects (seen: train and every split; heldout: LONGTAIL only) and rare value pairs."""

    seen: Mapping[str, tuple[str, ...]]
    heldout: Mapping[str, tuple[str, ...]]
    train_names: tuple[str, ...]
    heldout_names: tuple[str, ...]
    rare_pairs: Mapping[str, frozenset[frozenset[str]]]


def make_inventory(config: WorldConfig) -> Inventory:
    """Subject names from pairs of pieces; held-out names reuse pieces of training names."""
    rng = random.Random(f"{config.seed}/inventory")
    taken = all_words()
    combos = [a + b for a, b in itertools.product(PIECES, PIECES) if a != b and a + b not in taken]
    pieces = {a + b: (a, b) for a, b in itertools.product(PIECES, PIECES)}
    rng.shuffle(combos)
    train_names = combos[: config.num_names]
    firsts = {pieces[n][0] for n in train_names}
    seconds = {pieces[n][1] for n in train_names}
    n_held = max(
        2, round(config.num_names * config.heldout_fraction / (1 - config.heldout_fraction))
    )
    heldout_names = [
        n for n in combos[config.num_names :] if pieces[n][0] in firsts and pieces[n][1] in seconds
    ][:n_held]
    n_held_subj = max(
        2,
        round(config.subjects_per_domain * config.heldout_fraction / (1 - config.heldout_fraction)),
    )
    seen, heldout, pairs = {}, {}, {}
    for domain in DOMAINS:
        pool = [f"{n} {h}" for n in train_names for h in HEADS[domain]]
        held = [f"{n} {h}" for n in heldout_names for h in HEADS[domain]]
        seen[domain] = tuple(sorted(rng.sample(pool, min(len(pool), config.subjects_per_domain))))
        heldout[domain] = tuple(sorted(rng.sample(held, min(len(held), n_held_subj))))
        attrs = list(ATTRIBUTES[domain].values())
        pairs[domain] = {
            frozenset((a.word, b.word))
            for i, va in enumerate(attrs)
            for vb in attrs[i + 1 :]
            for a in va
            for b in vb
        }
    # Rare pairs are rare everywhere: a pair kept out of one domain's queries is kept out of all.
    every = sorted(sorted(p) for p in set().union(*pairs.values()))
    kept = {frozenset(p) for p in rng.sample(every, round(len(every) * config.rare_pair_fraction))}
    rare = {domain: frozenset(pairs[domain] & kept) for domain in DOMAINS}
    return Inventory(seen, heldout, tuple(train_names), tuple(heldout_names), rare)


# ---- generation --------------------------------------------------------------------------------
def _constraints(rng: random.Random, config: WorldConfig, domain: str) -> tuple[str, ...]:
    n = rng.choices((0, 1, 2), config.constraint_weights)[0]
    attrs = rng.sample(sorted(ATTRIBUTES[domain]), n)
    return tuple(rng.choice(ATTRIBUTES[domain][a]).word for a in attrs)


def _sample_query(rng, config, inv, split, used) -> tuple[Query, str | None]:
    for _ in range(1000):
        domain = rng.choice(DOMAINS)
        kind = None
        if split == "longtail":
            kind = "entity" if rng.random() < config.longtail_entity_share else "combo"
        if kind == "entity":
            subject = rng.choice(inv.heldout[domain])
            words = _constraints(rng, config, domain)
        else:
            subject = rng.choice(inv.seen[domain])
            if kind == "combo":
                if not inv.rare_pairs[domain]:
                    continue
                words = tuple(rng.choice(sorted(sorted(p) for p in inv.rare_pairs[domain])))
                words = tuple(rng.sample(words, 2))
            else:
                words = _constraints(rng, config, domain)
                if len(words) == 2 and frozenset(words) in inv.rare_pairs[domain]:
                    continue
        intent = rng.choice(INTENTS)
        key = (subject, frozenset(words), intent)
        if key in used:
            continue
        used.add(key)
        text = query_text(rng, domain, subject, intent, words)
        return Query(domain, subject, intent, words, text), kind
    raise RuntimeError(f"{split}: ran out of unused queries; enlarge the inventory")


def _note_subject(rng, inv, query, facts, split) -> tuple[str, str]:
    """(subject, domain) of the note's main subject for its relation to the query."""
    if facts.relation == "same":
        return query.subject, query.domain

    def pool(domain):
        subjects = inv.seen[domain] + (inv.heldout[domain] if split == "longtail" else ())
        return [s for s in subjects if s != query.subject]

    name = query.subject.split(" ", 1)[0]
    if facts.relation == "other-domain" or (facts.relation == "mention" and rng.random() < 0.3):
        domain = rng.choice([d for d in DOMAINS if d != query.domain])
    else:
        domain = query.domain
    candidates = pool(domain)
    namesakes = [s for s in candidates if s.split(" ", 1)[0] == name]
    if namesakes and rng.random() < 0.5:
        candidates = namesakes
    return rng.choice(candidates), domain


def make_example(rng, config, inv, query, kind, split, qid) -> RelevanceExample:
    """One graded note for `query`: grade first, then a rule that gives it, then facts and text."""
    criteria = DOMAIN_CRITERIA[query.domain]
    while True:
        grade = rng.choices(GRADES, config.grade_weights)[0]
        rules = [r for r, g in criteria if g == grade and feasible(r, query)]
        if rules:
            break
    rule = rng.choice(rules)
    facts = sample_facts(rng, query, rule)
    facts.subject, facts.domain = _note_subject(rng, inv, query, facts, split)
    if facts.spam:
        facts.status = dict.fromkeys(query.constraints, "missing")
    used_attrs = {
        a for a, vs in ATTRIBUTES[query.domain].items() for v in vs if v.word in facts.status
    }
    free = [vs for a, vs in sorted(ATTRIBUTES[facts.domain].items()) if a not in used_attrs]
    extras = [
        rng.choice(vs)
        for vs in rng.sample(free, min(len(free), rng.randint(*config.extra_attributes)))
    ]
    others = [s for s in inv.seen[facts.domain] if s not in (facts.subject, query.subject)]
    title, body = note_text(
        rng,
        query,
        facts,
        extras=extras,
        others=rng.sample(others, min(3, len(others))),
        filler=config.filler_sentences,
        noise_rate=config.noise_rate,
    )
    steps = {
        "step1": {
            "subject": query.subject,
            "constraints": list(query.constraints),
            "intent": query.intent,
        },
        "step2": {
            "subject": facts.subject,
            "covers": [w for w in query.constraints if facts.status[w] == "met"],
            "format": facts.format,
        },
        "step3": {"rule": rule, "bound": bound(query.domain, rule)},
    }
    meta = {
        "domain": query.domain,
        "criteria": criteria_lines(query.domain),
        "rule": rule,
        "split": split,
        "entity_seen": kind != "entity",
        "longtail_kind": kind,
        "intent": query.intent,
        "relation": facts.relation,
        "note_subject": facts.subject,
        "note_domain": facts.domain,
        "format": facts.format,
        "spam": facts.spam,
        "constraint_status": dict(facts.status),
    }
    return RelevanceExample(
        qid=qid,
        query=query.text,
        doc=body,
        doc_title=title,
        label=grade,
        scale="xhs5",
        source=SOURCE,
        steps=steps,
        meta=meta,
    )


def generate(config: WorldConfig | None = None) -> dict[str, list[RelevanceExample]]:
    """All four splits (default config: `WorldConfig()`); no query repeats across splits."""
    config = config or WorldConfig()
    inv = make_inventory(config)
    used: set = set()
    out = {}
    for split in SPLITS:
        rng = random.Random(f"{config.seed}/{split}")
        examples: list[RelevanceExample] = []
        n = config.size(split)
        while len(examples) < n:
            query, kind = _sample_query(rng, config, inv, split, used)
            qid = f"world-{config.seed}-{split}-{len(used):06d}"
            k = min(rng.randint(*config.notes_per_query), n - len(examples))
            examples += [make_example(rng, config, inv, query, kind, split, qid) for _ in range(k)]
        out[split] = examples
    return out


# ---- oracle and teacher ------------------------------------------------------------------------
_BOUND = re.compile(r"^\s*(<=|>=|=)\s*(-?\d+)\s*$")


def parse_bound(text: str) -> tuple[str, int]:
    m = _BOUND.match(text)
    if not m:
        raise ValueError(f"not a bound: {text!r}")
    return m.group(1), int(m.group(2))


def rule_oracle(example: RelevanceExample) -> int:
    """The grade from the recorded step truth alone: the firing rule's bound is tight."""
    if not example.steps or "step3" not in example.steps:
        raise ValueError("rule_oracle needs recorded step truth (steps.step3)")
    return parse_bound(example.steps["step3"]["bound"])[1]


# ---- the teacher -------------------------------------------------------------------------------
def _other(rng: random.Random, options, current):
    return rng.choice([o for o in options if o != current])


_TRUTH_KEYS = {
    "step1": ("subject", "constraints", "intent"),
    "step2": ("subject", "covers", "format"),
}


def _corrupt(rng: random.Random, step: str, truth: dict, domain: str) -> dict:
    """A wrong version of one step's conclusions: one value changed, the others kept."""
    if step == "step3":
        rule = _other(rng, [r for r, _ in DOMAIN_CRITERIA[domain]], truth["step3"]["rule"])
        return {"rule": rule, "bound": bound(domain, rule)}
    out = {k: list(v) if isinstance(v, list) else v for k, v in truth[step].items()}
    key = rng.choice(_TRUTH_KEYS[step])
    if key == "subject":
        # The other subject of the pair (step2 "is about the query", step1 takes the note's
        # subject for the query's) or the same name with another head. No new names: a held-out
        # name must never appear in a training trace.
        name, head = out["subject"].split(" ", 1)
        swap = truth["step2" if step == "step1" else "step1"]["subject"]
        if swap != out["subject"] and rng.random() < 0.5:
            out["subject"] = swap
        else:
            out["subject"] = f"{name} {_other(rng, HEADS[domain], head)}"
    elif key in ("constraints", "covers"):
        items = out[key]
        pool = [v.word for vs in ATTRIBUTES[domain].values() for v in vs if v.word not in items]
        if step == "step2":  # prefer claiming a query constraint the note does not meet
            pool = [w for w in truth["step1"]["constraints"] if w not in items] or pool
        if items and rng.random() < 0.5:
            items.remove(rng.choice(items))
        else:
            items.append(rng.choice(pool))
    else:
        out[key] = _other(rng, INTENTS if key == "intent" else FORMATS, out[key])
    return out


def teacher_trace(
    example: RelevanceExample,
    rng: random.Random,
    error_rate: float,
    propagation: float = 0.5,
    prose: bool = True,
) -> tuple[str, dict[str, bool]]:
    """A teacher's trace for a world example, and which of its steps are right.

    With `prose=False` each step is its conclusion line alone (shorter traces for small models).

    Each step is independently wrong with probability `error_rate` (one conclusion value
    changed). A wrong step1 or step2 also makes step3 wrong with probability `propagation` (the
    teacher applies a criterion to its mistaken reading). The answer always follows the teacher's
    own step3 bound: a wrong rule with the same grade still ends in the right answer, and a wrong
    step1/step2 that does not propagate leaves the answer right (a wrong step in a right trace).
    """
    if example.steps is None or "domain" not in example.meta:
        raise ValueError("teacher_trace needs a world example (steps and meta.domain)")
    domain = example.meta["domain"]
    truth = {name: dict(example.steps[name]) for name in ("step1", "step2", "step3")}
    steps, correct = {}, {}
    for name in ("step1", "step2"):
        wrong = rng.random() < error_rate
        steps[name] = _corrupt(rng, name, truth, domain) if wrong else truth[name]
        correct[name] = not wrong
    early_error = not (correct["step1"] and correct["step2"])
    wrong3 = rng.random() < error_rate or (early_error and rng.random() < propagation)
    steps["step3"] = _corrupt(rng, "step3", truth, domain) if wrong3 else truth["step3"]
    correct["step3"] = not wrong3
    text = {name: step_prose(rng, name, steps[name], domain) for name in steps} if prose else None
    answer = parse_bound(steps["step3"]["bound"])[1]
    return format_trace(steps, answer, text), correct


# ---- statistics (implemented in world_stats, which needs scikit-learn) -------------------------
def stats_report(config: WorldConfig | None = None) -> dict:
    """Per-split pairs, queries, grades, oracle / majority / logreg / teacher accuracy."""
    from jaxgrm.data import world_stats

    return world_stats.stats_report(config)


def format_stats(report: dict) -> str:
    """The `stats_report` output as a table."""
    from jaxgrm.data import world_stats

    return world_stats.format_stats(report)
