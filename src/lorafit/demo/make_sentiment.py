"""Write ``sentiment.tsv``: lorafit's own small review-sentiment data set for the offline demo.

Run ``python src/lorafit/demo/make_sentiment.py`` to regenerate the file (the output is fixed by
the seed). Sentences are short movie and product reviews composed from templates. Both classes
use the same words in different roles ("not bad at all" is positive, "not great" negative, "the
acting is superb, but the plot is weak, and that ruins it" negative), so a model has to read the
sentence rather than spot a keyword.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

PER_CLASS = 300
SEED = 0


@dataclass(frozen=True)
class Domain:
    things: tuple[tuple[str, bool], ...]  # (noun phrase, is plural)
    pos: tuple[str, ...]          # positive predicates: "is {pos}"
    neg: tuple[str, ...]
    pos_word: tuple[str, ...]     # single positive adjectives, safe after "not", "very", "as ... as"
    neg_word: tuple[str, ...]
    faint: tuple[str, ...]        # what a bad item is "hardly"
    aspects: tuple[str, ...]      # singular parts judged in contrast sentences
    setbacks: tuple[str, ...]     # a bad start that a good item overcomes
    perks: tuple[str, ...]        # a good start that a bad item wastes
    closer_pos: tuple[str, ...]
    closer_neg: tuple[str, ...]
    devices: tuple[str, ...] = ()  # singular things that can stop working


MOVIES = Domain(
    things=tuple((t, False) for t in (
        "the movie", "this film", "the sequel", "the new season", "this documentary", "the remake",
        "the animated feature", "this thriller", "the comedy", "the series finale", "this horror film",
        "the musical")),
    pos=("a joy to watch", "beautifully shot", "wonderfully acted", "smart and warm", "funny from start to finish",
         "worth the ticket", "excellent", "one of the best I have seen this year"),
    neg=("a chore to sit through", "badly acted", "a mess from start to finish", "painfully slow", "far too long",
         "awful", "a real disappointment", "a waste of a good cast"),
    pos_word=("funny", "clever", "moving", "exciting", "original", "memorable", "charming", "gripping"),
    neg_word=("boring", "dull", "predictable", "confusing", "slow", "forgettable", "annoying", "bad"),
    faint=("memorable", "original", "exciting", "worth watching"),
    aspects=("the plot", "the acting", "the soundtrack", "the dialogue", "the ending", "the pacing",
             "the camera work", "the script"),
    setbacks=("the first twenty minutes drag", "the trailer looked awful", "the critics were harsh",
              "the cinema was freezing"),
    perks=("the poster is lovely", "the cast is famous", "the trailer looked great", "the opening scene is strong"),
    closer_pos=("I would watch it again.", "Go see it.", "Highly recommended.", "I left smiling.",
                "My whole family loved it."),
    closer_neg=("I nearly walked out.", "Skip it.", "I want my evening back.", "Not recommended.",
                "I fell asleep halfway."),
)

PRODUCTS = Domain(
    things=(("this blender", False), ("the headphones", True), ("this jacket", False), ("the keyboard", False),
            ("the coffee maker", False), ("the vacuum cleaner", False), ("this backpack", False),
            ("the desk lamp", False), ("the kettle", False), ("these running shoes", True),
            ("the office chair", False), ("this phone case", False), ("the umbrella", False),
            ("the wireless mouse", False), ("the tent", False), ("these curtains", True)),
    pos=("worth the price", "great value for money", "built to last", "a pleasure to use", "exactly as described",
         "better than I expected", "excellent", "a great buy"),
    neg=("a waste of money", "nothing like the photos", "badly put together", "far too expensive for what you get",
         "worse than I expected", "a real disappointment", "awful", "a complete letdown"),
    pos_word=("sturdy", "reliable", "well made", "easy to use", "good", "solid", "practical", "nicely designed"),
    neg_word=("flimsy", "unreliable", "cheap", "bad", "awkward", "fragile", "poorly made", "disappointing"),
    faint=("worth the money", "well made", "usable", "sturdy"),
    aspects=("the design", "the build quality", "the price", "the finish", "the size", "the colour"),
    setbacks=("delivery took ages", "the box arrived dented", "setup took a while", "the colour is slightly off"),
    perks=("delivery was fast", "the box looks nice", "the colour is lovely", "it was on sale"),
    closer_pos=("Would buy again.", "Highly recommended.", "No complaints so far.", "My partner wants one too.",
                "Five stars."),
    closer_neg=("Returned it after a week.", "Would not buy again.", "Avoid.", "Not recommended.", "One star."),
    devices=("this blender", "the keyboard", "the coffee maker", "the vacuum cleaner", "the desk lamp", "the kettle",
             "the wireless mouse", "this electric toothbrush"),
)

INTENSIFIERS = ("really", "surprisingly", "genuinely", "remarkably", "quite", "very")
GOOD = ("great", "excellent", "lovely", "fantastic", "spot on", "really good")
BAD = ("terrible", "awful", "poor", "weak", "dreadful", "a letdown")
MEH = ("a bit weak", "nothing special", "a little disappointing", "only average")

# Shared templates; {is}/{it} agree with the noun, {a}/{b} are two different aspects.
POSITIVE = (
    "{thing} {is} {pos}.",
    "{thing} {is} {very} {pos_word}.",
    "honestly, {thing} {is} not {neg_word} at all.",
    "not {neg_word} in the slightest: {thing} {is} {pos}.",
    "I expected {thing} to be {neg_word}, but {it} turned out to be {pos_word}.",
    "{thing} {is} {pos}. {closer_pos}",
    "{a} is {meh}, but {b} is {good}, and that makes up for it.",
    "I was worried {thing} would be {neg_word}, but I was wrong: {it} {is} {pos}.",
    "{thing} {is} not bad at all. {closer_pos}",
    "not once did I find {thing} {neg_word}.",
    "what a pleasant surprise: {thing} {is} {pos}.",
    "{setback}, but {thing} {is} still {pos}.",
)
NEGATIVE = (
    "{thing} {is} {neg}.",
    "{thing} {is} {very} {neg_word}.",
    "honestly, {thing} {is} not {pos_word} at all.",
    "{thing} {is} not as {pos_word} as everyone says.",
    "I wanted to like {thing}, but {it} {is} just {neg_word}.",
    "{thing} {is} {neg}. {closer_neg}",
    "{a} is {good}, but {b} is {bad}, and that ruins it.",
    "I was hoping {thing} would be {pos_word}, but {it} {is} {neg}.",
    "{thing} {is} not great. {closer_neg}",
    "{thing} {is} hardly {faint}.",
    "what a letdown: {thing} {is} {neg}.",
    "{perk}, but {thing} {is} still {neg}.",
)
# Templates that only make sense for devices.
PRODUCT_POSITIVE = ("{device} still works perfectly after {long_time}.",)
PRODUCT_NEGATIVE = ("{device} stopped working after {short_time}.",)
SHORT_TIMES = ("two days", "a week", "three uses", "a month")
LONG_TIMES = ("two years", "a year of daily use", "months of heavy use", "a whole winter")


def sentence(template: str, domain: Domain, rng: random.Random) -> str:
    thing, plural = rng.choice(domain.things)
    a, b = rng.sample(domain.aspects, 2)
    text = template.format(
        thing=thing, a=a, b=b, **{"is": "are" if plural else "is"},
        it="they" if plural else "it", device=rng.choice(domain.devices or ("",)),
        pos=rng.choice(domain.pos), neg=rng.choice(domain.neg),
        pos_word=rng.choice(domain.pos_word), neg_word=rng.choice(domain.neg_word),
        faint=rng.choice(domain.faint), very=rng.choice(INTENSIFIERS),
        good=rng.choice(GOOD), bad=rng.choice(BAD), meh=rng.choice(MEH),
        setback=rng.choice(domain.setbacks), perk=rng.choice(domain.perks),
        closer_pos=rng.choice(domain.closer_pos), closer_neg=rng.choice(domain.closer_neg),
        short_time=rng.choice(SHORT_TIMES), long_time=rng.choice(LONG_TIMES),
    )
    return text[0].upper() + text[1:]


def generate(per_class: int = PER_CLASS, seed: int = SEED) -> list[tuple[str, str]]:
    """``per_class`` distinct (sentence, label) pairs per label, shuffled; templates taken in turn."""
    rng = random.Random(seed)
    rows = []
    for label, shared, product_only in (("positive", POSITIVE, PRODUCT_POSITIVE),
                                        ("negative", NEGATIVE, PRODUCT_NEGATIVE)):
        choices = [(t, MOVIES) for t in shared] + [(t, PRODUCTS) for t in shared + product_only]
        seen: set[str] = set()
        turn = 0
        while len(seen) < per_class:
            template, domain = choices[turn % len(choices)]
            turn += 1
            text = sentence(template, domain, rng)
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    rng.shuffle(rows)
    return rows


def write(path: Path) -> None:
    lines = ["text\tlabel"] + [f"{text}\t{label}" for text, label in generate()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(Path(__file__).with_name("sentiment.tsv"))
