"""`dpokit data build interactions`: interaction logs → (user, history, chosen, rejected) rows, on small synthetic
logs written here (CSV, TSV, Parquet, RecBole .inter + .item)."""

import json
import random

import pytest

from dpokit.cli import main
from dpokit.errors import DataError, DpokitError
from dpokit.recipes.interactions import interactions_to_rows, split_paths


def _csv(path, rows, header=("user", "item", "rating", "timestamp"), sep=","):
    path.write_text(sep.join(header) + "\n" + "".join(sep.join(str(c) for c in r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rating_log(n_users=4, n_events=12, seed=0):
    """Each user rates distinct items at increasing times (events written in shuffled order): ratings 1..5."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        items = rng.sample(range(100), n_events)
        for t, i in enumerate(items):
            rows.append((f"u{u}", f"i{i}", rng.choice([1, 2, 3, 4, 5]), 1000 * u + 10 * t))
    rng.shuffle(rows)
    return rows


def _by_user(rows):
    out = {}
    for u, i, r, t in rows:
        out.setdefault(u, []).append((t, i, r))
    return {u: sorted(v) for u, v in out.items()}


# ---------------------------------------------------------------- contexts and rating negatives


def test_histories_are_strictly_earlier_events_and_rejected_are_the_users_low_rated_items(tmp_path):
    rows = _rating_log()
    log = _csv(tmp_path / "log.csv", rows)
    built = interactions_to_rows(log, negatives="rating", k=1)
    events = _by_user(rows)
    assert built.rows
    for row in built.rows:
        seq = events[row["user"]]
        times = {i: t for t, i, _ in seq}
        ratings = {i: r for _, i, r in seq}
        t = times[row["chosen"]]
        assert ratings[row["chosen"]] >= 4
        assert row["history"] == [i for ti, i, r in seq if ti < t and r >= 4][-50:]  # positive, earlier, in order
        assert row["history"]  # never empty
        assert ratings[row["rejected"]] <= 2 and row["rejected"] != row["chosen"]
        # nearest in time among the user's low-rated items
        lows = [abs(ti - t) for ti, i, r in seq if r <= 2]
        assert abs(times[row["rejected"]] - t) == min(lows)
        assert row["weight"] == 1.0 and isinstance(row["user"], str)
    assert built.counts["contexts"] >= len(built.rows)


def test_history_all_and_max_history(tmp_path):
    rows = [("u", f"i{t}", 5 if t % 2 == 0 else 1, t) for t in range(10)]
    log = _csv(tmp_path / "log.csv", rows)
    built = interactions_to_rows(log, history="all", max_history=3)
    last = built.rows[-1]
    assert last["chosen"] == "i8" and last["history"] == ["i5", "i6", "i7"]
    assert all(len(r["history"]) <= 3 for r in built.rows)


def test_groups_have_k_distinct_items_and_short_contexts_are_skipped(tmp_path):
    rows = _rating_log(n_users=3, n_events=30, seed=1)
    built = interactions_to_rows(_csv(tmp_path / "log.csv", rows), negatives="rating", k=3)
    assert built.rows
    for row in built.rows:
        assert isinstance(row["rejected"], list) and len(set(row["rejected"])) == 3
        assert row["chosen"] not in row["rejected"]
    # a user with only two low-rated items cannot fill a group of 3: skipped and counted, no error
    few = [("a", "x1", 5, 1), ("a", "x2", 1, 2), ("a", "x3", 5, 3), ("a", "x4", 1, 4), ("a", "x5", 5, 5)]
    built = interactions_to_rows(_csv(tmp_path / "few.csv", rows + few), k=3)
    assert built.counts["dropped too few negatives"] >= 2
    assert not any(r["user"] == "a" for r in built.rows)


# ---------------------------------------------------------------- sampled negatives (Parquet)


def test_sampled_negatives_are_never_the_users_items_and_are_seeded(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = _rating_log(n_users=5, n_events=15, seed=2)
    log = tmp_path / "log.parquet"
    pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).to_parquet(log)
    events = _by_user(rows)
    for sample in ("uniform", "popularity"):
        a = interactions_to_rows(log, negatives="sampled", k=4, sample=sample, seed=7)
        b = interactions_to_rows(log, negatives="sampled", k=4, sample=sample, seed=7)
        c = interactions_to_rows(log, negatives="sampled", k=4, sample=sample, seed=8)
        assert a.rows == b.rows and a.rows != c.rows
        catalogue = {i for _, i, _, _ in rows}
        for row in a.rows:
            mine = {i for _, i, _ in events[row["user"]]}
            assert len(set(row["rejected"])) == 4
            assert not set(row["rejected"]) & mine and set(row["rejected"]) <= catalogue


def test_sampled_without_feedback_column_treats_every_event_as_positive(tmp_path):
    log = _csv(tmp_path / "log.csv", [("u", "a", 1), ("u", "b", 2), ("v", "c", 1), ("v", "d", 2)],
               header=("user", "item", "timestamp"))
    built = interactions_to_rows(log, negatives="sampled")
    assert [(r["user"], r["history"], r["chosen"]) for r in built.rows] == [("u", ["a"], "b"), ("v", ["c"], "d")]
    assert built.rows[0]["rejected"] in ("c", "d") and built.rows[1]["rejected"] in ("a", "b")


# ---------------------------------------------------------------- skipped (clicks, sessions)


def test_skipped_negatives_come_from_the_same_session(tmp_path):
    rows = [("u", "a", 1, 0), ("u", "b", 0, 10), ("u", "c", 1, 20), ("u", "d", 0, 30),
            ("u", "e", 0, 10_000), ("u", "f", 1, 10_010)]  # two sessions (gap > 1800 s)
    log = _csv(tmp_path / "log.tsv", rows, header=("user", "item", "click", "timestamp"), sep="\t")
    built = interactions_to_rows(log, negatives="skipped")
    got = {r["chosen"]: r for r in built.rows}
    assert got["c"]["history"] == ["a"] and got["c"]["rejected"] in ("b", "d")
    assert got["c"]["candidates"] == ["a", "b", "c", "d"]
    assert got["f"]["rejected"] == "e" and got["f"]["history"] == ["a", "c"] and got["f"]["candidates"] == ["e", "f"]


# ---------------------------------------------------------------- RecBole atomic files


def test_recbole_inter_and_item_files(tmp_path):
    inter = tmp_path / "toy.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     "1\t10\t5\t100\n1\t11\t1\t101\n1\t12\t4\t102\n2\t10\t4\t50\n2\t13\t5\t60\n2\t11\t2\t70\n")
    item = tmp_path / "toy.item"
    item.write_text('item_id:token\tmovie_title:token_seq\tclass:token_seq\n10\t"A" film\tx y\n11\tB\tx\n'
                    "12\tC\ty\n13\tD\tz\n")
    built = interactions_to_rows(inter, items=item)
    assert [(r["user"], r["history"], r["chosen"], r["rejected"]) for r in built.rows] == [
        ("1", ["10"], "12", "11"), ("2", ["10"], "13", "11")]
    item.write_text("item_id:token\n10\n11\n12\n")
    with pytest.raises(DataError, match=r"toy.inter, row 6: item '13' is not in the catalogue"):
        interactions_to_rows(inter, items=item)


# ---------------------------------------------------------------- leave-last-out


def test_leave_last_out_puts_the_last_positive_in_test_without_leaking_it(tmp_path, capsys):
    rows = _rating_log(n_users=6, n_events=20, seed=3)
    log = _csv(tmp_path / "log.csv", rows)
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "build", "interactions", str(log), str(out), "--split", "leave-last-out"]) == 0
    printed = capsys.readouterr().out
    assert "test pairs:" in printed and "valid pairs:" in printed and "train pairs:" in printed
    paths = split_paths(out)
    assert paths["valid"].name == "pairs.valid.jsonl" and paths["test"].name == "pairs.test.jsonl"
    train, valid, test = (_read(paths[s]) for s in ("train", "valid", "test"))
    events = _by_user(rows)
    for u, seq in events.items():
        positives = [i for t, i, r in seq if r >= 4]
        (t_row,) = [r for r in test if r["user"] == u]
        (v_row,) = [r for r in valid if r["user"] == u]
        assert t_row["chosen"] == positives[-1] and v_row["chosen"] == positives[-2]
        assert v_row["chosen"] in t_row["history"]  # the test history includes the valid item: it came earlier
        assert t_row["chosen"] not in v_row["history"]
        for r in (r for r in train if r["user"] == u):
            assert t_row["chosen"] not in r["history"] and v_row["chosen"] not in r["history"]
            assert r["rejected"] not in (t_row["chosen"], v_row["chosen"])
            assert r["chosen"] in positives[:-2]


def test_sparse_logs_work(tmp_path):
    rng = random.Random(4)
    rows, t = [], 0
    for u in range(200):  # most users have one or two events
        n = rng.choice([1, 1, 1, 2, 2, 5])
        for _ in range(n):
            t += 1
            rows.append((f"u{u}", f"i{rng.randrange(500)}", rng.choice([1, 5]), t))
    log = _csv(tmp_path / "sparse.csv", rows)
    for negatives in ("rating", "sampled"):
        out = tmp_path / f"{negatives}.jsonl"
        assert main(["data", "build", "interactions", str(log), str(out), "--negatives", negatives,
                     "--split", "leave-last-out"]) == 0
        train = _read(out)
        assert all(r["history"] for r in train)
    # a log where every user has a single event: no context at all, still no crash
    single = _csv(tmp_path / "single.csv", [(f"u{u}", f"i{u}", 5, u) for u in range(5)])
    built = interactions_to_rows(single, negatives="sampled", split="leave-last-out")
    assert built.counts["contexts"] == 0 and built.counts["dropped first event"] == 5


def test_equal_times_with_keep_file_order(tmp_path):
    log = _csv(tmp_path / "log.csv", [("u", "a", 5, 1), ("u", "b", 5, 1), ("u", "c", 1, 1), ("u", "a", 5, 1)])
    with pytest.raises(DataError, match=r"log.csv, row 3: user 'u' has another event at the same time"):
        interactions_to_rows(log)
    built = interactions_to_rows(log, on_duplicate_time="keep-file-order")
    assert [(r["history"], r["chosen"], r["rejected"]) for r in built.rows] == [(["a"], "b", "c")]
    assert built.counts["dropped duplicate rows"] == 1  # the exact repeat of row 2


def test_dates_as_timestamps(tmp_path):
    log = _csv(tmp_path / "log.csv", [("u", "b", 5, "2024-01-02T00:00:00"), ("u", "a", 5, "2024-01-01"),
                                      ("u", "c", 1, "2024-01-03")])
    assert [(r["history"], r["chosen"]) for r in interactions_to_rows(log).rows] == [(["a"], "b")]


# ---------------------------------------------------------------- bad input: one line, exit 2

HEADER = "user,item,rating,timestamp\n"


@pytest.mark.parametrize("text, extra, message", [
    ("", [], r"log.csv: empty file"),
    (HEADER, [], r"log.csv: empty file: no events"),
    ("user,item,timestamp\nu,a,1\n", [], r"log.csv: missing a feedback column"),
    ("user,rating,timestamp\nu,5,1\n", [], r"log.csv: missing item column 'item'"),
    (HEADER + "u,a,5,1\nu,b,good,2\n", [], r"log.csv, row 3: rating must be a number, got 'good'"),
    (HEADER + "u,a,5,1\n,b,5,2\n", [], r"log.csv, row 3: empty user id"),
    (HEADER + "u,a,5,1\nu,b,5,later\n", [], r"log.csv, row 3: timestamp must be a number or a date"),
    (HEADER + "u,a,5,1\nu,b,1,1\n", [], r"log.csv, row 3: user 'u' has another event at the same time"),
    (HEADER + "u,a,5,1\nu,b,1,2,9\n", [], r"log.csv, row 3: 5 fields, the header has 4"),
    (HEADER + "u,a,5,1\nu,b,1,2\nu,c,5,3\n", ["--k", "2"], r"no context has 2 rejected items"),
    (HEADER + "u,a,5,1\nu,zz,5,2\n", ["--items", "ITEMS"], r"log.csv, row 3: item 'zz' is not in the catalogue"),
    ("user,item,click,timestamp\nu,a,1,1\n", ["--negatives", "rating"], r"--negatives rating needs a rating"),
    ("user,item,click,timestamp\nu,a,-1,1\n", ["--negatives", "skipped"], r"log.csv, row 2: click must be ≥ 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, text, extra, message):
    import re

    log = tmp_path / "log.csv"
    log.write_text(text)
    items = _csv(tmp_path / "cat.csv", [("a",), ("b",)], header=("item",))
    extra = [str(items) if a == "ITEMS" else a for a in extra]
    assert main(["data", "build", "interactions", str(log), str(tmp_path / "out.jsonl"), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_output_may_not_overwrite_the_log(tmp_path):
    log = _csv(tmp_path / "log.csv", [("u", "a", 5, 1), ("u", "b", 5, 2)])
    with pytest.raises(DpokitError):
        from dpokit.recipes import interactions
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("input"), p.add_argument("output")
        interactions.add_arguments(p)
        interactions.build(p.parse_args([str(log), str(log)]))
