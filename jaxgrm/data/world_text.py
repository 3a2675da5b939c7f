"""Surface text of the synthetic relevance world: queries, notes with noise, teacher prose.

Everything here turns already-decided facts into words; nothing here decides a grade. Entity
names and constraint phrases are never touched by noise, so step conclusions stay copyable.
"""

from __future__ import annotations

import dataclasses
import random

from jaxgrm.data.world_vocab import ATTRIBUTES, EXCLUSIVE, Value, value_of


@dataclasses.dataclass(frozen=True)
class Query:
    """A generated query. constraints: canonical constraint words, in query order."""

    domain: str
    subject: str
    intent: str
    constraints: tuple[str, ...]
    text: str


@dataclasses.dataclass
class Facts:
    """What is true of one note relative to its query (the world's hidden state).

    relation: same | mention (names the query subject in passing, is about `subject`) |
    other-subject (same domain) | other-domain. status: query constraint word -> met | missing |
    violated. subject/domain: the note's main subject and its domain.
    """

    spam: bool
    relation: str
    format: str
    status: dict[str, str]
    subject: str = ""
    domain: str = ""


_HOWTO = {
    "food": ("how to make {s}", "{s} recipe", "easy {s} recipe"),
    "travel": ("how to plan a {s} trip", "{s} itinerary", "{s} travel guide"),
    "beauty": ("how to use {s}", "{s} routine how to", "how to apply {s}"),
    "home": ("how to set up {s}", "{s} cleaning guide", "how to choose {s}"),
    "fitness": ("how to start {s}", "{s} how to do it right", "{s} guide"),
}
_BUY = {
    "food": ("where to buy {s}", "{s} delivery", "order {s} online"),
    "travel": ("book {s} tickets", "{s} hotel booking", "{s} tour package deal"),
    "beauty": ("buy {s}", "where to buy {s}", "{s} best price online"),
    "home": ("buy {s}", "{s} order online", "where to buy {s}"),
    "fitness": ("{s} class sign up", "buy {s} gear", "{s} membership deal"),
}
_REVIEW = ("{s} review", "is {s} worth it", "{s} honest opinions")
_RECO = ("best {s}", "{s} recommendations", "which {s} to try")

_DOMAIN_STEPS = {
    "food": ("prep everything first", "simmer for 20 minutes", "season to taste", "plate it up"),
    "travel": ("book the early train", "check in by noon", "walk the main street", "catch sunset"),
    "beauty": ("cleanse first", "apply a thin layer", "wait two minutes", "finish with cream"),
    "home": ("measure the space", "unbox and assemble", "wipe it down weekly", "avoid direct sun"),
    "fitness": ("warm up for 5 minutes", "do 3 rounds", "rest 30 seconds", "cool down and stretch"),
}
_TITLES = {
    "tutorial": ("{s} tutorial", "how i do {s} in 3 steps", "{s}: step by step"),
    "review": ("{s} honest review", "is {s} worth it? my review", "{s} after 2 weeks"),
    "vlog": ("{s} vlog", "a day with {s}", "weekend vlog ft. {s}"),
    "listicle": ("top 5 {h} picks, {s} first", "{h} ranking: {s} wins", "5 {h} i love ({s}!)"),
    "ad": ("{s} limited deal", "{s} is on sale now", "new drop: {s}"),
}
_CUES = {
    "tutorial": ("quick tutorial for you", "step by step below", "here is exactly how i do it"),
    "review": ("my honest review", "rating: 4 out of 5", "pros and cons below", "my verdict"),
    "vlog": ("vlog time", "come along with me for the day", "filmed my whole day"),
    "listicle": ("my top 5 list", "ranked my favourites", "saving you time with this list"),
    "ad": ("#ad", "sponsored post", "use code SAVE20 at checkout", "link in bio for 30% off"),
}
_SPAM = (
    "follow for follow",
    "dm me to earn 5000 a day",
    "click the link to win a free iphone",
    "free gift for the first 100",
    "like and share to enter",
)
_SUBJECT = (
    "finally tried {s}",
    "{s} is the star of this post",
    "everyone asked about {s} so here it is",
    "obsessed with {s} lately",
    "let us talk about {s}",
)
_MENTION = (
    "my friend keeps raving about {q} but i went with this instead",
    "{q} was sold out so i tried this",
    "way better than {q} imo",
    "saw {q} on the way but skipped it",
)
_OPENERS = ("ok so", "guys", "long post incoming", "sharing because you asked", "hi friends")
_FILLER = (
    "honestly so good",
    "saving this for later",
    "would do it again",
    "trust me on this",
    "no gatekeeping here",
    "life changing tbh",
    "cannot stop thinking about it",
    "the vibes were immaculate",
    "my friends keep asking",
    "drop your questions below",
)
_NOT_AD = ("not sponsored btw", "no ad, just love it", "paid for it myself")
_EMOJI = ("✨", "🔥", "😍", "🥹", "💯", "🙌", "📍", "💕", "😭", "👀")

INTENT_PHRASE = {
    "how-to": "a how-to on",
    "review": "a review of",
    "recommendation": "recommendations for",
    "buy": "a place to buy",
}
RULE_GLOSS = {
    "spam": "this is spam",
    "ad-banned": "ads are banned",
    "off-topic": "the note is off topic",
    "other-subject": "it is about another subject",
    "passing-mention": "the subject is only mentioned in passing",
    "ad-capped": "an ad is capped",
    "constraint-violated": "a constraint is violated",
    "constraint-missing": "a constraint is left open",
    "format-mismatch": "the format misses the intent",
    "full-match": "everything matches",
}


def head_of(subject: str) -> str:
    """The head noun(s) of `name head` ("kamo milk tea" -> "milk tea")."""
    return subject.split(" ", 1)[1]


def query_text(rng: random.Random, domain: str, subject: str, intent: str, words) -> str:
    """A search-box query: an intent template around the subject, constraint forms around it."""
    table = {
        "how-to": _HOWTO[domain],
        "review": _REVIEW,
        "recommendation": _RECO,
        "buy": _BUY[domain],
    }[intent]
    before, after = [], []
    for word in words:
        form = rng.choice(value_of(domain, word).query_forms)
        (before if rng.random() < 0.3 else after).append(form)
    return " ".join([*before, rng.choice(table).format(s=subject), *after])


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    w, j = words[i], rng.randrange(1, len(words[i]) - 2)
    op = rng.randrange(3)
    if op == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif op == 1:
        w = w[:j] + w[j + 1 :]
    else:
        w = w[:j] + w[j] + w[j:]
    words[i] = w
    return " ".join(words)


def _violation(rng: random.Random, domain: str, value: Value) -> str:
    others = [v for v in ATTRIBUTES[domain][value.attr] if v.word != value.word]
    if value.attr in EXCLUSIVE and others and rng.random() < 0.5:
        return rng.choice(rng.choice(others).met)
    return rng.choice(value.neg)


def note_text(
    rng: random.Random,
    query: Query,
    facts: Facts,
    *,
    extras: list[Value],
    others: list[str],
    filler: tuple[int, int],
    noise_rate: float,
) -> tuple[str, str]:
    """(title, body) of a note with the given facts.

    extras: values of attributes the query does not constrain, mentioned as colour. others:
    further subjects, never the query's (listicle items, a comparison). filler: (min, max)
    filler sentences. noise_rate: chance of each noise event (emoji, typo in a filler sentence).
    """
    s, h = facts.subject, head_of(facts.subject)
    if facts.spam:
        stuffed = " ".join([query.subject] * rng.randint(2, 4))
        words = " ".join(value_of(query.domain, w).query_forms[0] for w in query.constraints)
        title = f"{query.subject} {query.subject} free {rng.choice(_EMOJI) * 3}"
        sents = [stuffed, *rng.sample(_SPAM, 2), f"best {query.subject} {words}".strip()]
        rng.shuffle(sents)
        tags = " ".join(f"#{w}" for w in query.text.split() if len(w) > 3)
        return title, ". ".join(sents) + " " + tags

    title = rng.choice(_TITLES[facts.format]).format(s=s, h=h)
    middle = [rng.choice(_SUBJECT).format(s=s), rng.choice(_CUES[facts.format])]
    if facts.format == "tutorial":
        steps = rng.sample(_DOMAIN_STEPS[facts.domain], 3)
        middle.append(". ".join(f"step {i + 1}: {a}" for i, a in enumerate(steps)))
    elif facts.format == "listicle":
        items = [s, *others[:2]]
        middle.append(" ".join(f"{i + 1}. {x}" for i, x in enumerate(items)))
    elif facts.format == "ad" and rng.random() < 0.5:
        middle.append(rng.choice(_CUES["ad"]))
    for word in query.constraints:
        value = value_of(query.domain, word)
        status = facts.status[word]
        if status == "met":
            middle.append(rng.choice(value.met))
        elif status == "violated":
            middle.append(_violation(rng, query.domain, value))
    middle += [rng.choice(v.met) for v in extras]
    if facts.relation == "mention":
        middle.append(rng.choice(_MENTION).format(q=query.subject))
    elif others[2:] and rng.random() < 0.3:  # the same phrasing, about a third subject
        middle.append(rng.choice(_MENTION).format(q=others[2]))

    fill = rng.sample(_FILLER, rng.randint(*filler))
    if facts.format != "ad" and rng.random() < 0.3:
        fill.append(rng.choice(_NOT_AD))
    fill = [_typo(rng, f) if rng.random() < noise_rate else f for f in fill]
    first = middle[:1]
    rest = middle[1:] + fill
    rng.shuffle(rest)
    sents = first + rest
    if rng.random() < 0.6:
        sents.insert(0, rng.choice(_OPENERS))
    sents = [x + " " + rng.choice(_EMOJI) if rng.random() < noise_rate else x for x in sents]
    if rng.random() < noise_rate:
        title += " " + rng.choice(_EMOJI)
    tags = f"#{h.replace(' ', '')} #{facts.domain}"
    return title, ". ".join(sents) + " " + tags


def step_prose(rng: random.Random, step: str, values: dict, domain: str) -> str:
    """A short sentence a teacher writes before the conclusion of `step` (matching `values`)."""
    if step == "step1":
        cons = values["constraints"]
        lead = rng.choice(("The query asks for", "The user wants"))
        tail = f"with {' and '.join(cons)}" if cons else "with no constraints"
        return f"{lead} {INTENT_PHRASE[values['intent']]} {values['subject']}, {tail}."
    if step == "step2":
        covers = values["covers"]
        met = f"it meets {' and '.join(covers)}" if covers else "it meets no constraint"
        article = "an" if values["format"] == "ad" else "a"
        return f"The note is {article} {values['format']} about {values['subject']}; {met}."
    return f"In {domain}, {RULE_GLOSS[values['rule']]}."
