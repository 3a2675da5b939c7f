"""The vocabulary of the synthetic relevance world: domains, subject pieces, attributes, phrases.

Subjects are `<name> <head>` ("kamo noodles", "rizu serum"): the head noun names the domain's kind
of thing, the name is two syllable-like pieces. Names recur across domains ("kamo noodles",
"kamo serum"), so a shared word is no proof of a shared subject. Held-out (LONGTAIL) subjects use
names that no training subject uses but whose pieces do occur, in the same position, in training
names, so a sub-word tokenizer trained on training text can still write them.

Every constraint value has a canonical `word` (the step conclusion value; it appears in every query
form of the value), note phrases that meet it (mostly paraphrases, so word overlap is no proof of
a match) and note phrases that contradict it (often containing the word itself: "not cheap at all").
"""

from __future__ import annotations

import dataclasses

DOMAINS = ("food", "travel", "beauty", "home", "fitness")
INTENTS = ("how-to", "review", "recommendation", "buy")
FORMATS = ("tutorial", "review", "vlog", "listicle", "ad")
# Note formats that serve each query intent (the format-mismatch rule).
COMPATIBLE = {
    "how-to": ("tutorial", "vlog"),
    "review": ("review", "vlog"),
    "recommendation": ("listicle", "review"),
    "buy": ("listicle", "review", "ad"),
}

PIECES = (
    "ka", "mo", "ri", "zu", "te", "lo", "vi", "na", "sa", "po", "ki", "ru",
    "me", "ya", "ne", "shi", "da", "fu", "ho", "bi", "ge", "wu", "jo", "xe",
)  # fmt: skip

HEADS = {
    "food": ("noodles", "dumplings", "hotpot", "cake", "milk tea", "bun", "curry", "soup"),
    "travel": (
        "island", "old town", "lake", "temple", "hot spring", "night market", "ski resort",
        "beach",
    ),
    "beauty": (
        "serum", "lipstick", "sunscreen", "toner", "cushion", "face mask", "eyeliner", "shampoo",
    ),
    "home": (
        "sofa", "desk lamp", "rice cooker", "rug", "bookshelf", "air purifier", "curtains",
        "mattress",
    ),
    "fitness": (
        "yoga", "pilates", "hiit", "dumbbell workout", "stretching routine", "jump rope",
        "spin class", "running plan",
    ),
}  # fmt: skip

CITIES = ("shanghai", "chengdu", "beijing", "hangzhou", "xiamen", "guangzhou", "dali", "qingdao")
BRANDS = ("velora", "aurix", "brisa", "nordy", "pemvo", "tallis")


@dataclasses.dataclass(frozen=True)
class Value:
    """One constraint value: `word` is what step conclusions say; it occurs in every query form."""

    attr: str
    word: str
    query_forms: tuple[str, ...]
    met: tuple[str, ...]
    neg: tuple[str, ...]

    def __post_init__(self):
        if not all(self.word in form for form in self.query_forms):
            raise ValueError(f"{self.word!r}: every query form must contain the word")


def _values(attr: str, table: dict[str, tuple[tuple[str, ...], ...]]) -> tuple[Value, ...]:
    return tuple(Value(attr, w, *(tuple(x) for x in rows)) for w, rows in table.items())


_PRICE = {
    "cheap": (
        ("cheap",),
        ("under 50 yuan all in", "super budget friendly", "costs next to nothing", "a bargain"),
        ("not cheap at all", "honestly not cheap", "cheap it is not, my wallet cried"),
    ),
    "luxury": (
        ("luxury",),
        ("a proper splurge", "high end and worth every yuan", "a five star treat"),
        ("not luxury at all", "feels like a cheap knockoff, zero luxury"),
    ),
}
_SEASON = {
    "winter": (
        ("winter", "in winter", "for winter"),
        ("perfect on cold snowy days", "my go to when it is freezing outside"),
        ("skip it in winter", "not great in winter"),
    ),
    "summer": (
        ("summer", "in summer", "for summer"),
        ("made for hot sticky days", "my july favourite in the heat"),
        ("too heavy for summer", "not for summer honestly"),
    ),
    "spring": (
        ("spring", "in spring"),
        ("lovely while the blossoms are out", "perfect for mild march weather"),
        ("skip it in spring", "not a spring thing"),
    ),
    "autumn": (
        ("autumn", "in autumn"),
        ("cosy when the leaves turn", "perfect for crisp october days"),
        ("not for autumn", "wrong pick in autumn"),
    ),
}


def _cities(forms: tuple[str, ...], met: tuple[str, ...], neg: tuple[str, ...]):
    return tuple(
        Value(
            "place",
            c,
            tuple(f.format(c=c) for f in forms),
            tuple(m.format(c=c) for m in met),
            tuple(n.format(c=c) for n in neg),
        )
        for c in CITIES
    )


_BRAND = tuple(
    Value(
        "brand",
        b,
        (b, f"{b} brand"),
        (f"this is the {b} one", f"got the {b} version", f"made by {b}"),
        (f"not {b}, a dupe", f"skipped {b} for this one"),
    )
    for b in BRANDS
)

_AUDIENCE = {
    "food": {
        "kids": (
            ("for kids", "kids"),
            ("my toddler finished every bite", "mild enough for little ones"),
            ("way too spicy for kids", "not for kids"),
        ),
        "vegan": (
            ("vegan",),
            ("fully plant based", "no meat and no dairy in it"),
            ("sadly not vegan, lots of pork", "not vegan"),
        ),
        "students": (
            ("for students", "students"),
            ("dorm friendly and quick", "my uni roommates are hooked"),
            ("not for students on a budget", "no student deals sadly"),
        ),
    },
    "travel": {
        "families": (
            ("for families", "families"),
            ("easy with a stroller", "our little ones had a blast"),
            ("not for families with small children", "not family friendly"),
        ),
        "couples": (
            ("for couples", "couples"),
            ("so romantic for a date trip", "a perfect anniversary spot"),
            ("not romantic, skip it as couples", "not for couples"),
        ),
        "solo": (
            ("solo", "solo trip"),
            ("safe and easy on my own", "went alone and loved it"),
            ("not fun solo", "no good for a solo trip"),
        ),
    },
    "beauty": {
        "oily skin": (
            ("for oily skin", "oily skin"),
            ("my shiny t zone stays matte all day", "zero grease by noon"),
            ("broke out my oily skin", "too greasy for oily skin"),
        ),
        "dry skin": (
            ("for dry skin", "dry skin"),
            ("my flaky cheeks drank it up", "hydrating all day long"),
            ("made my dry skin flake", "too drying for dry skin"),
        ),
        "sensitive skin": (
            ("for sensitive skin", "sensitive skin"),
            ("no redness, no sting at all", "fragrance free and gentle"),
            ("stung my sensitive skin", "not for sensitive skin"),
        ),
    },
    "home": {
        "small apartment": (
            ("for small apartment", "small apartment"),
            ("fits my tiny studio", "takes barely any floor space"),
            ("too bulky for a small apartment", "not for a small apartment"),
        ),
        "pets": (
            ("for pets", "pets"),
            ("my cat has not scratched it once", "dog hair wipes right off"),
            ("not pet proof", "my cat ruined it, not for pets"),
        ),
        "renters": (
            ("for renters", "renters"),
            ("no drilling needed", "landlord approved setup"),
            ("not for renters, needs drilling", "renters beware"),
        ),
    },
    "fitness": {
        "beginners": (
            ("for beginners", "beginners"),
            ("easy if you have never trained", "my first week and i kept up"),
            ("not for beginners", "way too hard for beginners"),
        ),
        "seniors": (
            ("for seniors", "seniors"),
            ("gentle on the knees", "my grandma does it with me"),
            ("not for seniors, hard on the joints", "too intense for seniors"),
        ),
        "new moms": (
            ("for new moms", "new moms"),
            ("safe after giving birth", "fits around baby naps"),
            ("not for new moms", "not safe for new moms postpartum"),
        ),
    },
}
_FIT_PLACE = {
    "at home": (
        ("at home",),
        ("just a mat in the living room", "no equipment in my bedroom"),
        ("not doable at home", "needs machines, not at home"),
    ),
    "gym": (
        ("gym", "at the gym"),
        ("on the cable machine", "all on the squat rack"),
        ("no gym needed", "not a gym session"),
    ),
    "outdoors": (
        ("outdoors",),
        ("in the park at sunrise", "by the river path"),
        ("not outdoors", "indoors only"),
    ),
}

_FOOD_PLACE = _cities(
    ("in {c}", "{c}"),
    ("found this spot in {c}", "a {c} local favourite", "right in downtown {c}"),
    ("no {c} branch yet", "not in {c} sadly"),
)
_TRAVEL_PLACE = _cities(
    ("near {c}", "from {c}"),
    ("an easy train ride from {c}", "a short drive from {c}"),
    ("nowhere near {c}", "far from {c}"),
)

ATTRIBUTES: dict[str, dict[str, tuple[Value, ...]]] = {
    "food": {
        "price": _values("price", _PRICE),
        "season": _values("season", _SEASON),
        "place": _FOOD_PLACE,
        "audience": _values("audience", _AUDIENCE["food"]),
    },
    "travel": {
        "price": _values("price", _PRICE),
        "season": _values("season", _SEASON),
        "place": _TRAVEL_PLACE,
        "audience": _values("audience", _AUDIENCE["travel"]),
    },
    "beauty": {
        "price": _values("price", _PRICE),
        "season": _values("season", _SEASON),
        "brand": _BRAND,
        "audience": _values("audience", _AUDIENCE["beauty"]),
    },
    "home": {
        "price": _values("price", _PRICE),
        "season": _values("season", _SEASON),
        "brand": _BRAND,
        "audience": _values("audience", _AUDIENCE["home"]),
    },
    "fitness": {
        "price": _values("price", _PRICE),
        "season": _values("season", _SEASON),
        "place": _values("place", _FIT_PLACE),
        "audience": _values("audience", _AUDIENCE["fitness"]),
    },
}
# Attributes whose values exclude each other: a note can break the constraint by naming another.
EXCLUSIVE = frozenset({"price", "season", "place", "brand"})


def value_of(domain: str, word: str) -> Value:
    """The Value with canonical `word` in `domain`."""
    for values in ATTRIBUTES[domain].values():
        for v in values:
            if v.word == word:
                return v
    raise KeyError(f"{domain}: no constraint value {word!r}")


def all_words() -> frozenset[str]:
    """Every word of the fixed vocabulary (to keep generated names from colliding with it)."""
    texts = [*HEADS.values(), CITIES, BRANDS, INTENTS, FORMATS]
    for attrs in ATTRIBUTES.values():
        for values in attrs.values():
            for v in values:
                texts.append((v.word, *v.query_forms, *v.met, *v.neg))
    return frozenset(w for group in texts for text in group for w in text.split())
