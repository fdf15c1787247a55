"""Ranking workflow and dataset: exact samples of a hand-made log, schema tags, the loader's batches and training
windows, the user split, KuaiRand's layout on generated files, the MovieLens recipe (generated files and the
staged ML-1M prefix against plain pandas), the CLI, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from merlin.schema import Tags

from merlin_hstu.common import schema as roles
from merlin_hstu.cli.main import main
from merlin_hstu.ranking.batch import RankingTask
from merlin_hstu.cli.ranking import RANKING_DATASET_NAMES
from merlin_hstu.ranking.data import RankingDataset, user_split
from merlin_hstu.workflows import ranking_workflow as rw
from merlin_hstu.workflows.session_workflow import _load_category_mapping, load_item_id_mapping

# user, item, timestamp, click, like, watch time. Input order is not time order, users interleaved.
# user 5: 6 events, tie at t=20 (c before d in input); user 2: 2 events; user 3: 3 events, not in the user table;
# user 9: 1 event (dropped: a sample needs >= 1 history event + 1 candidate).
HAND_ROWS = [
    (5, "a", 10, 1, 0, 1.0),
    (2, "a", 7, 1, 1, 0.5),
    (5, "b", 40, 0, 1, 2.0),
    (3, "x", 1, 1, 0, 7.0),
    (5, "c", 20, 1, 1, 3.0),
    (9, "b", 1, 1, 1, 9.0),
    (5, "d", 20, 0, 0, 4.0),
    (3, "y", 2, 0, 1, 8.0),
    (5, "e", 50, 1, 0, 5.0),
    (2, "g", 3, 0, 0, 1.5),
    (5, "f", 5, 0, 0, 6.0),
    (3, "z", 3, 1, 1, 9.5),
]
HAND_USERS = pd.DataFrame({"uid": [2, 5, 9], "country": ["de", "fr", "fr"], "age": [30, 40, 50]})
HAND_CONFIG = rw.RankingWorkflowConfig(
    user_column="uid", item_column="item", timestamp_column="ts", action_names=("click", "like"),
    watch_time_column="wt", contextual_columns=("uid", "country"), num_candidates=2, max_uih_len=3)
# written by hand from the rows above (K=2, UIH = most recent 3 events before the candidates):
# user -> (UIH items, UIH bitmasks, UIH times, UIH watch, candidates, candidate bitmasks, candidate watch, query time)
HAND_EXPECTED = {
    2: (["g"], [0], [3], [1.5], ["a"], [3], [0.5], 3),
    3: (["x"], [1], [1], [7.0], ["y", "z"], [2, 3], [8.0, 9.5], 1),
    5: (["a", "c", "d"], [1, 3, 0], [10, 20, 20], [1.0, 3.0, 4.0], ["b", "e"], [2, 1], [2.0, 5.0], 20),
}


def hand_log() -> pd.DataFrame:
    df = pd.DataFrame(HAND_ROWS, columns=["uid", "item", "ts", "click", "like", "wt"])
    df["note"] = "ignored"
    return df


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    out = tmp_path_factory.mktemp("hand") / "ranking"
    return rw.preprocess_ranking(hand_log(), out, HAND_CONFIG, user_features=HAND_USERS)


def test_hand_log_exact_samples(hand):
    df = hand.to_pandas()
    assert list(df.columns) == [
        "uid", roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, rw.WATCH_TIME_LIST, rw.CANDIDATE_ITEM_LIST,
        rw.CANDIDATE_ACTION_LIST, rw.CANDIDATE_WATCH_TIME_LIST, rw.QUERY_TIME, roles.LENGTH, rw.NUM_CANDIDATES,
        "context-uid", "context-country"]
    items = load_item_id_mapping(hand.workflow_path)
    got = {
        int(r["uid"]): ([items[i] for i in r[roles.ITEM_LIST]], list(r[roles.ACTION_LIST]),
                        list(r[roles.TIMESTAMP_LIST]), list(r[rw.WATCH_TIME_LIST]),
                        [items[i] for i in r[rw.CANDIDATE_ITEM_LIST]], list(r[rw.CANDIDATE_ACTION_LIST]),
                        list(r[rw.CANDIDATE_WATCH_TIME_LIST]), int(r[rw.QUERY_TIME]))
        for _, r in df.iterrows()
    }
    assert got == HAND_EXPECTED
    assert df["uid"].tolist() == [2, 3, 5]
    assert df[roles.LENGTH].tolist() == [1, 1, 3] and df[rw.NUM_CANDIDATES].tolist() == [1, 2, 2]
    # contextual: Categorify ids that decode to the user table's values; user 3 is not in it -> null id 1
    country = _load_category_mapping(hand.workflow_path, "context-country")
    assert [country[c] if c > 2 else c for c in df["context-country"]] == ["de", roles.NULL_ID, "fr"]
    uid = _load_category_mapping(hand.workflow_path, "context-uid")
    assert [uid[c] for c in df["context-uid"]] == [2, 3, 5]
    assert hand.num_rows == 3


def test_hand_meta_and_schema(hand):
    meta = json.loads((hand.output_dir / "ranking.json").read_text())
    assert meta["tasks"] == [{"name": "click", "kind": "binary", "bit": 0, "weight": 1.0},
                             {"name": "like", "kind": "binary", "bit": 1, "weight": 1.0}]
    assert (meta["num_candidates"], meta["max_uih_len"], meta["num_rows"], meta["num_candidates_total"]) == (2, 3, 3, 5)
    assert meta["num_items"] == 3 + 10  # Categorify: 0 pad, 1 null, 2 OOV, then the 10 distinct items (a-g, x-z)
    assert meta["contextual_cardinalities"] == {"uid": 3 + 4, "country": 3 + 2}
    assert meta["split"] == {"kind": "users", "test_fraction": 0.25, "seed": 0}
    schema = hand.schema  # read back from processed/schema.pbtxt
    assert roles.item_list_column(schema) == roles.ITEM_LIST  # the candidate list does not make it ambiguous
    assert roles.id_column(schema) == "uid"
    assert set(schema[rw.CANDIDATE_ITEM_LIST].tags) == {Tags.ITEM, Tags.LIST, Tags.CATEGORICAL}
    assert {Tags.TARGET, Tags.BINARY_CLASSIFICATION} <= set(schema[rw.CANDIDATE_ACTION_LIST].tags)
    assert {Tags.TARGET, Tags.REGRESSION} <= set(schema[rw.CANDIDATE_WATCH_TIME_LIST].tags)
    assert set(schema["context-country"].tags) == {Tags.CONTEXT, Tags.CATEGORICAL}
    assert schema[roles.ACTION_LIST].properties[rw.ACTION_ENCODING_PROPERTY] == "bitmask"
    assert roles.embedding_table_size(schema, "context-country") == 5
    assert schema[rw.QUERY_TIME].properties[roles.ROLE_PROPERTY] == rw.ROLE_QUERY_TIME


def test_dataset_batch_layout(hand):
    ds = RankingDataset.load(hand.output_dir)
    batch = ds.batch(ds.sample_index("all"))
    assert batch.history_offsets.tolist() == [0, 1, 2, 5]
    assert batch.candidate_offsets.tolist() == [0, 1, 3, 5]
    items = load_item_id_mapping(hand.workflow_path)
    assert [items[i] for i in batch.history_item_ids] == ["g", "x", "a", "c", "d"]
    assert [items[i] for i in batch.candidate_item_ids] == ["a", "y", "z", "b", "e"]
    assert batch.history_actions.tolist() == [0, 1, 1, 3, 0]
    assert batch.history_timestamps.tolist() == [3, 1, 10, 20, 20]
    assert batch.history_watch_time.tolist() == [1.5, 7.0, 1.0, 3.0, 4.0]
    # labels [Lc, T] in task order (click = bit 0, like = bit 1); candidates carry the query time
    assert batch.labels.tolist() == [[1, 1], [0, 1], [1, 1], [0, 1], [1, 0]]
    assert batch.candidate_timestamps.tolist() == [3, 1, 1, 20, 20]
    assert batch.user_ids.tolist() == [2, 3, 5]
    assert batch.candidate_row.tolist() == [0, 1, 1, 2, 2]
    assert [t.name for t in batch.tasks] == ["click", "like"]
    assert set(batch.contextual) == {"uid", "country"}
    # a task subset and order of the caller's choice
    like_only = RankingDataset.load(hand.output_dir, tasks=["like"]).batch(ds.sample_index("all"))
    assert like_only.labels.tolist() == [[1], [1], [1], [1], [0]]


def test_training_windows_cut_earlier_samples_from_the_history(hand):
    ds = RankingDataset.load(hand.output_dir, test_fraction=0.0, train_windows=0)
    samples = ds.sample_index("train")
    assert len(samples) == 4  # one per user + one window of user 5 (UIH a c d: candidates c d, history a)
    batch = ds.batch(samples)
    items = load_item_id_mapping(hand.workflow_path)
    assert batch.user_ids.tolist() == [2, 3, 5, 5]
    assert batch.history_offsets.tolist() == [0, 1, 2, 5, 6]
    assert [items[i] for i in batch.history_item_ids[5:]] == ["a"]
    assert [items[i] for i in batch.candidate_item_ids[5:]] == ["c", "d"]
    assert batch.labels[5:].tolist() == [[1, 1], [0, 0]]
    assert batch.candidate_timestamps[5:].tolist() == [10, 10]  # the window's query time: its history's last time
    assert ds.num_samples("test") == 0 and len(RankingDataset.load(hand.output_dir, train_windows=1).sample_index("all")) == 3
    # shuffled batches cover every sample once, reproducibly
    seen = [u for b in ds.batches("train", 3, shuffle=True, seed=7) for u in b.user_ids.tolist()]
    again = [u for b in ds.batches("train", 3, shuffle=True, seed=7) for u in b.user_ids.tolist()]
    assert sorted(seen) == [2, 3, 5, 5] and seen == again


def test_user_split_is_seeded_disjoint_and_75_25():
    a, b, c = user_split(1000, 0.25, 0), user_split(1000, 0.25, 0), user_split(1000, 0.25, 1)
    assert len(a["test"]) == 250 and len(a["train"]) == 750
    assert np.array_equal(np.sort(np.concatenate([a["train"], a["test"]])), np.arange(1000))
    assert np.array_equal(a["test"], b["test"]) and not np.array_equal(a["test"], c["test"])
    assert np.all(np.diff(a["test"]) > 0)


# ---------------------------------------------------------------------------------------------------------
# KuaiRand layout
# ---------------------------------------------------------------------------------------------------------
KUAIRAND_HEADER = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
                   "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
                   "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab"]


def kuairand_rows(seed: int, n: int, t0: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({c: np.zeros(n, dtype=np.int64) for c in KUAIRAND_HEADER})
    df["user_id"] = rng.integers(0, 4, n)
    df["video_id"] = rng.integers(100, 130, n)
    df["time_ms"] = t0 + rng.integers(0, 20_000, n)  # many events share a second
    for col in rw.KUAIRAND_ACTIONS:
        df[col] = (rng.random(n) < 0.3).astype(np.int64)
    df["play_time_ms"] = rng.integers(0, 60_000, n)
    df["date"], df["hourmin"], df["tab"] = 20220408, 900, 1
    return df


def plain_kuairand_samples(log: pd.DataFrame, k: int, h: int) -> dict:
    """user -> (UIH videos, bitmasks, seconds, candidate videos, bitmasks, watch seconds), by a plain loop."""
    out = {}
    for user in sorted(log["user_id"].unique()):
        rows = log[log["user_id"] == user]
        events = sorted(zip(rows["time_ms"], range(len(rows)), rows["video_id"],
                            rows[list(rw.KUAIRAND_ACTIONS)].to_numpy().tolist(), rows["play_time_ms"]))
        masks = [sum(bit << b for b, bit in enumerate(acts)) for _, _, _, acts, _ in events]
        n = len(events)
        c = min(k, n - 1)
        if c < 1:
            continue
        uih = list(range(max(n - c - h, 0), n - c))
        out[int(user)] = ([int(events[i][2]) for i in uih], [masks[i] for i in uih],
                          [int(events[i][0]) // 1000 for i in uih], [int(events[i][2]) for i in range(n - c, n)],
                          [masks[i] for i in range(n - c, n)], [events[i][4] / 1000 for i in range(n - c, n)])
    return out


def test_kuairand_layout_on_generated_files(tmp_path):
    data = tmp_path / "KuaiRand-1K" / "data"
    data.mkdir(parents=True)
    first, second = kuairand_rows(0, 60, 1_649_400_000_000), kuairand_rows(1, 40, 1_649_400_010_000)
    first.to_csv(data / "log_standard_4_08_to_4_21_1k.csv", index=False)
    second.to_csv(data / "log_standard_4_22_to_5_08_1k.csv", index=False)
    pd.DataFrame({"user_id": [0, 1, 2, 3], "user_active_degree": ["high_active", "full_active", "UNKNOWN", "high_active"],
                  "is_live_streamer": [0, 0, 1, 0], "follow_user_num_range": ["0", "(0,10]", "0", "500+"],
                  "fans_user_num_range": ["0", "[1,10)", "0", "0"], "friend_user_num_range": ["0"] * 4,
                  "register_days_range": ["31-60"] * 4}).to_csv(data / "user_features_1k.csv", index=False)
    source = rw.kuairand_ranking_source(data, "1k", num_candidates=3, max_uih_len=5)
    assert [t.name for t in source.tasks] == list(rw.KUAIRAND_ACTIONS)
    assert [t.bit for t in source.tasks] == list(range(8))
    out = rw.preprocess_source(source, tmp_path / "out")
    df = out.to_pandas()
    items = _load_category_mapping(out.workflow_path, "item_id")
    got = {int(r["user_id"]): ([int(items[i]) for i in r[roles.ITEM_LIST]], list(r[roles.ACTION_LIST]),
                               list(r[roles.TIMESTAMP_LIST]), [int(items[i]) for i in r[rw.CANDIDATE_ITEM_LIST]],
                               list(r[rw.CANDIDATE_ACTION_LIST]), list(r[rw.CANDIDATE_WATCH_TIME_LIST]))
           for _, r in df.iterrows()}
    expected = plain_kuairand_samples(pd.concat([first, second], ignore_index=True), k=3, h=5)
    assert got == expected
    degree = _load_category_mapping(out.workflow_path, "context-user_active_degree")
    assert [degree[c] for c in df["context-user_active_degree"]] == ["high_active", "full_active", "UNKNOWN",
                                                                     "high_active"]
    assert list(out.meta["contextual_cardinalities"]) == list(rw.KUAIRAND_CONTEXTUAL)


def test_kuairand_bad_files(tmp_path):
    with pytest.raises(rw.RankingDataError, match="no log_standard"):
        rw.kuairand_ranking_source(tmp_path)
    kuairand_rows(0, 5, 0).drop(columns=["is_like"]).to_csv(tmp_path / "log_standard_4_08_to_4_21_1k.csv", index=False)
    with pytest.raises(rw.RankingDataError, match=r"not a KuaiRand log: missing column\(s\) \['is_like'\]"):
        rw.kuairand_ranking_source(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# MovieLens recipe
# ---------------------------------------------------------------------------------------------------------
def test_movielens_recipe_on_generated_files(tmp_path):
    ratings = [(1, 10, 5, 100), (1, 20, 4, 101), (1, 30, 3, 102), (1, 40, 5, 103), (2, 20, 1, 50), (2, 10, 4, 60)]
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings))
    (tmp_path / "movies.dat").write_text("".join(f"{m}::Movie {m} (2000)::Drama\n" for m in (10, 20, 30, 40, 55)))
    (tmp_path / "users.dat").write_text("1::F::25::3::55117\n2::M::56::16::70072\n")
    source = rw.movielens_ranking_source("ml-1m", tmp_path, num_candidates=2, rating_task=True, check_counts=False)
    out = rw.preprocess_source(source, tmp_path / "out")
    df = out.to_pandas()
    # raw movie ids; bits rated (1) | liked (2, rating >= 4) | loved (4, rating == 5); watch time = the rating
    assert df[roles.ITEM_LIST].map(list).tolist() == [[10, 20], [20]]
    assert df[roles.ACTION_LIST].map(list).tolist() == [[7, 3], [1]]
    assert df[rw.CANDIDATE_ITEM_LIST].map(list).tolist() == [[30, 40], [10]]
    assert df[rw.CANDIDATE_ACTION_LIST].map(list).tolist() == [[1, 7], [3]]
    assert df[rw.CANDIDATE_WATCH_TIME_LIST].map(list).tolist() == [[3.0, 5.0], [4.0]]
    assert out.meta["num_items"] == 56  # the catalogue's largest id + 1, also for the unrated movie 55
    assert [t["name"] for t in out.meta["tasks"]] == ["liked", "loved", "rating"]
    sex = _load_category_mapping(out.workflow_path, "context-sex")
    assert [sex[c] for c in df["context-sex"]] == ["F", "M"]
    batch = RankingDataset.load(out.output_dir).batch(RankingDataset.load(out.output_dir).sample_index("all"))
    assert batch.labels.tolist() == [[0, 0, 3], [1, 1, 5], [1, 0, 4]]


def test_staged_ml1m_prefix_against_plain_pandas(shared_data, tmp_path):
    """The benchmark set: real ML-1M prefix ratings, K=10, UIH <= 200, compared with a plain pandas recipe."""
    out = rw.preprocess_ranking_dataset("ml-1m-prefix-ranking", None, tmp_path / "ml")
    df = out.to_pandas()
    # UserID::MovieID::Rating::Timestamp read as ':'-separated fields (the empty ones in between are dropped)
    raw = pd.read_csv(shared_data / "movielens-1m" / "ratings.prefix-487650.dat.xz", sep=":", header=None,
                      usecols=[0, 2, 4, 6], names=["user", "movie", "rating", "time"])
    assert out.num_rows == 2999 and out.meta["num_candidates_total"] == 29_990  # every user has >= 20 ratings
    for user in (1, 1000, 2999):
        events = raw[raw.user == user].reset_index(drop=True)
        events = events.iloc[np.argsort(events["time"].to_numpy(), kind="stable")]
        movies, ratings, times = events["movie"].tolist(), events["rating"].tolist(), events["time"].tolist()
        row = df[df["user_id"] == user].iloc[0]
        assert list(row[rw.CANDIDATE_ITEM_LIST]) == movies[-10:]
        assert list(row[rw.CANDIDATE_ACTION_LIST]) == [1 + 2 * (r >= 4) + 4 * (r == 5) for r in ratings[-10:]]
        assert list(row[roles.ITEM_LIST]) == movies[:-10][-200:]
        assert int(row[rw.QUERY_TIME]) == max(times[:-10][-200:])
    labels = RankingDataset.load(out.output_dir).labels("all")
    ordered = raw.iloc[np.lexsort((raw["time"].to_numpy(), raw["user"].to_numpy()))]  # stable: file order on ties
    candidates = ordered.groupby("user", sort=True).tail(10)["rating"].to_numpy()
    assert labels[:, 0].mean() == pytest.approx((candidates >= 4).mean())  # liked
    assert labels[:, 1].mean() == pytest.approx((candidates == 5).mean())  # loved


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def test_cli_preprocess_ranking_events(tmp_path, capsys):
    log = tmp_path / "events.csv"
    hand_log().to_csv(log, index=False)
    users = tmp_path / "users.csv"
    HAND_USERS.to_csv(users, index=False)
    out = tmp_path / "out"
    argv = ["preprocess-ranking", "--format", "events", "--input", str(log), "--output", str(out),
            "--user-column", "uid", "--item-column", "item", "--timestamp-column", "ts", "--action-names",
            "click,like", "--tasks", "like", "--watch-time-column", "wt", "--watch-time-task", "watch",
            "--contextual", "uid,country", "--user-features", str(users), "--num-candidates", "2", "--max-uih-len", "3"]
    assert main(argv) == 0
    assert "3 users" in capsys.readouterr().out
    meta = json.loads((out / "ranking.json").read_text())
    assert [(t["name"], t["kind"]) for t in meta["tasks"]] == [("like", "binary"), ("watch", "regression")]
    assert rw.read_processed_frame(out)[rw.CANDIDATE_ITEM_LIST].map(len).tolist() == [1, 2, 2]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv[:5] + ["--output", str(tmp_path / "o2")]) == 2  # no actions named
    assert "needs actions" in capsys.readouterr().err


def test_cli_names_match_the_registry_and_help_is_real(capsys):
    assert set(RANKING_DATASET_NAMES) == set(rw.RANKING_DATASETS)
    with pytest.raises(SystemExit) as done:
        main(["preprocess-ranking", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--format" in text and "kuairand" in text and "rating>=4" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "preprocess-ranking" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns=["like"]), r"missing column\(s\) \['like'\]"),
    (lambda df: df.assign(click=df["click"] * 2), "other than 0/1"),
    (lambda df: df.assign(wt=np.where(df["ts"] == 40, np.nan, df["wt"])), "watch_time_column"),
    (lambda df: df.assign(ts=df["ts"].astype(str)), "non-numeric"),
    (lambda df: df.iloc[:0], "empty"),
])
def test_bad_event_logs(tmp_path, change, message):
    with pytest.raises(rw.EventLogError, match=message):  # RankingDataError or the session checks' EventLogError
        rw.preprocess_ranking(change(hand_log()), tmp_path / "out", HAND_CONFIG, user_features=HAND_USERS)
    assert not (tmp_path / "out").exists()


def test_bad_bitmask_and_contextual_values(tmp_path):
    cfg = rw.RankingWorkflowConfig(user_column="uid", item_column="item", timestamp_column="ts",
                                   action_column="mask", contextual_columns=("height",))
    df = hand_log().assign(mask=-1, height=1.75)
    tasks = [RankingTask("first", "binary", bit=0)]
    with pytest.raises(ValueError, match="needs at least one task"):
        rw.preprocess_ranking(df, tmp_path / "out", cfg)  # a bitmask without action_names names no task
    with pytest.raises(rw.RankingDataError, match="not a bitmask"):
        rw.preprocess_ranking(df, tmp_path / "out", cfg, tasks=tasks)
    with pytest.raises(rw.RankingDataError, match="contextual features are categorical"):
        rw.preprocess_ranking(df.assign(mask=3), tmp_path / "out", cfg, tasks=tasks)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_candidates": 0}, "num_candidates must be an integer >= 1"),
    ({"action_names": ()}, "needs actions"),
    ({"contextual_columns": ("click",)}, "are event columns"),
    ({"item_encoding": "hash"}, "item_encoding"),
    ({"min_uih_len": 5, "max_uih_len": 3}, "exceeds max_uih_len"),
])
def test_bad_configs(kwargs, message):
    values = {"user_column": "uid", "item_column": "item", "timestamp_column": "ts", "action_names": ("click",),
              **kwargs}
    with pytest.raises(ValueError, match=message):
        rw.RankingWorkflowConfig(**values)


def test_too_short_logs_leave_nothing_behind(tmp_path):
    cfg = rw.RankingWorkflowConfig(user_column="uid", item_column="item", timestamp_column="ts",
                                   action_names=("click",), min_uih_len=6, max_uih_len=10)
    with pytest.raises(rw.RankingDataError, match="min_uih_len"):
        rw.preprocess_ranking(hand_log(), tmp_path / "out", cfg)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    with pytest.raises(ValueError, match="needs RankingWorkflowConfig.watch_time_column"):
        rw.preprocess_ranking(hand_log(), tmp_path / "out", cfg, tasks=[RankingTask("wt", "regression")])


def test_loader_errors(hand, tmp_path):
    with pytest.raises(FileNotFoundError, match="ranking.json is missing"):
        RankingDataset.load(tmp_path)
    with pytest.raises(ValueError, match="unknown task 'share'"):
        RankingDataset.load(hand.output_dir, tasks=["share"])
    ds = RankingDataset.load(hand.output_dir)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        ds.num_batches("valid", 4)
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches("all", 0))
