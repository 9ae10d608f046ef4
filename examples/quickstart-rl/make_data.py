"""Writes the reinforcement quickstart's prompts: short stories that name a person and a city, and a question whose
answer is the city, to be answered with the city's name alone. `answer` is the field the grader checks.

    python examples/quickstart-rl/make_data.py   # writes train.jsonl and eval.jsonl beside this file

The held-out prompts (eval.jsonl) use names, cities and story templates that no training prompt uses, so the
eval measures the skill (answer with the city alone), not memorised pairs. Deterministic: the same files each run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = (
    "Maria Tom Aisha Kenji Lars Priya Omar Chloe Diego Yuki Ivan Nora Hugo Leila Mateo Sven Amara Felix Ingrid Ravi "
    "Zara Pablo Mei Tariq Elena Jonas Fatima Bruno Anika Karim Sofia Emil Noor Hector Lina Viktor Ada Tomas Rosa Malik "
    "Greta Samir Hana Oskar Lucia Idris Freya Marco Dalia Anton Selma Rafael Ines Kofi Vera Nils Layla Otto Carmen Ali"
).split()
CITIES = (
    "Lisbon Denver Cairo Osaka Bergen Pune Tunis Lyon Quito Sapporo Kazan Perth Porto Austin Dakar Kyoto Malmo Jaipur "
    "Fez Nantes Lima Sendai Samara Hobart Genoa Boise Accra Nagoya Aarhus Surat Oran Lille Cusco Kobe Omsk Darwin "
    "Turin "
    "Tulsa Lagos Hiroshima Uppsala Indore Sfax Rennes Arequipa Nara Tomsk Cairns Bari Reno Kumasi Fukuoka Odense Agra "
    "Annaba Dijon Trujillo Kochi Perm Geelong"
).split()
STORIES = [
    ("{n} moved to {c} in {y} to work as a teacher.", "Which city did {n} move to?"),
    ("In {y}, {n} opened a small bakery in {c}.", "In which city did {n} open the bakery?"),
    ("{n} was born in {c} and still visits every summer.", "Where was {n} born?"),
    ("After years abroad, {n} settled in {c} with two cats.", "Which city did {n} settle in?"),
    ("{n} took the night train to {c} for a job interview.", "Where did {n} go for the interview?"),
    ("The conference in {c} was the first one {n} ever spoke at.", "Which city hosted the conference?"),
    ("{n} spent the winter of {y} fixing bicycles in {c}.", "In which city did {n} fix bicycles?"),
    ("{n} sent a postcard from {c} to an old friend.", "Which city was the postcard sent from?"),
]
ASK = "Reply with only the city name."


def prompts(names, cities, stories, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        name, city = rng.choice(names), rng.choice(cities)
        story, question = rng.choice(stories)
        y = rng.randint(1975, 2024)
        text = f"{story.format(n=name, c=city, y=y)} {question.format(n=name)} {ASK}"
        rows.append({"messages": [{"role": "user", "content": text}], "answer": city})
    return rows


def main(out: Path | None = None) -> None:
    rng = random.Random(7)
    here = out or Path(__file__).parent
    # Training prompts: 45 names, 45 cities, 6 story templates; held out: the other names, cities and templates.
    train = prompts(NAMES[:45], CITIES[:45], STORIES[:6], 480, rng)
    held_out = prompts(NAMES[45:], CITIES[45:], STORIES[6:], 48, rng)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(here / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
