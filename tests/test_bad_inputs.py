"""The bad-input suite: malformed inputs through the `merlin-hstu` CLI, run in-process (`main([...])`).

Every case must end with exit code 2 and one `error: ...` message that names what the user needs to find the
problem (the file, the column, the row as the user counts it, the offending value) and the fix as a CLI flag where
one exists, and must leave no output directory (nor a staging directory) behind. A seeded fuzz test mutates a valid
log (dropped columns, injected nulls, shuffled types, truncated files, ...) and accepts only a clean error or a
valid output, never a traceback.

The list of cases and their outcomes is summarised in docs/workflow.md ("Bad input").
"""
from __future__ import annotations

import lzma
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import pandas as pd
import pytest

from merlin_hstu.cli.main import main

COLUMNS = ["user_id", "item_id", "action", "timestamp"]


def event_log(num_users: int = 12, seed: int = 0) -> pd.DataFrame:
    """A small valid log: 4-9 events per user, integer ids, string actions, unix seconds."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        for k in range(int(rng.integers(4, 10))):
            rows.append((user, int(rng.integers(100, 140)), ["view", "buy"][k % 2], 1_600_000_000 + 60 * k + user))
    return pd.DataFrame(rows, columns=COLUMNS)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Header on line 1, frame row i on line i + 2."""
    frame.to_csv(path, index=False)
    return path


def ranking_log(num_users: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for user in range(num_users):
        for k in range(6):
            click = int(rng.integers(0, 2))
            rows.append((user, f"v{int(rng.integers(0, 20))}", 1_600_000_000 + 3600 * k, click, click & (k % 2)))
    return pd.DataFrame(rows, columns=["uid", "item", "ts", "click", "like"])


def criteo_lines(n: int = 12) -> List[str]:
    rng = np.random.default_rng(2)
    lines = []
    for _ in range(n):
        ints = [str(int(v)) for v in rng.integers(0, 50, 13)]
        cats = [f"{int(v):08x}" for v in rng.integers(0, 5, 26)]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]))
    return lines


def session_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "user_session": ["s1", "s2", "s3"],
        "item_id_list_seq": [[1, 2, 3], [4, 5, 6, 7], [1, 4, 8]],
        "item_event_name_list_seq": [["v", "v", "b"], ["v", "v", "v", "b"], ["v", "b", "v"]],
        "timestamp_first": [1_600_000_000, 1_600_000_100, 1_600_000_200],
    })


# ---------------------------------------------------------------------------------------------------------------
# the cases: each builds its input under `tmp` and returns (argv, substrings the message must hold, output path)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    area: str  # event log (CSV) | event log (Parquet) | session Parquet | sequences | ranking | criteo | config | request
    build: Callable[[Path, Path], Tuple[List[str], List[str], Optional[Path]]]


def _preprocess(src: Path, out: Path, *extra: str) -> List[str]:
    return ["preprocess", "--input", str(src), "--output", str(out), *extra]


def _csv_case(mutate: Callable[[pd.DataFrame], pd.DataFrame], expect: Callable[[Path], List[str]], *extra: str,
              name: str = "log.csv"):
    def build(tmp: Path, data: Path):
        src = write_csv(mutate(event_log()), tmp / name)
        out = tmp / "out"
        return _preprocess(src, out, *extra), [str(src), *expect(src)], out
    return build


def _text_case(text: str, expect: List[str], *extra: str, name: str = "log.csv", encoding: str = "utf-8"):
    def build(tmp: Path, data: Path):
        src = tmp / name
        src.write_bytes(text.encode(encoding))
        out = tmp / "out"
        return _preprocess(src, out, *extra), [str(src), *expect], out
    return build


def _at(frame: pd.DataFrame, column: str, row: int, value) -> pd.DataFrame:
    frame = frame.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


def _truncated_xz(tmp: Path, data: Path):
    src = tmp / "log.csv.xz"
    blob = lzma.compress(event_log().to_csv(index=False).encode())
    src.write_bytes(blob[: len(blob) // 2])
    return _preprocess(src, tmp / "out"), [str(src), "truncated"], tmp / "out"


def _extra_field_each_line(tmp: Path, data: Path):
    src = tmp / "log.csv"
    lines = event_log().to_csv(index=False).splitlines()
    src.write_text("\n".join([lines[0]] + [line + ",x" for line in lines[1:]]) + "\n")
    return _preprocess(src, tmp / "out"), [str(src), "more fields than the header", "--separator"], tmp / "out"


def _ragged_line(tmp: Path, data: Path):
    src = tmp / "log.csv"
    lines = event_log().to_csv(index=False).splitlines()
    lines[5] += ",7"  # file line 6
    src.write_text("\n".join(lines) + "\n")
    return _preprocess(src, tmp / "out"), [str(src), "line 6", "--separator"], tmp / "out"


def _parquet_case(mutate, expect, *extra):
    def build(tmp: Path, data: Path):
        src = tmp / "log.parquet"
        mutate(event_log()).to_parquet(src, index=False)
        return _preprocess(src, tmp / "out", *extra), [str(src), *expect], tmp / "out"
    return build


def _truncated_parquet(tmp: Path, data: Path):
    src = tmp / "log.parquet"
    event_log().to_parquet(src, index=False)
    blob = src.read_bytes()
    src.write_bytes(blob[: len(blob) // 2])
    return _preprocess(src, tmp / "out"), [str(src), "not a readable Parquet file"], tmp / "out"


def _empty_parquet_dir(tmp: Path, data: Path):
    src = tmp / "parts"
    src.mkdir()
    (src / "README.txt").write_text("no data here")
    return _preprocess(src, tmp / "out"), [str(src), "no *.parquet"], tmp / "out"


def _sessions_case(mutate, expect, *extra):
    def build(tmp: Path, data: Path):
        src = tmp / "sessions.parquet"
        mutate(session_frame()).to_parquet(src, index=False)
        return _preprocess(src, tmp / "out", "--min-length", "2", *extra), [str(src), *expect], tmp / "out"
    return build


def _with(frame: pd.DataFrame, column: str, row: int, value) -> pd.DataFrame:
    frame = frame.copy()
    values = list(frame[column])
    values[row] = value
    frame[column] = values
    return frame


def _sequences_case(text: str, expect: List[str], *extra: str):
    def build(tmp: Path, data: Path):
        src = tmp / "seqs.txt"
        src.write_text(text)
        return _preprocess(src, tmp / "out", *extra), [str(src), *expect], tmp / "out"
    return build


RANKING_FLAGS = ["--format", "events", "--user-column", "uid", "--item-column", "item", "--timestamp-column", "ts",
                 "--action-names", "click,like"]


def _ranking_case(mutate, expect, *extra, names_file: bool = True):
    def build(tmp: Path, data: Path):
        src = write_csv(mutate(ranking_log()), tmp / "ranking.csv")
        out = tmp / "out"
        return (["preprocess-ranking", "--input", str(src), "--output", str(out), *RANKING_FLAGS, *extra],
                [str(src)] * names_file + list(expect), out)
    return build


def _criteo_case(mutate_lines, expect):
    def build(tmp: Path, data: Path):
        src = tmp / "day_0.tsv"
        src.write_text("\n".join(mutate_lines(criteo_lines())) + ("\n" if mutate_lines(criteo_lines()) else ""))
        out = tmp / "criteo"
        return ["preprocess-criteo", "--input", str(src), "--output", str(out)], [str(src), *expect], out
    return build


def _criteo_field(line: int, field: int, value: str):
    def mutate(lines):
        parts = lines[line - 1].split("\t")
        parts[field] = value
        lines[line - 1] = "\t".join(parts)
        return lines
    return mutate


def _train_case(extra: List[str], expect: Callable[[Path], List[str]], files: Optional[dict] = None):
    def build(tmp: Path, data: Path):
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        run = tmp / "run"
        argv = ["train", "--data", str(data), "--output", str(run), "--no-progress",
                *[a.replace("TMP", str(tmp)) for a in extra]]
        return argv, expect(tmp), run
    return build


CASES = [
    # --- event logs, CSV ---------------------------------------------------------------------------------------
    Case("missing file", "event log (CSV)",
         lambda tmp, data: (_preprocess(tmp / "nope.csv", tmp / "out"),
                            [str(tmp / "nope.csv"), "does not exist", "--input"], tmp / "out")),
    Case("empty file", "event log (CSV)", _text_case("", ["empty", "header line"])),
    Case("header only", "event log (CSV)", _text_case("user_id,item_id,action,timestamp\n", ["empty (0 rows", "--input"])),
    Case("item column missing", "event log (CSV)",
         _csv_case(lambda d: d.rename(columns={"item_id": "movie"}), lambda p: ["'item_id'", "--item-column"])),
    Case("timestamp column missing", "event log (CSV)",
         _csv_case(lambda d: d.drop(columns=["timestamp"]), lambda p: ["'timestamp'", "--timestamp-column none"])),
    Case("empty item field", "event log (CSV)",
         _csv_case(lambda d: _at(d, "item_id", 5, None), lambda p: ["'item_id'", "line 7", "--drop-nulls"])),
    Case("text timestamp", "event log (CSV)",
         _csv_case(lambda d: _at(d, "timestamp", 8, "yesterday"),
                   lambda p: ["'timestamp'", "line 10", "'yesterday'", "--timestamp-column none"])),
    Case("negative timestamp", "event log (CSV)",
         _csv_case(lambda d: _at(d, "timestamp", 3, -5), lambda p: ["'timestamp'", "line 5", "-5",
                                                                    "--timestamp-column none"])),
    Case("fractional timestamp", "event log (CSV)",
         _csv_case(lambda d: _at(d, "timestamp", 4, 1_600_000_000.5),
                   lambda p: ["'timestamp'", "line 6", "1600000000.5"])),
    Case("fractional item id", "event log (CSV)",
         _csv_case(lambda d: _at(d, "item_id", 2, 2.5), lambda p: ["'item_id'", "line 4", "2.5", "--item-column"])),
    Case("true/false user ids", "event log (CSV)",
         _csv_case(lambda d: d.assign(user_id=d["user_id"] % 2 == 0), lambda p: ["'user_id'", "False at line 2", "--id-column"])),
    Case("line with an extra field", "event log (CSV)", _ragged_line),
    Case("every line has an unnamed extra field", "event log (CSV)", _extra_field_each_line),
    Case("wrong separator", "event log (CSV)",
         _text_case("user_id;item_id;action;timestamp\n1;5;view;10\n", ["read as one column", "--separator"],
                    "--separator", ",")),
    Case("not UTF-8", "event log (CSV)",
         _text_case("user_id,item_id,action,timestamp\n1,caf\xe9,view,10\n", ["UTF-8", "0xe9"], encoding="latin-1")),
    Case("truncated .csv.xz", "event log (CSV)", _truncated_xz),
    Case("unknown file type", "event log (CSV)",
         _text_case('{"user_id": 1}', ["cannot tell the format", "--input-format"], name="log.json")),
    Case("every user too short", "event log (CSV)",
         _csv_case(lambda d: d, lambda p: ["--min-length"], "--min-length", "100")),
    Case("min length 0", "event log (CSV)",
         lambda tmp, data: (_preprocess(write_csv(event_log(), tmp / "log.csv"), tmp / "out", "--min-length", "0"),
                            ["--min-length", "got 0"], tmp / "out")),
    Case("max history 0", "event log (CSV)",
         lambda tmp, data: (_preprocess(write_csv(event_log(), tmp / "log.csv"), tmp / "out", "--max-history", "0"),
                            ["--max-history", "got 0"], tmp / "out")),
    Case("one column for two roles", "event log (CSV)",
         lambda tmp, data: (_preprocess(write_csv(event_log(), tmp / "log.csv"), tmp / "out", "--item-column",
                                        "user_id"), ["distinct", "--item-column"], tmp / "out")),
    # --- event logs, Parquet -------------------------------------------------------------------------------------
    Case("truncated Parquet", "event log (Parquet)", _truncated_parquet),
    Case("folder without Parquet files", "event log (Parquet)", _empty_parquet_dir),
    Case("text in a timestamp column", "event log (Parquet)",
         _parquet_case(lambda d: _at(d.assign(timestamp=d["timestamp"].astype(str)), "timestamp", 3, "soon"),
                       ["'timestamp'", "row 4 (0-based 3)", "'soon'"])),
    Case("null user id", "event log (Parquet)",
         _parquet_case(lambda d: d.assign(user_id=d["user_id"].astype(float).where(d.index != 2)),
                       ["'user_id'", "row 3 (0-based 2)", "--drop-nulls"])),
    # --- Merlin session Parquet ----------------------------------------------------------------------------------
    Case("null inside a session list", "session Parquet",
         _sessions_case(lambda s: _with(s, "item_id_list_seq", 1, [4, None, 6, 7]),
                        ["'item_id_list_seq'", "session 's2'", "list item 2", "--drop-nulls"])),
    Case("null session list", "session Parquet",
         _sessions_case(lambda s: _with(s, "item_id_list_seq", 2, None),
                        ["'item_id_list_seq'", "session 's3'", "--drop-nulls"])),
    Case("list lengths differ", "session Parquet",
         _sessions_case(lambda s: _with(s, "item_event_name_list_seq", 0, ["v", "v"]),
                        ["session 's1'", "3 items vs 2", "--action-column none"])),
    Case("timestamp_first missing", "session Parquet",
         _sessions_case(lambda s: s.drop(columns=["timestamp_first"]), ["'timestamp_first'", "--timestamp-column none"])),
    Case("sessions format on an event log", "session Parquet",
         _csv_case(lambda d: d, lambda p: ["--input-format events"], "--input-format", "sessions")),
    # --- sequence-per-line text ----------------------------------------------------------------------------------
    Case("user with two lines", "sequences",
         _sequences_case("1 5 6 7\n2 5 8\n1 9 4\n", ["line 3", "user 1", "--sequence-user-ids no"],
                         "--sequence-user-ids", "yes")),
    Case("line without items", "sequences",
         _sequences_case("1 5 6 7\n2\n3 9 4\n", ["line 2", "--sequence-user-ids no"], "--sequence-user-ids", "yes")),
    Case("actions asked of a sequence file", "sequences",
         _sequences_case("1 5 6 7\n2 5 8\n", ["no actions", "--action-column none"], "--action-column", "action")),
    # --- ranking event logs --------------------------------------------------------------------------------------
    Case("action column missing", "ranking",
         _ranking_case(lambda d: d.drop(columns=["like"]), ["'like'", "--action-names"])),
    Case("empty user id", "ranking",
         _ranking_case(lambda d: _at(d, "uid", 4, None), ["'uid'", "line 6", "Fix"])),
    Case("text timestamp", "ranking",
         _ranking_case(lambda d: _at(d, "ts", 7, "soon"), ["'ts'", "line 9", "'soon'", "Fix"])),
    Case("unknown task", "ranking",
         _ranking_case(lambda d: d, ["--tasks", "'share'", "click"], "--tasks", "share", names_file=False)),
    # --- Criteo TSV ----------------------------------------------------------------------------------------------
    Case("missing field", "criteo",
         _criteo_case(lambda lines: lines[:2] + ["\t".join(lines[2].split("\t")[:-1])] + lines[3:],
                      ["line 3", "39 tab-separated fields", "Fix"])),
    Case("label not 0/1", "criteo", _criteo_case(_criteo_field(2, 0, "2"), ["line 2", "'label'", "'2'"])),
    Case("text in an integer field", "criteo",
         _criteo_case(_criteo_field(4, 5, "abc"), ["line 4", "'I5'", "'abc'", "Fix"])),
    Case("empty file", "criteo", _criteo_case(lambda lines: [], ["empty"])),
    # --- configs (train on a valid preprocessed directory) -------------------------------------------------------
    Case("unknown config key", "config",
         _train_case(["--set", "train.epochz=3"], lambda tmp: ["epochz", "valid keys"])),
    Case("unknown preset", "config", _train_case(["--config", "nope"], lambda tmp: ["'nope'", "presets"])),
    Case("YAML syntax error", "config",
         _train_case(["--config", "TMP/bad.yaml"], lambda tmp: [str(tmp / "bad.yaml"), "line 3", "not valid YAML"],
                     {"bad.yaml": "train:\n  epochs: [1, 2\n  batch_size: 3\n"})),
    Case("YAML that is a list", "config",
         _train_case(["--config", "TMP/list.yaml"], lambda tmp: [str(tmp / "list.yaml"), "mapping"],
                     {"list.yaml": "- 1\n- 2\n"})),
    Case("a section set to a value", "config",
         _train_case(["--set", "train=3"], lambda tmp: ["'train' is a section", "train.<key>"])),
    Case("override without '='", "config",
         _train_case(["--set", "train.epochs"], lambda tmp: ["'train.epochs'", "section.key=value"])),
    Case("model history differs from the data's", "config",
         _train_case(["--config", "hstu-ml1m"], lambda tmp: ["200", "data_report.json", "--max-history",
                                                              "--allow-history-mismatch"])),
    Case("max history given twice", "config",
         _train_case(["--max-history", "8", "--set", "data.max_history=8"], lambda tmp: ["--max-history", "not both"])),
    Case("history flag on a ranking run", "config",
         _train_case(["--task", "ranking", "--max-history", "8"], lambda tmp: ["--max-history", "retrieval only"])),
    # --- requests ------------------------------------------------------------------------------------------------
    Case("request file missing", "request",
         lambda tmp, data: (["query", "--request", str(tmp / "req.csv")], [str(tmp / "req.csv"), "does not exist"],
                            None)),
]


@pytest.fixture(scope="module")
def valid_data(tmp_path_factory) -> Path:
    """A preprocessed retrieval directory (max history 16) for the config cases."""
    root = tmp_path_factory.mktemp("bad_inputs_data")
    src = write_csv(event_log(num_users=20), root / "log.csv")
    assert main(["preprocess", "--input", str(src), "--output", str(root / "data"), "--max-history", "16"]) == 0
    return root / "data"


def _leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def test_the_suite_has_at_least_30_distinct_cases():
    names = [(c.area, c.name) for c in CASES]
    assert len(set(names)) == len(names) >= 30
    assert {c.area for c in CASES} >= {"event log (CSV)", "event log (Parquet)", "session Parquet", "sequences",
                                       "ranking", "criteo", "config", "request"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.name}" for c in CASES])
def test_bad_input_exits_2_with_a_message_that_names_it(case, tmp_path, valid_data, capsys):
    argv, expected, out = case.build(tmp_path, valid_data)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    missing = [text for text in expected if text not in err]
    assert not missing, f"{missing} not in: {err}"
    assert "<Buffer>" not in err and "Traceback" not in err
    if out is not None:
        assert _leftovers(out) == [], f"left behind: {_leftovers(out)}"


# ---------------------------------------------------------------------------------------------------------------
# seeded fuzz: mutate a valid log; a clean error or a valid output, never a traceback
# ---------------------------------------------------------------------------------------------------------------
def _mutations(rng: random.Random):
    def drop_column(frame):
        return frame.drop(columns=[rng.choice(COLUMNS)]), "csv"

    def inject_nulls(frame):
        frame = frame.copy()
        col = rng.choice(COLUMNS)
        frame[col] = frame[col].astype(object)
        frame.loc[rng.sample(range(len(frame)), 3), col] = None
        return frame, rng.choice(["csv", "parquet"])

    def shuffle_types(frame):
        frame = frame.copy()
        col = rng.choice(COLUMNS)
        kind = rng.choice(["text", "float", "bool", "negative"])
        values = frame[col].astype(object).to_numpy()
        rows = rng.sample(range(len(frame)), 2)
        for r in rows:
            values[r] = {"text": f"x{r}", "float": r + 0.5, "bool": True, "negative": -r - 1}[kind]
        frame[col] = values
        return frame, "csv"

    def truncate(frame):
        return frame, "truncate-" + rng.choice(["csv", "parquet"])

    def rename_header(frame):
        return frame.rename(columns={rng.choice(COLUMNS): "something_else"}), "csv"

    def few_rows(frame):
        return frame.iloc[: rng.randint(0, 3)], "csv"

    return [drop_column, inject_nulls, shuffle_types, truncate, rename_header, few_rows]


def test_fuzzed_logs_give_a_clean_error_or_a_valid_output(tmp_path, capsys):
    rng = random.Random(16)
    mutations = _mutations(rng)
    outcomes = []
    for trial in range(20):
        mutate = mutations[trial % len(mutations)] if trial < len(mutations) else rng.choice(mutations)
        frame, kind = mutate(event_log(seed=trial))
        src = tmp_path / f"log{trial}.{'parquet' if kind.endswith('parquet') else 'csv'}"
        if kind.endswith("parquet"):
            frame.to_parquet(src, index=False)
        else:
            frame.to_csv(src, index=False)
        if kind.startswith("truncate"):
            blob = src.read_bytes()
            src.write_bytes(blob[: rng.randint(1, len(blob) - 1)])
        out = tmp_path / f"out{trial}"
        capsys.readouterr()
        code = main(["preprocess", "--input", str(src), "--output", str(out), "--max-history", "8",
                     "--min-length", "2"])
        err = capsys.readouterr().err
        outcomes.append((mutate.__name__, kind, code))
        assert code in (0, 2), (mutate.__name__, err)
        if code == 2:
            assert err.startswith("error: ") and str(src) in err and "Fix" in err, (mutate.__name__, err)
            assert _leftovers(out) == []
        else:
            assert (out / "data_report.json").is_file() and (out / "processed" / "schema.pbtxt").is_file()
    assert {code for _, _, code in outcomes} == {0, 2}, outcomes  # the mutations reach both outcomes
