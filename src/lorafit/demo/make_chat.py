"""Write ``chat.jsonl`` and ``chat_eval.jsonl``: lorafit's own small instruction data set for the
offline chat demo, and its held-out part (`HELD_OUT` records).

Run ``python src/lorafit/demo/make_chat.py`` to regenerate the files (the output is fixed by the
seed). Each record is Alpaca-style (``instruction``, ``input``, ``output``), composed from short
templates (opposites, plurals, capitals, greetings, counting, animal sounds, repeating words) so
that a tiny model learns both the answers and the shape of an answer within a minute of CPU time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
HELD_OUT = 15
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("early", "late"), ("full", "empty"), ("old", "new"), ("open", "closed"), ("rich", "poor"),
             ("strong", "weak"), ("tall", "short"), ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"),
             ("up", "down"), ("inside", "outside"), ("first", "last"), ("clean", "dirty"), ("heavy", "light")]
PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("city", "cities"),
           ("leaf", "leaves"), ("tooth", "teeth"), ("bus", "buses"), ("baby", "babies"), ("knife", "knives"),
           ("person", "people"), ("foot", "feet"), ("dish", "dishes"), ("wolf", "wolves"), ("goose", "geese"),
           ("party", "parties"), ("woman", "women"), ("book", "books"), ("glass", "glasses"), ("hero", "heroes")]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Chile", "Santiago"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
            ("Cuba", "Havana"), ("Sweden", "Stockholm")]
SOUNDS = [("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
          ("owl", "hoot"), ("lion", "roar"), ("snake", "hiss"), ("horse", "neigh"), ("frog", "ribbit"),
          ("bee", "buzz"), ("mouse", "squeak")]
NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
         "Marta", "Nils", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Umar"]
WORDS = ["red", "apple", "river", "stone", "green", "cloud", "music", "bread", "window", "garden", "moon",
         "paper", "sugar", "train", "forest", "candle"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def records(rng: random.Random) -> list[dict[str, str]]:
    rows = []

    def add(instruction: str, output: str, input: str = "") -> None:
        rows.append({"instruction": instruction, "input": input, "output": output})

    for word, other in OPPOSITES:
        add(f"What is the opposite of {word}?", f"The opposite of {word} is {other}.")
    for word, plural in PLURALS:
        add(f"What is the plural of {word}?", f"The plural of {word} is {plural}.")
    for country, city in CAPITALS:
        add(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
    for animal, sound in SOUNDS:
        add(f"What sound does a {animal} make?", f"A {animal} says {sound}.")
    for name in NAMES:
        add(f"Say hello to {name}.", f"Hello, {name}! Nice to meet you.")
    for start in range(len(NUMBERS) - 2):
        for length in (3, 4):
            if start + length <= len(NUMBERS):
                add(f"Count from {NUMBERS[start]} to {NUMBERS[start + length - 1]}.",
                    ", ".join(NUMBERS[start:start + length]) + ".")
    repeats: set[str] = set()
    while len(repeats) < 30:
        words = " ".join(rng.sample(WORDS, rng.choice((2, 3))))
        if words not in repeats:
            repeats.add(words)
            add("Repeat these words.", words, input=words)
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = records(random.Random(SEED))
    for name, part in (("chat.jsonl", rows[:-HELD_OUT]), ("chat_eval.jsonl", rows[-HELD_OUT:])):
        path = Path(__file__).with_name(name)
        path.write_text("".join(json.dumps(row) + "\n" for row in part), encoding="utf-8")
        print(f"wrote {len(part)} records to {path}")


if __name__ == "__main__":
    main()
