"""`dpokit data validate FILE`: everything about a preference file in one report.

Every row goes through the loader's own code — the reader (`iter_rows`), the row checks
(`row_to_pair`) and, given a tokenizer, the tokenizer step (`tokenize_pair`) with the same
`max_length`/`max_prompt_length` — so each problem reported is one that training would
raise (on_bad_row=error) or skip (on_bad_row=skip), with the same words. On top: counts,
length statistics (characters, and tokens with a tokenizer), how many rows truncation
would cut, repeated pairs, prompts with several pairs, contradicting pairs (A over B in
one row, B over A in another), pairs whose replies differ only in whitespace, and the
per-pair weights and margins.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data import Pair, RowProblem, iter_rows, row_to_item, tokenize_item
from ..data.readers import describe
from .common import same_text


@dataclass
class Report:
    source: str
    rows: int = 0
    usable: int = 0
    problems: dict[str, list[int]] = field(default_factory=dict)  # problem → row numbers
    kinds: dict[str, int] = field(default_factory=dict)  # pair / group (S-DPO) / unpaired (KTO) → rows
    identical: int = 0  # replies equal (rejected by the loader) or equal up to whitespace (accepted, useless)
    repeated_pairs: int = 0  # rows that repeat an earlier row's prompt, chosen and rejected
    prompts_with_several_pairs: int = 0
    contradicting_pairs: int = 0  # (prompt, A, B) and (prompt, B, A) both present
    chars: dict[str, dict] = field(default_factory=dict)  # prompt/chosen/rejected → stats
    tokens: dict[str, dict] = field(default_factory=dict)
    truncated_prompt: int = 0
    truncated_completion: int = 0
    weights: dict[str, Any] = field(default_factory=dict)
    margins: dict[str, Any] = field(default_factory=dict)

    @property
    def bad_rows(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "bad_rows": self.bad_rows}, indent=2)


def _length(value) -> int:
    return len(value) if isinstance(value, str) else sum(len(str(m.get("content", ""))) for m in value)


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]  # noqa: E731 - nearest-rank quantile
    return {"min": v[0], "median": pick(0.5), "mean": round(sum(v) / len(v), 2), "p95": pick(0.95), "max": v[-1]}


def _key(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def validate(source: Any, tokenizer=None, max_length: int | None = None,
             max_prompt_length: int | None = None) -> Report:
    report = Report(describe(source))
    chars: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    tokens: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    seen: dict[tuple, int] = {}
    by_prompt: dict[str, int] = {}
    weights, margins = [], []
    for number, row in iter_rows(source):
        report.rows += 1
        try:
            if isinstance(row, RowProblem):
                raise row
            pair = row_to_item(row)
            if tokenizer is not None:
                whole = tokenize_item(pair, tokenizer, None, None)
                tokenize_item(pair, tokenizer, max_length, max_prompt_length)  # what training would do
        except RowProblem as e:
            report.problems.setdefault(str(e), []).append(number)
            if "identical" in str(e):
                report.identical += 1
            continue
        report.usable += 1
        kind = {"Pair": "pair", "Group": "group", "Unpaired": "unpaired"}[type(pair).__name__]
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        if not isinstance(pair, Pair):  # the pair statistics below compare one chosen with one rejected
            continue
        if same_text(pair.chosen, pair.rejected):
            report.identical += 1
        for name in chars:
            chars[name].append(_length(getattr(pair, name)))
        if tokenizer is not None:
            p, c, r = len(whole.prompt_ids), len(whole.chosen_ids), len(whole.rejected_ids)
            tokens["prompt"].append(p), tokens["chosen"].append(c), tokens["rejected"].append(r)
            kept_prompt = min(p, max_prompt_length) if max_prompt_length is not None else p
            report.truncated_prompt += kept_prompt < p
            report.truncated_completion += max_length is not None and kept_prompt + max(c, r) > max_length
        key = (_key(pair.prompt), _key(pair.chosen), _key(pair.rejected))
        if key in seen:
            report.repeated_pairs += 1
        elif (key[0], key[2], key[1]) in seen:
            report.contradicting_pairs += 1
        seen.setdefault(key, number)
        by_prompt[key[0]] = by_prompt.get(key[0], 0) + 1
        weights.append(pair.weight)
        margins.append(pair.margin)
    report.prompts_with_several_pairs = sum(1 for n in by_prompt.values() if n > 1)
    report.chars = {k: _stats(v) for k, v in chars.items()}
    report.tokens = {k: _stats(v) for k, v in tokens.items() if v}
    if weights:
        report.weights = {**_stats(weights), "not_one": sum(w != 1 for w in weights),
                          "zero": sum(w == 0 for w in weights)}
        report.margins = {**_stats(margins), "nonzero": sum(m != 0 for m in margins)}
    return report


def validate_with(source: Any, check, whole, max_prompt_length: int | None = None) -> Report:
    """The report for a family's own rows (`dpokit data validate --family NAME`): each row through the family's
    `row_check` — `check` encodes it as training would, `whole` without truncation, for the token lengths — so
    the problems are the family loader's, in its words. Text statistics (characters, duplicates) are the causal
    LM's and are left out."""
    report = Report(describe(source))
    tokens: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    for number, row in iter_rows(source):
        report.rows += 1
        try:
            if isinstance(row, RowProblem):
                raise row
            ex, full = check(row), whole(row)
        except RowProblem as e:
            report.problems.setdefault(str(e), []).append(number)
            if "identical" in str(e):
                report.identical += 1
            continue
        report.usable += 1
        report.kinds["pair"] = report.kinds.get("pair", 0) + 1
        for name in tokens:
            tokens[name].append(len(getattr(full, f"{name}_ids")))
        report.truncated_prompt += len(ex.prompt_ids) < len(full.prompt_ids)
        report.truncated_completion += (len(ex.chosen_ids), len(ex.rejected_ids)) != (len(full.chosen_ids),
                                                                                       len(full.rejected_ids))
    report.tokens = {k: _stats(v) for k, v in tokens.items() if v}
    return report


def format_report(r: Report, max_length: int | None = None, max_prompt_length: int | None = None) -> str:
    lines = [f"{r.source}: {r.rows} rows, {r.usable} usable, {r.bad_rows} with problems"]
    if set(r.kinds) - {"pair"}:
        lines.append("row kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(r.kinds.items())))
    if r.problems:
        lines.append("problems (training stops at the first with on_bad_row=error; on_bad_row=skip drops them):")
        for problem, rows in sorted(r.problems.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
            lines.append(f"  {problem} — {len(rows)} row{'s' if len(rows) > 1 else ''}: {shown}")
    lines.append(f"identical pairs: {r.identical}; repeated pairs: {r.repeated_pairs}; prompts with several pairs: "
                 f"{r.prompts_with_several_pairs}; contradicting pairs: {r.contradicting_pairs}")
    for unit, table in (("characters", r.chars), ("tokens", r.tokens)):
        if table and any(table.values()):
            lines.append(f"{unit:<12}{'min':>8}{'median':>8}{'mean':>10}{'p95':>8}{'max':>8}")
            for name, s in table.items():
                if s:
                    lines.append(f"  {name:<10}{s['min']:>8}{s['median']:>8}{s['mean']:>10}{s['p95']:>8}{s['max']:>8}")
    if r.tokens:
        lines.append(f"truncated: {r.truncated_prompt} prompts by max_prompt_length={max_prompt_length}, "
                     f"{r.truncated_completion} pairs by max_length={max_length}")
    if r.weights and (r.weights["not_one"] or r.margins["nonzero"]):
        lines.append(f"weights: {r.weights['not_one']} not 1 ({r.weights['zero']} zero), range "
                     f"{r.weights['min']:.4g}..{r.weights['max']:.4g}; margins: {r.margins['nonzero']} nonzero, range "
                     f"{r.margins['min']:.4g}..{r.margins['max']:.4g}")
    return "\n".join(lines)
