"""Dataset loaders (MovieLens, Amazon Books, Amazon S3-Rec) on the staged real files, checked against plain-Python
counts; the Amazon filters on a hand-made file; bad files; and the workflow's raw-id / candidate-pool extensions."""
from __future__ import annotations

import lzma
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nvtabular as nvt
from merlin.io import Dataset

from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.datasets import (
    DATASETS,
    DatasetFormatError,
    dataset_names,
    default_input_dir,
    load_dataset,
    preprocess_dataset,
)
from merlin_hstu.workflows.session_workflow import (
    CANDIDATES_FILE,
    DATA_REPORT_FILE,
    EventLogError,
    SessionWorkflowConfig,
    load_item_id_mapping,
    load_serving_workflow,
    normalize_event_log,
    preprocess,
    read_candidates,
)


def xz_lines(path: Path, encoding: str = "latin-1") -> list:
    with lzma.open(path, "rt", encoding=encoding, newline="") as handle:
        return [line.rstrip("\r\n") for line in handle if line.strip()]


def plain_sequences(rows) -> dict:
    """{user: [items]} in time order; Python's sort is stable, so equal times keep file order."""
    by_user: dict = {}
    for user, item, time in rows:
        by_user.setdefault(user, []).append((time, item))
    return {u: [item for _, item in sorted(events, key=lambda e: e[0])] for u, events in by_user.items()}


def as_dict(frame: pd.DataFrame) -> dict:
    return {int(u): [int(i) for i in items] for u, items in zip(frame["user_id"], frame[roles.ITEM_LIST])}


def test_registry_names():
    names = dataset_names()
    for name in ("ml-1m", "ml-1m-prefix", "ml-20m", "ml-100k", "amzn-books", "amazon-s3rec", "amazon-s3rec-beauty"):
        assert name in names and DATASETS[name].name == name
    with pytest.raises(KeyError, match="known datasets"):
        load_dataset("ml-2m", ".")


def test_default_input_dirs_are_the_staged_copies(shared_data):
    assert default_input_dir("ml-1m-prefix") == shared_data / "movielens-1m"
    assert default_input_dir("amazon-s3rec-toys") == shared_data / "amazon2014-s3rec"
    assert default_input_dir("ml-1m") is None and default_input_dir("amzn-books") is None  # not staged
    staged = [n for n in dataset_names() if default_input_dir(n) is not None]
    assert sorted(staged) == sorted(["ml-1m-prefix", "ml-100k", "ml-latest-small", "amazon-s3rec-beauty",
                                     "amazon-s3rec-sports", "amazon-s3rec-toys"])


# ---------------------------------------------------------------------------------------------------------
# MovieLens 1M prefix: raw ids, 3,883-movie candidate pool
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml1m_plain(shared_data):
    root = shared_data / "movielens-1m"
    rows = []
    for line in xz_lines(root / "ratings.prefix-487650.dat.xz"):
        user, item, _, time = line.split("::")
        rows.append((int(user), int(item), int(time)))
    movies = [int(line.split("::")[0]) for line in xz_lines(root / "movies.dat.xz")]
    return rows, movies


@pytest.fixture(scope="module")
def ml1m_result(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml1m") / "out"
    return preprocess_dataset("ml-1m-prefix", shared_data / "movielens-1m", out, max_length=30)


def test_ml1m_prefix_counts_raw_ids_and_candidates(ml1m_result, ml1m_plain):
    rows, movies = ml1m_plain
    df = ml1m_result.to_pandas()
    users = {u for u, _, _ in rows}
    assert len(rows) == 487_650 and len(users) == 2_999 and len({i for _, i, _ in rows}) == 3_615
    assert len(movies) == 3_883
    assert ml1m_result.num_rows == len(df) == len(users)
    # raw movie ids, no Categorify: each user's most recent 30 items equal the plain stable-sorted raw ids
    expected = plain_sequences(rows)
    assert as_dict(df) == {u: seq[-30:] for u, seq in expected.items()}
    assert int(df.loc[df["user_id"] == 1, roles.ITEM_LIST].item()[0]) == expected[1][-30]
    assert df[roles.LENGTH].sum() == sum(min(len(s), 30) for s in expected.values())
    # candidate pool = every movies.dat id (rated or not); embedding rows = max id + 1
    candidates = ml1m_result.candidate_ids()
    assert candidates.dtype == np.int64
    assert candidates.tolist() == sorted(movies)
    assert np.array_equal(read_candidates(ml1m_result.candidates_path.parent), candidates)
    assert roles.embedding_table_size(ml1m_result.schema, roles.ITEM_LIST) == max(movies) + 1 == 3_953
    assert ml1m_result.schema[roles.ITEM_LIST].properties["item_encoding"] == "raw"
    assert roles.timestamp_list_column(ml1m_result.schema) == roles.TIMESTAMP_LIST


def test_ml1m_user_one_first_item_is_its_raw_id(shared_data, ml1m_plain, tmp_path):
    rows, _ = ml1m_plain
    first = min((t, k, i) for k, (u, i, t) in enumerate(rows) if u == 1)[2]  # earliest, ties by file order
    loaded = load_dataset("ml-1m-prefix", shared_data / "movielens-1m")
    user1 = loaded.events[loaded.events["user_id"] == 1]
    result = preprocess(user1, tmp_path / "u1", loaded.workflow_config(max_length=1000), candidates=loaded.candidates)
    items = result.to_pandas()[roles.ITEM_LIST].item()
    assert int(items[0]) == first == 3186
    assert len(items) == len(user1)
    assert loaded.user_features is not None and len(loaded.user_features) == 6_040


def test_full_ml1m_is_checked_against_published_counts(shared_data, tmp_path):
    """The `ml-1m` loader expects the full ratings.dat: the prefix under that name fails the count check."""
    root = shared_data / "movielens-1m"
    fake = tmp_path / "ml-1m"
    fake.mkdir()
    os.symlink(root / "ratings.prefix-487650.dat.xz", fake / "ratings.dat.xz")
    for name in ("movies.dat.xz", "users.dat.xz"):
        os.symlink(root / name, fake / name)
    with pytest.raises(DatasetFormatError) as info:
        load_dataset("ml-1m", fake)
    message = str(info.value)
    assert "events: expected 1,000,209, found 487,650" in message
    assert "items: expected 3,706, found 3,615" in message and "check_counts=False" in message
    loaded = load_dataset("ml-1m", fake, check_counts=False)
    assert len(loaded.events) == 487_650 and len(loaded.candidates) == 3_883


# ---------------------------------------------------------------------------------------------------------
# MovieLens 100K and ml-latest-small (the ML-20M csv format)
# ---------------------------------------------------------------------------------------------------------
def test_ml100k_counts_after_preprocess(shared_data, tmp_path):
    root = shared_data / "movielens-100k"
    rows = [tuple(int(v) for v in line.split("\t")) for line in xz_lines(root / "u.data.xz")]
    catalogue = [int(line.split("|")[0]) for line in xz_lines(root / "u.item.xz")]
    longest = max(np.unique([r[0] for r in rows], return_counts=True)[1])
    result = preprocess_dataset("ml-100k", root, tmp_path / "out", max_length=int(longest))
    df = result.to_pandas()
    assert result.num_rows == len({r[0] for r in rows}) == 943
    assert df[roles.LENGTH].sum() == len(rows) == 100_000
    assert len(np.unique(np.concatenate(df[roles.ITEM_LIST].to_numpy()))) == len({r[1] for r in rows}) == 1_682
    assert result.candidate_ids().tolist() == sorted(catalogue) and len(catalogue) == 1_682
    expected = plain_sequences((u, i, t) for u, i, _, t in rows)
    assert as_dict(df) == expected
    for times in df[roles.TIMESTAMP_LIST]:
        assert np.all(np.diff(times) >= 0)


def test_ml_latest_small_counts(shared_data, tmp_path):
    root = shared_data / "movielens-latest-small"
    lines = xz_lines(root / "ratings.csv.xz", "utf-8")
    assert lines[0] == "userId,movieId,rating,timestamp"
    rows = [line.split(",") for line in lines[1:]]
    movies = pd.read_csv(root / "movies.csv.xz")["movieId"].tolist()
    longest = max(np.unique([r[0] for r in rows], return_counts=True)[1])
    result = preprocess_dataset("ml-latest-small", root, tmp_path / "out", max_length=int(longest))
    df = result.to_pandas()
    assert result.num_rows == len({r[0] for r in rows}) == 610
    assert df[roles.LENGTH].sum() == len(rows) == 100_836
    rated = np.unique(np.concatenate(df[roles.ITEM_LIST].to_numpy()))
    assert sorted(rated.tolist()) == sorted({int(r[1]) for r in rows}) and len(rated) == 9_724
    assert result.candidate_ids().tolist() == sorted(movies) and len(movies) == 9_742
    assert roles.embedding_table_size(result.schema, roles.ITEM_LIST) == max(movies) + 1
    loaded = load_dataset("ml-latest-small", root)
    assert loaded.events["rating"].dtype == np.float64  # half stars are kept, not rounded
    assert sorted(loaded.events["rating"].unique().tolist()) == sorted({float(r[2]) for r in rows})


def test_ml20m_loader_reads_the_csv_format_but_checks_ml20m_sizes(shared_data):
    root = shared_data / "movielens-latest-small"
    with pytest.raises(DatasetFormatError, match="items: expected 26,744, found 9,724"):
        load_dataset("ml-20m", root)
    loaded = load_dataset("ml-20m", root, check_counts=False)
    assert len(loaded.events) == 100_836 and len(loaded.candidates) == 9_742 and loaded.item_encoding == "raw"


# ---------------------------------------------------------------------------------------------------------
# Amazon S3-Rec: no timestamps, list order kept
# ---------------------------------------------------------------------------------------------------------
def test_amazon_s3rec_beauty(shared_data, tmp_path):
    path = shared_data / "amazon2014-s3rec" / "Beauty.txt.xz"
    sequences = {}
    for line in xz_lines(path, "utf-8"):
        user, *items = (int(v) for v in line.split())
        sequences[user] = items
    n_items = len({i for items in sequences.values() for i in items})
    n_events = sum(len(items) for items in sequences.values())
    assert (len(sequences), n_items, n_events) == (22_363, 12_101, 198_502)  # the S3-Rec paper's table

    result = preprocess_dataset("amazon-s3rec-beauty", path.parent, tmp_path / "out", max_length=20)
    df = result.to_pandas()
    assert list(df.columns) == ["user_id", roles.ITEM_LIST, roles.LENGTH]  # no timestamp column at all
    assert roles.timestamp_list_column(result.schema) is None
    assert result.num_rows == len(sequences)
    assert as_dict(df) == {u: items[-20:] for u, items in sequences.items()}  # file order, most recent 20
    assert result.candidate_ids().tolist() == sorted({i for s in sequences.values() for i in s})
    assert roles.embedding_table_size(result.schema, roles.ITEM_LIST) == n_items + 1  # ids are 1..N
    # the generic name takes the file itself and recognises it by name (same sizes checked)
    generic = load_dataset("amazon-s3rec", path)
    assert len(generic.events) == n_events and not generic.has_timestamps
    with pytest.raises(DatasetFormatError, match="exactly one"):
        load_dataset("amazon-s3rec", path.parent)  # three files there: which one?


# ---------------------------------------------------------------------------------------------------------
# Amazon Books filters on a hand-made ratings file
# ---------------------------------------------------------------------------------------------------------
CORE = ["0000000042", "B01", "B02", "B03", "B04"]  # an ISBN-like ASIN with leading zeros stays a string
CORE_USERS = ["UA", "UB", "UC", "UD", "UE"]


def books_rows() -> list:
    """(user, item, timestamp); every case of the reference filter, hand-counted:

    core users UA..UE rate the 5 core items (5 each)                          -> kept, sequences of 5
    AS4 rates 4 core items (user count 4)                                    -> all 4 rows dropped
    AOP rates C0 C1 C2 RARE4 EDGE5 (count 5, counted BEFORE filtering)       -> RARE4 row dropped, 4 rows kept,
                                                                                then the sequence (<5) is dropped
    AR1..AR3 rate RARE4 and EDGE5; AR4 rates EDGE5 (user counts 2 / 1)        -> dropped
    RARE4: AOP + AR1..AR3 = 4 ratings -> dropped; EDGE5: AOP + AR1..AR4 = 5 -> kept (only in AOP's rows)
    AOP6 rates the 5 core items + RARE1 (1 rating)                           -> 5 rows kept, sequence of 5
    """
    rows = []
    for k, user in enumerate(CORE_USERS):
        # written newest first; UA has a tie: B03 and B02 share t=300 and B03 comes first in the file
        times = [500, 300, 300, 200, 100] if user == "UA" else [500 + k, 400, 300, 200, 100]
        for item, t in zip(["B04", "B03", "B02", "B01", "0000000042"], times):
            rows.append((user, item, t))
    rows += [("AS4", item, 10 + j) for j, item in enumerate(CORE[:4])]
    rows += [("AOP", item, 20 + j) for j, item in enumerate([*CORE[:3], "RARE4", "EDGE5"])]
    for j, user in enumerate(["AR1", "AR2", "AR3"]):
        rows += [(user, "RARE4", 30 + j), (user, "EDGE5", 40 + j)]
    rows.append(("AR4", "EDGE5", 50))
    rows += [("AOP6", item, 60 + j) for j, item in enumerate([*CORE, "RARE1"])]
    return rows


def write_books(path: Path, rows) -> None:
    path.write_text("".join(f"{u},{i},{(j % 5) + 1}.0,{t}\n" for j, (u, i, t) in enumerate(rows)))


def test_amzn_books_filters_exactly(tmp_path):
    rows = books_rows()
    write_books(tmp_path / "ratings_Books.csv", rows)
    with pytest.raises(DatasetFormatError, match="items: expected 695,762, found 6"):
        load_dataset("amzn-books", tmp_path)  # the reference's count for the real file
    loaded = load_dataset("amzn-books", tmp_path, check_counts=False)
    assert loaded.filter_counts == {
        "events_in": len(rows), "users_in": 12, "items_in": 8,
        "events_kept": 25 + 4 + 5, "users_kept": 7, "items_kept": 6,
    }
    kept = set(map(tuple, loaded.events[["user_id", "item_id"]].to_numpy().tolist()))
    assert {u for u, _ in kept} == {*CORE_USERS, "AOP", "AOP6"}
    assert {i for _, i in kept} == {*CORE, "EDGE5"}
    assert {i for u, i in kept if u == "AOP"} == {*CORE[:3], "EDGE5"}
    assert loaded.events["rating"].dtype == np.int64 and loaded.events["item_id"].dtype == object

    result = preprocess_dataset("amzn-books", tmp_path, tmp_path / "out", max_length=50, check_counts=False)
    df = result.to_pandas()
    mapping = load_item_id_mapping(result.workflow_path)
    got = {u: [mapping[i] for i in items] for u, items in zip(df["user_id"], df[roles.ITEM_LIST])}
    chronological = ["0000000042", "B01", "B02", "B03", "B04"]
    expected = {user: chronological for user in CORE_USERS[1:]}
    expected["UA"] = ["0000000042", "B01", "B03", "B02", "B04"]  # the t=300 tie keeps file order
    expected["AOP6"] = chronological
    assert got == expected  # AOP (4 events after the count filter) is dropped by the length filter
    # pool = every item that survived the count filter, EDGE5 included although no kept sequence has it
    assert sorted(mapping[i] for i in result.candidate_ids()) == sorted([*CORE, "EDGE5"])
    assert result.candidate_ids().tolist() == list(range(3, 3 + 6))


# ---------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------
def ml1m_dir(tmp_path: Path, ratings: str) -> Path:
    root = tmp_path / "ml1m"
    root.mkdir()
    (root / "ratings.prefix-487650.dat").write_text(ratings)
    (root / "movies.dat").write_text("1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n")
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return root


@pytest.mark.parametrize(
    "ratings, message",
    [
        ("1\t1\t5\t978300760\n", r"line 1: expected 4 '::'-separated fields.*TAB"),
        ("1,1,5,978300760\n", r"expected 4 '::'-separated fields.*','"),
        ("1::1::5::978300760\n2::2::3\n", r"line 2: expected 4 '::'-separated fields"),
        ("1::1::5::978300760\n2::2::3::978300761::9\n", r"line 2.*expected 4 '::'-separated fields"),
        ("1::1::5::978300760\n2::x2::3::978300761\n", r"line 2: MovieID must be an integer, got 'x2'"),
        ("1::1::5::978300760\n2::2::9::978300761\n", r"line 2: rating 9"),
        ("1::1::5::978300760\n2::7::3::978300761\n", r"not in movies.dat .*\[7\]"),
        ("1::1::5::978300760\n3::2::3::978300761\n", r"not in users.dat .*\[3\]"),
        ("1::0::5::978300760\n", r"item id 0 found.*>= 1"),
    ],
)
def test_bad_movielens_dat_files(tmp_path, ratings, message):
    root = ml1m_dir(tmp_path, ratings)
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_dataset("ml-1m-prefix", root, check_counts=False)
    assert "ratings.prefix-487650.dat" in str(info.value)


def test_bad_files_of_other_formats(tmp_path):
    data = tmp_path / "ml100k"
    data.mkdir()
    (data / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||http://x" + "|0" * 19 + "\n")
    (data / "u.data").write_text("1,1,5,874965758\n")
    with pytest.raises(DatasetFormatError, match=r"u.data, line 1: expected 4 '\\t'-separated fields.*','"):
        load_dataset("ml-100k", data, check_counts=False)
    (data / "u.data").write_text("1\t1\t5\t874965758\n1\t1.5\t5\t874965758\n")
    with pytest.raises(DatasetFormatError, match=r"u.data, line 2: item id must be an integer, got '?1.5"):
        load_dataset("ml-100k", data, check_counts=False)
    (data / "u.data").write_text("1\t1\t5\t874965758\n1\t1\t5\n")
    with pytest.raises(DatasetFormatError, match=r"u.data, line 2: field 'timestamp' is empty or missing"):
        load_dataset("ml-100k", data, check_counts=False)
    os.remove(data / "u.item")
    with pytest.raises(DatasetFormatError, match=r"'u.item' \(or u.item.xz/.gz/.bz2\) not found"):
        load_dataset("ml-100k", data, check_counts=False)

    books = tmp_path / "books"
    books.mkdir()
    (books / "ratings_Books.csv").write_text("user,item,rating,timestamp\nA1,B1,5.0,1\n")
    with pytest.raises(DatasetFormatError, match="line 1: timestamp .*no header"):
        load_dataset("amzn-books", books, check_counts=False)
    (books / "ratings_Books.csv").write_text("A1,B1,5.0\n")
    with pytest.raises(DatasetFormatError, match="expected 4 ','-separated fields"):
        load_dataset("amzn-books", books, check_counts=False)

    s3rec = tmp_path / "Beauty.txt"
    s3rec.write_text("1 1 2 3\n2 4 x5\n")
    with pytest.raises(DatasetFormatError, match=r"Beauty.txt, line 2: ids must be integers .*'x5'"):
        load_dataset("amazon-s3rec", s3rec, check_counts=False)
    s3rec.write_text("1,1,2,3\n")
    with pytest.raises(DatasetFormatError, match=r"line 1: expected 'user_id item_id .*','"):
        load_dataset("amazon-s3rec", s3rec, check_counts=False)
    s3rec.write_text("1 1 2 3\n1 4 5\n")
    with pytest.raises(DatasetFormatError, match="user 1 already had a line"):
        load_dataset("amazon-s3rec", s3rec, check_counts=False)
    s3rec.write_text("1 1 2 3\n2 4 5\n")  # well-formed but not the published Beauty file
    with pytest.raises(DatasetFormatError, match="users: expected 22,363, found 2"):
        load_dataset("amazon-s3rec", s3rec)


# ---------------------------------------------------------------------------------------------------------
# workflow extensions: raw item ids and the candidate pool
# ---------------------------------------------------------------------------------------------------------
def raw_log() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 3],
            "item_id": [10, 4, 7, 4, 12, 10],
            "action": ["a", "b", "a", "a", "b", "a"],
            "timestamp": [3, 1, 2, 5, 5, 1],
        }
    )


def test_raw_ids_with_a_larger_catalogue(tmp_path):
    config = SessionWorkflowConfig(item_encoding="raw", max_length=5, min_length=2, interleave_actions=True)
    catalogue = [1, 4, 7, 10, 12, 20]  # 1 and 20 are never logged
    result = preprocess(raw_log(), tmp_path / "out", config, candidates=catalogue[::-1])
    df = result.to_pandas()
    assert as_dict(df) == {1: [4, 7, 10], 2: [4, 12]}  # raw ids in time order (ties: file order)
    assert result.candidate_ids().tolist() == catalogue
    assert sorted(os.listdir(tmp_path / "out")) == [CANDIDATES_FILE, DATA_REPORT_FILE, "processed", "workflow"]
    assert roles.embedding_table_size(result.schema, roles.ITEM_LIST) == 21  # catalogue max 20 + 1
    assert roles.action_token_offset(result.schema) == 21
    for items, tokens in zip(df[roles.ITEM_LIST], df[roles.INTERLEAVED_LIST]):
        assert list(tokens[0::2]) == list(items)

    # the saved workflow transforms again; at serving time an id beyond the catalogue is an error
    again = nvt.Workflow.load(str(result.workflow_path)).transform(
        Dataset(normalize_event_log(raw_log(), config), cpu=True)).compute()
    assert as_dict(again) == as_dict(df)
    serving = load_serving_workflow(result.workflow_path)
    unknown = normalize_event_log(raw_log().assign(item_id=[10, 4, 7, 4, 21, 10]), config)
    with pytest.raises(ValueError, match="outside 1..20"):
        serving.transform(Dataset(unknown, cpu=True)).compute()


def test_raw_ids_default_pool_is_the_logged_items(tmp_path):
    config = SessionWorkflowConfig(item_encoding="raw", action_column=None, max_length=5, min_length=2)
    result = preprocess(raw_log(), tmp_path / "out", config)
    assert result.candidate_ids().tolist() == [4, 7, 10, 12]  # user 3 (dropped) rated 10, still a candidate
    assert roles.embedding_table_size(result.schema, roles.ITEM_LIST) == 13


def test_categorify_pool_default_and_explicit(tmp_path):
    config = SessionWorkflowConfig(action_column=None, max_length=5, min_length=2)
    default = preprocess(raw_log(), tmp_path / "default", config)
    mapping = load_item_id_mapping(default.workflow_path)
    assert default.candidate_ids().tolist() == list(range(3, len(mapping)))
    assert sorted(mapping[i] for i in default.candidate_ids()) == [4, 7, 10, 12]
    explicit = preprocess(raw_log(), tmp_path / "explicit", config, candidates=[12, 4, 10, 7])
    assert explicit.candidate_ids().tolist() == default.candidate_ids().tolist()


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda d: d.assign(item_id=[10, 0, 7, 4, 12, 10]), {}, r"'item_id'.*<= 0.*padding"),
        (lambda d: d.assign(item_id=[str(i) for i in d["item_id"]]), {}, r"'item_id'.*integers >= 1"),
        (lambda d: d, {"candidates": [4, 7, 10]}, r"not in preprocess\(candidates=...\).*\[12\]"),
        (lambda d: d, {"candidates": [4, 7, 10, 12, 12]}, "more than once"),
        (lambda d: d, {"candidates": [0, 4, 7, 10, 12]}, ">= 1"),
        (lambda d: d, {"candidates": ["4", "7"]}, "integer"),
    ],
)
def test_raw_id_errors(tmp_path, change, kwargs, message):
    config = SessionWorkflowConfig(item_encoding="raw", action_column=None, max_length=5, min_length=1)
    with pytest.raises(EventLogError, match=message):
        preprocess(change(raw_log()), tmp_path / "out", config, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_categorify_catalogue_with_unseen_items_is_rejected_and_leaves_nothing(tmp_path):
    config = SessionWorkflowConfig(action_column=None, max_length=5, min_length=1)
    with pytest.raises(EventLogError, match=r"never occur.*\[99\].*item_encoding='raw'"):
        preprocess(raw_log(), tmp_path / "out", config, candidates=[4, 7, 10, 12, 99])
    assert list(tmp_path.iterdir()) == []  # this fails after fitting: the staging directory is removed


def test_bad_item_encoding():
    with pytest.raises(ValueError, match="item_encoding"):
        SessionWorkflowConfig(item_encoding="hash")
