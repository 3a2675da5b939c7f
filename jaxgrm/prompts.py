"""Criteria-augmented prompts and step-tagged traces (method.md, OURS).

A trace is

    <step1> prose => subject: ...; constraints: ...; intent: ... </step1>
    <step2> prose => subject: ...; covers: ...; format: ... </step2>
    <step3> prose => rule: ...; bound: ... </step3>
    <answer> grade </answer>

(one line, no newlines between steps); the conclusion keys are those of
`jaxgrm.data.schema.STEP_KEYS`, in that order, each present only when known. The label-only
format (the SFT-Label baseline) is just `<answer> grade </answer>`.

Prompts (`render_prompt`) hold the task instruction, the rubric of the example's grade scale,
optionally the criteria block, the query and the document cut to a token budget, and end where
the response starts. Prompts never contain tag tokens: the instruction names the steps in words
and tag strings inside user text are escaped, so tags in a token sequence come from the response.

Parsing (`parse_ids`, `parse_text`) never raises on arbitrary output; see `ParsedTrace` for the
span convention and the rules for missing and malformed parts.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxgrm.data.schema import (
    CONCLUSION_MARK,
    LIST_KEYS,
    SCALES,
    STEP_KEYS,
    STEP_NAMES,
    GradeScale,
    RelevanceExample,
)
from jaxgrm.tokenizer import TAGS, Tokenizer

ANSWER = "answer"
BLOCKS = (*STEP_NAMES, ANSWER)  # canonical order of the tagged blocks of a reasoning trace
CUT_MARK = " …[cut]"


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


def format_answer(grade: int | str) -> str:
    """The label-only response (SFT-Label baseline)."""
    return f"<answer> {grade} </answer>"


# ---- prompts --------------------------------------------------------------------------------
class TraceFormat(enum.Enum):
    REASONING = "reasoning"  # three tagged steps, then the answer
    LABEL_ONLY = "label_only"  # the answer only (SFT-Label baseline)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How prompts and targets are rendered.

    format: the response format. criteria: include the criteria block (off = the no-criteria
    ablation). instructions: include the task and step instructions (off for models trained
    from scratch, to which constant text only costs sequence length; the rubric always stays).
    doc_budget: most tokens of the document block (title + body, see `truncate_doc`); None
    keeps it whole. add_bos: prepend the tokenizer's bos id (if it has one) to prompt ids.
    """

    format: TraceFormat = TraceFormat.REASONING
    criteria: bool = True
    instructions: bool = True
    doc_budget: int | None = 384
    add_bos: bool = True

    def __post_init__(self):
        if not isinstance(self.format, TraceFormat):
            raise TypeError(f"format must be a TraceFormat, got {self.format!r}")
        if self.doc_budget is not None and self.doc_budget < 16:
            raise ValueError(f"doc_budget must be None or >= 16 tokens, got {self.doc_budget}")


# Default criteria for real data, whose records carry no criteria of their own. Each rule names a
# condition the steps can establish (a topic or product-type match, which query terms the document
# contains) and the grade bound it implies, in the `bound` syntax the step3 verifier checks.
_PRODUCT_RULES = (
    "no_match: none of the query's key terms (the product type) is in the title",
    "type_mismatch: a different kind of product, even if some query words occur",
    "accessory: a part or accessory for the product the query asks for",
    "partial: the product type matches, but a query attribute (brand, size, material, colour) "
    "is absent",
    "full_match: the product type and every attribute of the query are present",
)


def _with_bounds(rules: Sequence[str], bounds: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{r} -> bound: {b}" for r, b in zip(rules, bounds, strict=True))


_XHS5 = (
    "spam_or_ad: the note is spam, an ad or harmful -> bound: = -1",
    "subject_mismatch: the note's main subject is not the query's subject -> bound: = 0",
    "passing_mention: the query's subject is only mentioned in passing -> bound: = 1",
    "unmet: the right subject, but a query constraint or the intent is not met -> bound: = 2",
    "all_met: the subject, every constraint and the intent are met -> bound: = 3",
)
DEFAULT_CRITERIA: dict[str, tuple[str, ...]] = {
    "xhs5": _XHS5,
    "homedepot3": _with_bounds(_PRODUCT_RULES, ("= 1", "= 1", "<= 2", "<= 2", ">= 2")),
    "crowdflower4": _with_bounds(_PRODUCT_RULES, ("= 1", "<= 2", "<= 2", "<= 3", ">= 3")),
    "trec4": (
        "off_topic: the passage is about something other than the query's topic -> bound: = 0",
        "no_answer: on the query's topic (its key terms occur) but it does not answer the query "
        "-> bound: <= 1",
        "partial_answer: it answers part of the query, or answers it unclearly -> bound: = 2",
        "exact_answer: it is dedicated to the query and contains the exact answer -> bound: = 3",
    ),
    "kuake4": (
        "no_match: the title's topic is unrelated to the query -> bound: = 0",
        "little_match: shares a term, but the topic differs (another disease, drug or body part) "
        "-> bound: <= 1",
        "broader_or_narrower: the title's topic is broader or narrower than the query's "
        "-> bound: = 2",
        "full_match: the title's topic is the query's, every key term present -> bound: = 3",
    ),
    "qbqtc3": (
        "no_match: no key term of the query is in the title, and the topic differs -> bound: = 0",
        "partial: the topic is shared but a key term or the query's need is missing -> bound: = 1",
        "full_match: every key term is present and the title meets the query's need -> bound: = 2",
    ),
}

_STEP_INSTRUCTIONS = (
    "step1, query analysis: the core subject, the constraints and the intent of the query "
    "(=> subject: ...; constraints: ...; intent: ...)",
    "step2, document analysis: its main subject, what of the query it covers, its format, and "
    "which query terms are present in or absent from it "
    "(=> subject: ...; covers: ...; format: ...; present: ...; absent: ...)",
    "step3, criteria check: which rule fires and the grade bound it implies "
    "(=> rule: ...; bound: <= g, = g or >= g)",
)
_TAG_RE = re.compile("|".join(re.escape(t) for t in TAGS))


def escape_tags(text: str) -> str:
    """Replace the `<` of every tag string with `‹` so user text never encodes to tag tokens."""
    return _TAG_RE.sub(lambda m: "‹" + m.group(0)[1:], text)


def criteria_for(example: RelevanceExample) -> tuple[str, ...]:
    """The example's own `meta["criteria"]` (synthetic world), else the scale's default list."""
    own = example.meta.get("criteria") if example.meta else None
    if own:
        return tuple(str(line) for line in own)
    return DEFAULT_CRITERIA.get(example.scale, ())


def truncate_doc(title: str, body: str, tokenizer: Tokenizer, budget: int) -> str:
    """The document block `title\\nbody` (just `body` without a title) in at most `budget` tokens.

    The title is kept whole and the body cut at a token boundary (never inside a character),
    followed by CUT_MARK. If even the title with the mark does not fit, the title itself is cut
    and the body dropped. Token counts are of the returned text encoded on its own. Raises
    ValueError if not even the mark fits.
    """

    def join(t: str, b: str) -> str:
        return f"{t}\n{b}" if t else b

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    full = join(title, body)
    if count(full) <= budget:
        return full

    def cut(text: str, make: Callable[[str], str]) -> str | None:
        """make(longest clean token prefix of text) that fits, or None if none does."""
        ids = tokenizer.encode(text)

        def prefix(k: int) -> str:
            while k > 0:
                p = tokenizer.decode(ids[:k])
                if text.startswith(p):  # not inside a character split into byte tokens
                    return p.rstrip()
                k -= 1
            return ""

        def fits(k: int) -> bool:
            return count(make(prefix(k))) <= budget

        if not fits(0):
            return None
        lo, hi = 0, len(ids)  # fits(lo); search the largest k that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return make(prefix(lo))

    out = cut(body, lambda p: join(title, p + CUT_MARK)) if title else None
    if out is None:
        out = cut(title or body, lambda p: p + CUT_MARK)
    if out is None:
        raise ValueError(f"budget {budget} is too small for even the cut mark {CUT_MARK!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text and its ids (`[bos] + encode(text)` when add_bos)."""

    text: str
    ids: list[int]


def render_prompt_text(example: RelevanceExample, doc_block: str, config: PromptConfig) -> str:
    """The prompt text around an already truncated, escaped document block."""
    scale = SCALES[example.scale]
    task = "Judge how relevant the document is to the search query."
    lines = [task] if config.instructions else []
    lines.append(f"Grades ({scale.name}):")
    lines += [f"{g}: {scale.rubric[g]}" for g in scale.grades]
    if config.criteria:
        criteria = criteria_for(example)
        if criteria:
            lines.append("Criteria (apply the first rule that fires):")
            lines += [f"- {escape_tags(c)}" for c in criteria]
    if config.instructions and config.format is TraceFormat.REASONING:
        lines.append("Reason in three tagged steps, each ending with one conclusion line:")
        lines += [f"- {s}" for s in _STEP_INSTRUCTIONS]
        lines.append("Then give one grade of the scale as the answer.")
    elif config.instructions:
        lines.append("Give one grade of the scale as the answer, without reasoning.")
    lines.append(f"Query: {escape_tags(example.query)}")
    lines.append("Document (title on the first line):" if example.doc_title else "Document:")
    lines.append(doc_block)
    lines.append("Response:\n")
    return "\n".join(lines)


def render_prompt(
    example: RelevanceExample, tokenizer: Tokenizer, config: PromptConfig = PromptConfig()
) -> Prompt:
    """The prompt for `example`; the response (the model's `<step1>` or `<answer>`) follows it."""
    title, body = escape_tags(example.doc_title.strip()), escape_tags(example.doc)
    if config.doc_budget is None:
        block = f"{title}\n{body}" if title else body
    else:
        block = truncate_doc(title, body, tokenizer, config.doc_budget)
    text = render_prompt_text(example, block, config)
    bos = config.add_bos and tokenizer.bos_id is not None
    return Prompt(text, tokenizer.encode(text, add_bos=bos))


def _target_prose(steps: Mapping[str, Mapping[str, object]]) -> dict[str, str]:
    s1, s2 = steps.get("step1", {}), steps.get("step2", {})
    prose = {"step3": "Checking the criteria in order."}
    if "subject" in s1:
        prose["step1"] = f"The query is about {s1['subject']}."
    if "subject" in s2:
        kind = f"a {s2['format']}" if "format" in s2 else "a document"
        prose["step2"] = f"The document is {kind} about {s2['subject']}."
    return prose


def render_target(example: RelevanceExample, config: PromptConfig = PromptConfig()) -> str:
    """The SFT response: a trace from the recorded step truth (REASONING) or the label alone.

    REASONING needs `example.steps` (ValueError otherwise); short prose is made from the truth.
    """
    if config.format is TraceFormat.LABEL_ONLY:
        return format_answer(example.label)
    if not example.steps:
        raise ValueError(f"example {example.qid!r} has no step truth for a reasoning target")
    return format_trace(example.steps, example.label, _target_prose(example.steps))


# ---- parsing --------------------------------------------------------------------------------
class BlockStatus(enum.Enum):
    OK = "ok"  # exactly one open and one close tag, adjacent among tags, in order
    MISSING = "missing"  # none of its tags occurs
    MALFORMED = "malformed"  # its tags occur: unclosed, repeated, enclosing a tag, out of order


@dataclasses.dataclass(frozen=True)
class ParsedTrace:
    """What a response says, and where.

    Span convention: spans are half-open [start, end) ranges that include both tags of a block,
    start = index of the open tag and end = index of the close tag + 1; token indices for
    `parse_ids`, character indices for `parse_text`. Only OK blocks have spans, so spans are
    disjoint and within [0, length). Tokens outside every span (stray text, broken blocks) and
    after `length` belong to no step.

    A block is OK when its open and close tags each occur exactly once, the close tag is the next
    tag after the open one, and the block keeps the canonical order step1 < step2 < step3 <
    answer relative to the other such blocks (when blocks are out of order, the largest ordered
    subset is kept, preferring earlier steps). A block with any other occurrence of its tags is
    MALFORMED; with none, MISSING.

    grade: the integer answer, or None when the answer block is not OK, its text is not a single
    integer (`-1`, `2`, `+3`), or (when a scale is given) the integer is not on the scale.
    steps_text: the decoded, stripped text inside each OK step. conclusions: per OK step, the
    `key: value` pairs after the last `=>` (keys lower-cased, only keys of STEP_KEYS[step]
    kept, values stripped); None when the step is not OK, has no `=>`, repeats a key, or has a
    non-empty part without `:`.
    """

    length: int
    status: Mapping[str, BlockStatus]
    step_spans: Mapping[str, tuple[int, int]]
    answer_span: tuple[int, int] | None
    answer_text: str | None
    grade: int | None
    steps_text: Mapping[str, str]
    conclusions: Mapping[str, Mapping[str, str] | None]

    @property
    def well_formed(self) -> bool:
        """Every block OK, every step with a conclusion, and a grade."""
        ok = all(s is BlockStatus.OK for s in self.status.values())
        return ok and self.grade is not None and all(self.conclusions[s] for s in STEP_NAMES)


_TAG_BLOCK = {tag: (tag.strip("</>"), tag.startswith("</")) for tag in TAGS}  # tag -> (name, close)
_GRADE_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)


def parse_conclusion(step: str, text: str) -> dict[str, str] | None:
    """The `key: value` pairs after the last `=>` of a step's text (rules in ParsedTrace)."""
    if CONCLUSION_MARK not in text:
        return None
    out: dict[str, str] = {}
    for part in text.rsplit(CONCLUSION_MARK, 1)[1].split(";"):
        if not part.strip():
            continue
        if ":" not in part:
            return None
        key, value = part.split(":", 1)
        key = key.strip().lower()
        if key in out:
            return None
        if key in STEP_KEYS.get(step, ()):
            out[key] = value.strip()
    return out


def _ordered(found: dict[str, tuple[int, int]]) -> set[str]:
    """Names of the largest subset of blocks whose positions follow the canonical order."""
    names = [n for n in BLOCKS if n in found]
    for size in range(len(names), 0, -1):
        for subset in itertools.combinations(names, size):  # earlier steps first
            starts = [found[n][0] for n in subset]
            if starts == sorted(starts):
                return set(subset)
    return set()


def _parse(
    tags: Sequence[tuple[int, int, str]],
    length: int,
    content: Callable[[int, int], str],
    scale: GradeScale | str | None,
) -> ParsedTrace:
    """Core parser over tag occurrences (start, end, tag string), sorted by start."""
    counts = {n: [0, 0] for n in BLOCKS}
    for _, _, tag in tags:
        name, close = _TAG_BLOCK[tag]
        counts[name][close] += 1
    found: dict[str, tuple[int, int]] = {}
    inner: dict[str, tuple[int, int]] = {}
    for (s0, e0, t0), (s1, e1, t1) in itertools.pairwise(tags):
        name, close = _TAG_BLOCK[t0]
        if not close and _TAG_BLOCK[t1] == (name, True) and counts[name] == [1, 1]:
            found[name], inner[name] = (s0, e1), (e0, s1)
    ok = _ordered(found)
    status = {n: BlockStatus.MALFORMED if any(counts[n]) else BlockStatus.MISSING for n in BLOCKS}
    status.update({n: BlockStatus.OK for n in ok})
    steps_text = {n: content(*inner[n]).strip() for n in STEP_NAMES if n in ok}
    conclusions = {n: parse_conclusion(n, steps_text[n]) if n in ok else None for n in STEP_NAMES}
    answer_text = content(*inner[ANSWER]).strip() if ANSWER in ok else None
    grade = None
    if answer_text is not None and _GRADE_RE.fullmatch(answer_text):
        grade = int(answer_text)
        grades = SCALES[scale] if isinstance(scale, str) else scale
        if grades is not None and grade not in grades:
            grade = None
    return ParsedTrace(
        length=length,
        status=status,
        step_spans={n: found[n] for n in STEP_NAMES if n in ok},
        answer_span=found[ANSWER] if ANSWER in ok else None,
        answer_text=answer_text,
        grade=grade,
        steps_text=steps_text,
        conclusions=conclusions,
    )


def parse_ids(
    ids: Sequence[int] | np.ndarray,
    tokenizer: Tokenizer,
    *,
    scale: GradeScale | str | None = None,
    stop_ids: Sequence[int] | None = None,
) -> ParsedTrace:
    """Parse a response given as token ids (the response only, not the prompt). Never raises.

    Tags are found from ids alone (`tokenizer.tag_ids`); the ids are read up to the first stop id
    (default: eos and pad), which sets `length`. Ids outside the vocabulary are skipped when text
    is decoded. `scale` (name or GradeScale) makes off-scale grades None.
    """
    arr = np.asarray(ids).reshape(-1)
    ids_list = [int(i) for i in arr.tolist()] if arr.size else []
    stops = {tokenizer.eos_id, tokenizer.pad_id} if stop_ids is None else set(stop_ids)
    length = next((i for i, t in enumerate(ids_list) if t in stops), len(ids_list))
    by_id = {v: k for k, v in tokenizer.tag_ids.items()}
    tags = [(i, i + 1, by_id[t]) for i, t in enumerate(ids_list[:length]) if t in by_id]
    vocab = tokenizer.vocab_size

    def content(start: int, end: int) -> str:
        return tokenizer.decode([t for t in ids_list[start:end] if 0 <= t < vocab])

    return _parse(tags, length, content, scale)


def parse_text(text: str, *, scale: GradeScale | str | None = None) -> ParsedTrace:
    """Parse a response given as text; spans are character ranges. Never raises."""
    text = str(text)
    tags = [(m.start(), m.end(), m.group(0)) for m in _TAG_RE.finditer(text)]
    return _parse(tags, len(text), lambda s, e: text[s:e], scale)


def segment_ids(parsed: ParsedTrace, length: int) -> np.ndarray:
    """[T] int32 segment of each position: k for step k (1..P), P + 1 for the answer, else 0.

    Positions past `length` are dropped (spans are clipped), so T may be a padded bucket length.
    """
    out = np.zeros(length, np.int32)
    spans = [(parsed.step_spans.get(n), k + 1) for k, n in enumerate(STEP_NAMES)]
    spans.append((parsed.answer_span, len(STEP_NAMES) + 1))
    for span, code in spans:
        if span is not None:
            out[span[0] : min(span[1], length)] = code
    return out


def segment_ids_batch(parsed: Sequence[ParsedTrace], length: int) -> np.ndarray:
    """[B, T] int32 `segment_ids` of a batch of parsed responses."""
    out = np.zeros((len(parsed), length), np.int32)
    for b, p in enumerate(parsed):
        out[b] = segment_ids(p, length)
    return out
