"""Interaction logs → recommender preference rows: a user's history, a chosen item and rejected item(s).

Input: one event a row, in CSV (.csv), TSV (.tsv), Parquet (.parquet) or a RecBole atomic file (.inter,
tab-separated, header `name:type` such as `user_id:token  item_id:token  rating:float  timestamp:float`).
Columns: the user, the item, the time and one feedback column. Defaults: `user`, `item`, `timestamp`
(a .inter file: `user_id`, `item_id`, `timestamp`; a CSV without `user`/`item` may use `user_id`/`item_id`),
and the first of `rating`, `click`, `watch_time` the file has; `--user-col`, `--item-col`, `--time-col`,
`--feedback-col` rename them (`--feedback` says what the column means when its name does not). Ids are
kept as text; a time is a number (seconds) or a date. With `--items FILE` (a RecBole .item file, or a
CSV/TSV/Parquet with the item column) that file is the catalogue, and an item of the log missing from it is
an error; without it, the catalogue is every item of the log.

An event is positive when rating ≥ `--high`, click > 0 or watch_time ≥ `--min-watch` (every event when
the log has no feedback column, `--negatives sampled` only); negative when rating ≤ `--low`, click = 0 or
watch_time < `--min-watch`. Each user's events are sorted by time; two different events of a user with the
same time are an error (the order of the history would be a guess) unless `--on-duplicate-time
keep-file-order`; an exact duplicate row is dropped and counted.

A context is a positive event with at least `--min-history` earlier history items (the first event never
makes one: histories are never empty). Its history is the items of the user's strictly earlier events,
oldest first, the most recent `--max-history` of them: positive events only (`--history positive`, the
default) or every event (`--history all`). Its rejected items (`--negatives`):

- rating:  items the same user rated ≤ `--low`, nearest in time to the chosen event (before or after);
- skipped: items the user skipped (click = 0, watch_time < `--min-watch`) in the same session, nearest in
           time; a session ends where the user's next event is more than `--session-gap` seconds later.
           These rows also carry `candidates`: the session's items (the slate that was shown);
- sampled: items of the catalogue the user never interacted with, uniformly or in proportion to their
           number of events in the log (`--sample popularity`), seeded by `--seed`, the user and the event.

`--k K` rejected items a context: K = 1 writes `rejected` as one id, K > 1 as a list of K distinct ids
(an S-DPO group). The chosen item is never among its rejected. A context with fewer than K rejected items
available is skipped and counted (`too few negatives`); only when no context at all has K is it an error.

Output rows: {"user", "history": [ids, oldest first], "chosen", "rejected": id or [ids], "weight": 1.0
[, "candidates"]}, ids as strings, users in order of first appearance.

`--split leave-last-out`: per user with at least 3 contexts, the last context (the last positive event)
goes to OUT.test.jsonl, the one before to OUT.valid.jsonl (OUT without its .jsonl suffix), the rest to OUT.
The test context's history includes the valid item (it is an earlier event); no train context's history or
rejected items include the user's valid or test chosen items (unless the user consumed the same item earlier:
repeats are real history). Users with fewer than 3 contexts (sparse logs) go to OUT only, counted. A
held-out context short of rejected items is skipped and counted like any other (that user then lacks it).

Bad input — a missing column, a non-numeric rating or time, an empty id, an item not in `--items`, an empty
log, two events of a user at the same time — is one line naming the file and row, exit status 2.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, DpokitError
from .common import Built, write_jsonl

NAME = "interactions"
HELP = "interaction logs (CSV/TSV/Parquet, RecBole .inter) → user history, chosen vs rejected items"
INPUT_HELP = "the interaction log: .csv, .tsv, .parquet or a RecBole .inter file"
OUTPUT_HELP = ("the JSONL file to write (with --split leave-last-out: the train rows; OUT.valid.jsonl and "
               "OUT.test.jsonl beside it)")
FEEDBACK = ("rating", "click", "watch_time")
NEGATIVES = ("rating", "skipped", "sampled")
SPLITS = ("none", "leave-last-out")
LOG_SUFFIXES = (".csv", ".tsv", ".parquet", ".inter")


@dataclass
class Interactions(Built):
    """Rows per split ("train", and with leave-last-out "valid", "test"); `rows` is the train rows."""

    splits: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class Event:
    row: int
    user: str
    item: str
    time: float
    feedback: float | None


# ---------------------------------------------------------------- reading


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip", ".zst") and len(suffixes) > 1:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _read_table(path: Path, what: str):
    """The file as a pandas DataFrame of text cells (Parquet keeps its types), its columns stripped of RecBole
    `:type`, and the number of the first record's row (2 for text files: the header is row 1; 1 for Parquet)."""
    import pandas as pd

    name = str(path)
    if not path.is_file():
        raise DpokitError(f"{name}: no such {what} file")
    suffix = _suffix(path)
    if suffix not in LOG_SUFFIXES + (".item",):
        raise DpokitError(f"{name}: cannot read a {suffix or 'suffix-less'} file as {what} "
                          f"(expected {', '.join(LOG_SUFFIXES + ('.item',))})")
    if path.stat().st_size == 0:
        raise DataError(name, None, f"empty file: no {what}")
    try:
        if suffix == ".parquet":
            frame, first = pd.read_parquet(path), 1
        else:
            sep = "," if suffix == ".csv" else "\t"
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)  # a first row longer than the header
                frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False,
                                    index_col=False, quoting=3 if sep == "\t" else 0)
            first = 2
    except pd.errors.ParserWarning:
        raise DataError(name, 2, "more fields than the header has") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
        if m:
            raise DataError(name, int(m.group(2)), f"{m.group(3)} fields, the header has {m.group(1)}") from None
        raise DataError(name, None, f"cannot read {what}: {text}") from None
    frame.columns = [str(c).split(":", 1)[0].strip() if suffix in (".inter", ".item") else str(c).strip()
                     for c in frame.columns]
    return frame, first


def _pick(columns: list[str], given: str | None, defaults: tuple[str, ...], name: str, what: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(name, None, f"missing {what} column {given!r} (columns: {', '.join(columns)})")
        return given
    for c in defaults:
        if c in columns:
            return c
    raise DataError(name, None, f"missing {what} column {defaults[0]!r} (columns: {', '.join(columns)}; "
                                f"--{what}-col names another)")


def _ids(values, rows, name: str, what: str) -> list[str]:
    out = []
    for v, r in zip(values, rows):
        text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip()
        if not text:
            raise DataError(name, r, f"empty {what} id")
        out.append(text)
    return out


def _numbers(values, rows, name: str, what: str) -> list[float]:
    out = []
    for v, r in zip(values, rows):
        try:
            x = float(v) if not isinstance(v, bool) else None
        except (TypeError, ValueError):
            x = None
        if x is None or not math.isfinite(x):
            shown = "nothing" if v is None or (isinstance(v, str) and not v.strip()) else repr(v)
            raise DataError(name, r, f"{what} must be a number, got {shown}")
        out.append(x)
    return out


def _date(v) -> float | None:
    import pandas as pd

    try:
        t = pd.Timestamp(v)
    except (TypeError, ValueError):
        return None
    if t is pd.NaT:
        return None
    return (t.tz_localize("UTC") if t.tzinfo is None else t).timestamp()


def _times(values, rows, name: str) -> list[float]:
    """Numbers as they are (seconds); else, when the first cell that is no number is a date, dates (ISO text or
    datetime cells) as seconds since the epoch. A cell that fits neither is an error at its row."""
    try:
        return _numbers(values, rows, name, "timestamp")
    except DataError as numeric:
        value = values[rows.index(numeric.row)]
        if _date(value) is None:
            raise DataError(name, numeric.row, f"timestamp must be a number or a date, got {value!r}") from None
    out = []
    for v, r in zip(values, rows):
        t = _date(v)
        if t is None:
            raise DataError(name, r, f"timestamp must be a date like the others, got {v!r}")
        out.append(t)
    return out


def read_log(path: str | Path, user_col: str | None = None, item_col: str | None = None,
             time_col: str | None = None, feedback_col: str | None = None, feedback: str | None = None,
             need_feedback: bool = True) -> tuple[list[Event], str | None, Counter]:
    """The log's events (blank lines and exact duplicate rows dropped, counted), the feedback kind (one of
    FEEDBACK, or None when the log has none and `need_feedback` is False) and the counts."""
    path = Path(path)
    name = str(path)
    frame, first = _read_table(path, "interaction log")
    columns = list(frame.columns)
    recbole = _suffix(path) == ".inter"
    user_c = _pick(columns, user_col, ("user_id",) if recbole else ("user", "user_id"), name, "user")
    item_c = _pick(columns, item_col, ("item_id",) if recbole else ("item", "item_id"), name, "item")
    time_c = _pick(columns, time_col, ("timestamp",), name, "time")
    if feedback_col is not None:
        fb_c = _pick(columns, feedback_col, (feedback_col,), name, "feedback")
        kind = feedback or (feedback_col if feedback_col in FEEDBACK else None)
        if kind is None:
            raise DpokitError(f"--feedback-col {feedback_col!r}: say what it holds with --feedback "
                              f"{'|'.join(FEEDBACK)}")
    else:
        present = [c for c in ((feedback,) if feedback else FEEDBACK) if c in columns]
        fb_c = kind = present[0] if present else None
        if fb_c is None and need_feedback:
            raise DataError(name, None, f"missing a feedback column ({feedback or ', '.join(FEEDBACK)}) "
                                        f"(columns: {', '.join(columns)}; --feedback-col names another)")
    counts: Counter = Counter()
    keep = [c for c in (user_c, item_c, time_c, fb_c) if c is not None]
    frame = frame[keep]
    rows = [first + i for i in range(len(frame))]
    if first == 2:  # text: drop blank lines (every cell empty), keeping the others' line numbers
        blank = (frame.isna() | (frame == "")).all(axis=1).to_list()
        if any(blank):
            counts["blank lines"] += sum(blank)
            frame = frame[[not b for b in blank]]
            rows = [r for r, b in zip(rows, blank) if not b]
    if len(frame) == 0:
        raise DataError(name, None, "empty file: no events")
    users = _ids(frame[user_c].to_list(), rows, name, "user")
    items = _ids(frame[item_c].to_list(), rows, name, "item")
    times = _times(frame[time_c].to_list(), rows, name)
    values: list[float | None] = [None] * len(rows)
    if fb_c is not None:
        values = _numbers(frame[fb_c].to_list(), rows, name, kind)
        if kind in ("click", "watch_time"):
            for v, r in zip(values, rows):
                if v < 0:
                    raise DataError(name, r, f"{kind} must be ≥ 0, got {v:g}")
    events, seen = [], set()
    for r, u, i, t, v in zip(rows, users, items, times, values):
        key = (u, i, t, v)
        if key in seen:
            counts["duplicate rows"] += 1
            continue
        seen.add(key)
        events.append(Event(r, u, i, t, v))
    return events, kind, counts


def read_catalogue(path: str | Path, item_col: str | None = None) -> set[str]:
    """The item ids of a RecBole .item file (column item_id) or a CSV/TSV/Parquet (column item or item_id)."""
    return set(catalogue_ids(path, item_col))


GENRE_COLUMNS = ("class", "genre", "genres", "category", "categories")


def read_genres(path: str | Path | None) -> dict[str, frozenset[str]] | None:
    """Item id → its genres, from a RecBole `.item` file (a `class`/`genre`/`category` token_seq column, tokens
    separated by spaces) or a CSV with such a column (separated by `|`, else spaces); None when the file has no
    genre column (or is a plain list of ids)."""
    import csv

    if not path or Path(path).suffix.lower() not in (".item", ".csv"):
        return None
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DpokitError(f"{path}: cannot read ({e})") from None
    if p.suffix.lower() == ".item":
        header = [h.strip().split(":")[0] for h in (lines[0].split("\t") if lines else [])]
        rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]
        key, sep = "item_id", None
    else:
        rows, key, sep = list(csv.DictReader(lines)), "item", "|"
        header = list(rows[0]) if rows else []
    column = next((c for c in header if c.lower() in GENRE_COLUMNS), None)
    if column is None:
        return None
    out = {}
    for row in rows:
        text = (row.get(column) or "").strip()
        parts = text.split(sep) if sep and sep in text else text.split()
        out[str(row.get(key, "")).strip()] = frozenset(g.strip() for g in parts if g.strip())
    return out


def catalogue_ids(path: str | Path, item_col: str | None = None) -> list[str]:
    """The item ids of a catalogue file in the file's order (see `read_catalogue`)."""
    path = Path(path)
    frame, first = _read_table(path, "item catalogue")
    columns = list(frame.columns)
    defaults = ("item_id",) if _suffix(path) in (".item", ".inter") else ("item", "item_id")
    col = item_col if item_col in columns else None
    c = _pick(columns, col, defaults, str(path), "item")
    values = frame[c].to_list()
    rows = [first + k for k in range(len(values))]
    kept = [(v, r) for v, r in zip(values, rows) if not (first == 2 and v == "")]
    if not kept:
        raise DataError(str(path), None, "empty file: no items")
    return list(dict.fromkeys(_ids([v for v, _ in kept], [r for _, r in kept], str(path), "item")))


# ---------------------------------------------------------------- contexts


def _positive(kind: str | None, v: float | None, high: float, min_watch: float) -> bool:
    if kind is None:
        return True
    return v >= high if kind == "rating" else v > 0 if kind == "click" else v >= min_watch


def _negative(kind: str | None, v: float | None, low: float, min_watch: float) -> bool:
    if kind is None:
        return False
    return v <= low if kind == "rating" else v <= 0 if kind == "click" else v < min_watch


def _nearest(pool: list[tuple[float, str]], times: list[float], t: float, k: int, exclude: set[str]) -> list[str]:
    """Up to k distinct items of `pool` (time-sorted (time, item)) nearest to t, an earlier one first on a tie."""
    right = bisect.bisect_left(times, t)
    left = right - 1
    out: list[str] = []
    taken = set(exclude)
    while len(out) < k and (left >= 0 or right < len(pool)):
        if right >= len(pool) or (left >= 0 and t - pool[left][0] <= pool[right][0] - t):
            item, left = pool[left][1], left - 1
        else:
            item, right = pool[right][1], right + 1
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


class _Sampler:
    """Items of the catalogue, uniformly or by popularity, never one the user interacted with."""

    def __init__(self, catalogue: list[str], popularity: Counter | None):
        self.items = catalogue
        self.cum = None
        if popularity is not None:
            self.items = [i for i in catalogue if popularity[i] > 0]
            total, self.cum = 0, []
            for i in self.items:
                total += popularity[i]
                self.cum.append(total)

    def available(self, taken: set[str]) -> int:
        return len(self.items) - sum(1 for i in taken if i in self._set)

    @property
    def _set(self) -> set[str]:
        if not hasattr(self, "_items_set"):
            self._items_set = set(self.items)
        return self._items_set

    def sample(self, rng: random.Random, k: int, taken: set[str], available: int) -> list[str]:
        if available < k:
            return []
        out: list[str] = []
        seen = set(taken)
        for _ in range(50 * k + 100):  # rejection sampling: fast while the user has a small share of the items
            if self.cum is None:
                item = self.items[rng.randrange(len(self.items))]
            else:
                item = self.items[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]
            if item not in seen:
                seen.add(item)
                out.append(item)
                if len(out) == k:
                    return out
        rest = [i for i in self.items if i not in seen]  # a heavy user: sample from the explicit remainder
        if self.cum is None:
            return out + rng.sample(rest, k - len(out))
        weights = {i: self.cum[j] - (self.cum[j - 1] if j else 0) for j, i in enumerate(self.items)}
        keyed = sorted(rest, key=lambda i: -(rng.random() ** (1.0 / weights[i])))  # Efraimidis–Spirakis
        return out + keyed[:k - len(out)]


def _sort_user(events: list[Event], name: str, keep_file_order: bool) -> list[Event]:
    events = sorted(events, key=lambda e: (e.time, e.row))
    if not keep_file_order:
        for a, b in zip(events, events[1:]):
            if a.time == b.time:
                raise DataError(name, b.row, f"user {a.user!r} has another event at the same time {a.time:.15g} "
                                             f"(row {a.row}): their order is unknown (--on-duplicate-time "
                                             "keep-file-order takes the file's order)")
    return events


def interactions_to_rows(path: str | Path, negatives: str = "rating", k: int = 1, split: str = "none",
                         user_col: str | None = None, item_col: str | None = None, time_col: str | None = None,
                         feedback_col: str | None = None, feedback: str | None = None, items: str | Path | None = None,
                         high: float = 4.0, low: float = 2.0, min_watch: float = 1.0, session_gap: float = 1800.0,
                         sample: str = "uniform", min_history: int = 1, max_history: int = 50,
                         history: str = "positive", on_duplicate_time: str = "error", seed: int = 0) -> Interactions:
    if negatives not in NEGATIVES:
        raise DpokitError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
    if split not in SPLITS:
        raise DpokitError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if k < 1:
        raise DpokitError(f"--k must be ≥ 1, got {k}")
    if min_history < 1 or max_history < min_history:
        raise DpokitError(f"need 1 ≤ --min-history ≤ --max-history, got {min_history} and {max_history}")
    if low >= high:
        raise DpokitError(f"--low must be below --high, got {low:g} and {high:g}")
    name = str(path)
    events, kind, counts = read_log(path, user_col, item_col, time_col, feedback_col, feedback,
                                    need_feedback=negatives != "sampled")
    if negatives == "rating" and kind != "rating":
        raise DpokitError(f"{name}: --negatives rating needs a rating column, the feedback here is {kind}")
    if negatives == "skipped" and kind not in ("click", "watch_time"):
        raise DpokitError(f"{name}: --negatives skipped needs a click or watch_time column, the feedback here is "
                          f"{kind}")
    if items is not None:
        catalogue = read_catalogue(items, item_col)
        for e in events:
            if e.item not in catalogue:
                raise DataError(name, e.row, f"item {e.item!r} is not in the catalogue {items}")
    else:
        catalogue = {e.item for e in events}
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user].append(e)
    sampler = None
    if negatives == "sampled":
        sampler = _Sampler(sorted(catalogue), Counter(e.item for e in events) if sample == "popularity" else None)
    out = Interactions()
    out.counts.update(users=len(by_user), events=len(events))
    per_split: dict[str, list[dict]] = {"train": []} | ({"valid": [], "test": []} if split != "none" else {})
    dropped: Counter = Counter()
    contexts = 0
    most_available = 0
    for user, evs in by_user.items():
        evs = _sort_user(evs, name, on_duplicate_time == "keep-file-order")
        user_items = {e.item for e in evs}
        user_avail = sampler.available(user_items) if sampler is not None else 0
        pos = [_positive(kind, e.feedback, high, min_watch) for e in evs]
        neg = [_negative(kind, e.feedback, low, min_watch) for e in evs]
        in_history = pos if history == "positive" else [True] * len(evs)
        session = [0] * len(evs)
        for j in range(1, len(evs)):
            session[j] = session[j - 1] + (evs[j].time - evs[j - 1].time > session_gap)
        # the user's contexts: positive events with enough history before them
        ctx: list[tuple[int, list[str]]] = []
        hist: list[str] = []
        for j, e in enumerate(evs):
            if pos[j]:
                if len(hist) >= min_history:
                    ctx.append((j, hist[-max_history:]))
                elif j == 0:
                    dropped["first event"] += 1
                else:
                    dropped["short history"] += 1
            if in_history[j]:
                hist.append(e.item)
        contexts += len(ctx)
        labels = ["train"] * len(ctx)
        held_out: set[str] = set()
        if split == "leave-last-out":
            if len(ctx) >= 3:
                labels[-1], labels[-2] = "test", "valid"
                held_out = {evs[ctx[-1][0]].item, evs[ctx[-2][0]].item}
            elif ctx:
                dropped["users train only"] += 1
        pools: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))  # session (0: all) → (pool, times)
        slates: dict[int, list[str]] = defaultdict(list)
        if negatives != "sampled":
            for j, e in enumerate(evs):
                s = session[j] if negatives == "skipped" else 0
                if neg[j]:
                    pools[s][0].append((e.time, e.item))
                    pools[s][1].append(e.time)
                if negatives == "skipped" and e.item not in slates[s]:
                    slates[s].append(e.item)
        for (j, hist_j), label in zip(ctx, labels):
            e = evs[j]
            exclude = {e.item} | (held_out - {e.item} if label == "train" else set())
            extra: dict[str, Any] = {}
            if negatives == "sampled":
                rng = random.Random(f"{seed}:{user}:{j}")
                avail = user_avail
                rejected = sampler.sample(rng, k, user_items, user_avail)
            else:
                s = session[j] if negatives == "skipped" else 0
                pool, times = pools[s] if s in pools else ([], [])
                rejected = _nearest(pool, times, e.time, k, exclude)
                avail = len(rejected)
                if negatives == "skipped":
                    extra["candidates"] = list(slates[s])
            most_available = max(most_available, avail)
            if len(rejected) < k:
                dropped["too few negatives"] += 1
                continue
            row = {"user": user, "history": list(hist_j), "chosen": e.item,
                   "rejected": rejected[0] if k == 1 else rejected, "weight": 1.0, **extra}
            per_split[label].append(row)
    out.counts["contexts"] = contexts
    if contexts and not any(per_split.values()):
        raise DpokitError(f"{name}: no context has {k} rejected item{'s' if k > 1 else ''} "
                          f"(--negatives {negatives}; the most any context has is {most_available})")
    unit = "groups" if k > 1 else "pairs"
    for label, rows in per_split.items():
        out.counts[f"{label} {unit}"] = len(rows)
    if dropped["users train only"]:
        out.counts["users train only"] = dropped.pop("users train only")
    for reason, n in (counts + dropped).items():
        out.counts[f"dropped {reason}"] = n
    out.splits = per_split
    out.rows = per_split["train"]
    return out


# ---------------------------------------------------------------- command line


def split_paths(output: str | Path) -> dict[str, Path]:
    """OUT → {"train": OUT, "valid": OUT.valid.jsonl, "test": OUT.test.jsonl} (OUT without a .jsonl suffix)."""
    output = Path(output)
    stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return {"train": output, "valid": output.with_name(stem + ".valid.jsonl"),
            "test": output.with_name(stem + ".test.jsonl")}


def add_arguments(p) -> None:
    p.add_argument("--negatives", choices=NEGATIVES, default="rating",
                   help="rejected items: low-rated by the user (default), skipped in the session, or sampled")
    p.add_argument("--k", type=int, default=1, help="rejected items per context; K > 1 writes S-DPO groups")
    p.add_argument("--split", choices=SPLITS, default="none",
                   help="leave-last-out: each user's last context → OUT.test.jsonl, the one before → "
                        "OUT.valid.jsonl")
    p.add_argument("--user-col", default=None, help="default: user (user_id in a .inter file)")
    p.add_argument("--item-col", default=None, help="default: item (item_id in a .inter/.item file)")
    p.add_argument("--time-col", default=None, help="default: timestamp")
    p.add_argument("--feedback-col", default=None, help="default: the first of rating, click, watch_time")
    p.add_argument("--feedback", choices=FEEDBACK, default=None, help="what --feedback-col holds")
    p.add_argument("--items", default=None, help="the item catalogue: a RecBole .item file, or CSV/TSV/Parquet")
    p.add_argument("--high", type=float, default=4.0, help="a rating ≥ this is positive")
    p.add_argument("--low", type=float, default=2.0, help="a rating ≤ this is negative")
    p.add_argument("--min-watch", type=float, default=1.0, help="a watch_time below this is skipped")
    p.add_argument("--session-gap", type=float, default=1800.0,
                   help="seconds between a user's events that end a session (--negatives skipped)")
    p.add_argument("--sample", choices=("uniform", "popularity"), default="uniform",
                   help="how --negatives sampled draws items")
    p.add_argument("--min-history", type=int, default=1)
    p.add_argument("--max-history", type=int, default=50, help="keep the most recent this many history items")
    p.add_argument("--history", choices=("positive", "all"), default="positive",
                   help="which earlier events make the history")
    p.add_argument("--on-duplicate-time", choices=("error", "keep-file-order"), default="error",
                   help="two events of a user at the same time: an error (default) or the file's order")
    p.add_argument("--seed", type=int, default=0)


def build(args) -> Interactions:
    sources = {Path(p).resolve() for p in (args.input, args.items) if p is not None}
    for out in (split_paths(args.output).values() if args.split != "none" else [Path(args.output)]):
        if out.resolve() in sources:
            raise DpokitError(f"{out}: the output would overwrite an input")
    return interactions_to_rows(args.input, args.negatives, args.k, args.split, args.user_col, args.item_col,
                                args.time_col, args.feedback_col, args.feedback, args.items, args.high, args.low,
                                args.min_watch, args.session_gap, args.sample, args.min_history, args.max_history,
                                args.history, args.on_duplicate_time, args.seed)


def write(built: Interactions, output: str | Path) -> int:
    """The train rows to OUT and, when split, valid/test beside it; returns the train rows' count."""
    paths = split_paths(output)
    n = 0
    for label, rows in built.splits.items():
        k = write_jsonl(rows, paths[label])
        if label == "train":
            n = k
        else:
            print(f"wrote {k} rows to {paths[label]}")
    return n
