"""ml-1m-prefix-ctr: the encoder split into fit / transform (equal to the plain pandas encoding it replaced), saved
with the run, and served: `train -> export -> serve` on a real tritonserver, raw rows in, the offline
probabilities out."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_hstu.ctr.data import (
    ML1M_CTR_CATEGORICAL,
    ML1M_CTR_DENSE,
    ML1M_CTR_LABEL,
    ML1MCTREncoder,
    encode_ml1m_ctr,
    ml1m_ctr_frame,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_encode(df: pd.DataFrame):
    """The encoding as it was written before the fit / transform split (plain pandas, kept verbatim as the
    reference): -> (dense float32 [N, 3], sparse int64 [N, 10], labels, cardinalities, train mask)."""
    train = df["split"].to_numpy() == "train"
    out = pd.DataFrame({ML1M_CTR_LABEL: df[ML1M_CTR_LABEL].to_numpy()})
    cards = []
    for name in ML1M_CTR_CATEGORICAL:
        vocab = pd.unique(df.loc[train, name])
        codes = pd.Index(vocab).get_indexer(df[name])
        out[name] = codes + 1
        cards.append(len(vocab) + 1)
    user_counts = df.loc[train, "user_id"].value_counts()
    item_counts = df.loc[train, "item_id"].value_counts()
    dense = {"user_log_count": np.log1p(df["user_id"].map(user_counts).fillna(0).to_numpy(dtype=np.float64)),
             "item_log_count": np.log1p(df["item_id"].map(item_counts).fillna(0).to_numpy(dtype=np.float64)),
             "release_year": df["release_year"].to_numpy(dtype=np.float64)}
    for name, values in dense.items():
        fill = np.nanmean(values[train])
        values = np.where(np.isnan(values), fill, values)
        std = values[train].std() or 1.0
        out[name] = (values - values[train].mean()) / std
    return (out[ML1M_CTR_DENSE].to_numpy(np.float32), out[ML1M_CTR_CATEGORICAL].to_numpy(np.int64),
            out[ML1M_CTR_LABEL].to_numpy(np.float32), cards, train)


def small_frame(seed: int = 0) -> pd.DataFrame:
    """A tiny MovieLens-shaped log: a title without a year (NaN release year), users / items / a zip code seen
    only in the validation rows (unseen -> id 0, count 0)."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"user_id": np.arange(1, 13), "gender": ["F", "M"] * 6, "age": rng.choice([1, 18, 25], 12),
                          "occupation": rng.integers(0, 5, 12),
                          "zip_code": [f"{z:05d}" for z in rng.integers(10000, 99999, 12)]})
    titles = [f"Movie {i} ({1950 + i * 3})" for i in range(1, 20)] + ["No Year"]
    genres = ["Drama", "Comedy|Romance", "Action|Thriller|Drama", "Horror"]
    movies = pd.DataFrame({"item_id": np.arange(100, 120), "title": titles,
                           "genres": [genres[i % 4] for i in range(20)]})
    events = pd.DataFrame({"user_id": rng.integers(1, 13, 300), "item_id": rng.integers(100, 120, 300),
                           "rating": rng.integers(1, 6, 300),
                           "timestamp": 978_300_000 + rng.integers(0, 400_000, 300)})
    return ml1m_ctr_frame(events, users, movies)


def test_encoder_fit_transform_equals_the_plain_encoding():
    df = small_frame()
    dense, sparse, labels, cards, train = reference_encode(df)
    assert (sparse[~train] == 0).any() and np.isnan(df["release_year"].to_numpy(np.float64)).any()
    data = encode_ml1m_ctr(df)
    assert data.cardinalities == cards
    for split, mask in ((data.train, train), (data.valid, ~train)):
        np.testing.assert_array_equal(split.dense.numpy(), dense[mask])
        np.testing.assert_array_equal(split.sparse.numpy(), sparse[mask])
        np.testing.assert_array_equal(split.labels.numpy(), labels[mask])
        assert split.dense_names == ML1M_CTR_DENSE and split.sparse_names == ML1M_CTR_CATEGORICAL
    # the saved encoder (JSON) encodes any rows, one at a time too, as the fitted one did in bulk
    encoder = ML1MCTREncoder.from_dict(json.loads(json.dumps(data.info["encoder"])))
    assert encoder.cardinalities() == cards
    rows = df[~train].reset_index(drop=True)
    single = pd.concat([encoder.transform(rows.iloc[[i]]) for i in range(len(rows))], ignore_index=True)
    np.testing.assert_array_equal(single[ML1M_CTR_DENSE].to_numpy(np.float32), dense[~train])
    np.testing.assert_array_equal(single[ML1M_CTR_CATEGORICAL].to_numpy(np.int64), sparse[~train])
    with pytest.raises(ValueError, match=r"lack column\(s\) \[.genre_2.\]"):
        encoder.transform(rows.drop(columns=["genre_2"]))


CTR_TRAIN = ["--set", "model.embedding_dim=8", "--set", "model.num_layers=1", "--set", "train.epochs=1",
             "--set", "train.batch_size=128", "--set", "train.max_steps=3", "--set", "train.threads=1"]


def test_ml1m_ctr_run_exports_and_serves_raw_rows(shared_data, tmp_path, tmp_path_factory, capsys):
    """train (3 steps) -> export -> `merlin-hstu serve` (a real tritonserver) -> query 20 raw validation rows: the
    served probabilities are the offline model's sigmoid(logits) on the training tensors.  A 21st row with an
    unseen user, an empty gender and no release year is checked against the plain reference encoding."""
    from serving_helpers import cli_server

    from merlin_hstu.cli.main import main
    from merlin_hstu.ctr.data import ML1M_CTR_RAW, load_ml1m_ctr
    from merlin_hstu.ctr.train import predict_logits
    from merlin_hstu.serving.repository import read_serving_record
    from merlin_hstu.train.run_dir import load_run
    from merlin_hstu.workflows.datasets import load_dataset

    source = shared_data / "movielens-1m"
    if not source.is_dir():
        pytest.skip(f"{source} is not staged")
    run_dir, repo = tmp_path / "run", tmp_path / "repo"
    assert main(["train", "--task", "ctr", "--data", "ml-1m-prefix-ctr", "--output", str(run_dir), "--no-progress",
                 *CTR_TRAIN]) == 0
    assert main(["export", "--run", str(run_dir), "--output", str(repo), "--instances", "1"]) == 0
    record = read_serving_record(repo)
    assert record["contract"]["encoding"] == "ml-1m-ctr" and record["data"] == "ml-1m-prefix-ctr"
    assert sorted(record["contract"]["categorical_columns"]) == ["gender", "genre_1", "genre_2", "zip_prefix"]

    run = load_run(run_dir)
    # a run saved before the encoder was kept: it still loads, and its export says why it is refused
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    blob = torch.load(old / "model.pt", map_location="cpu", weights_only=False)
    assert ML1MCTREncoder.from_dict(blob.pop("encoder")).cardinalities() == blob["cardinalities"]
    torch.save(blob, old / "model.pt")
    assert load_run(old).model.state_dict().keys() == run.model.state_dict().keys()
    capsys.readouterr()
    assert main(["export", "--run", str(old), "--output", str(tmp_path / "old_repo")]) == 2
    assert "keeps no fitted encoder" in capsys.readouterr().err

    data = load_ml1m_ctr(source)
    offline = torch.sigmoid(predict_logits(run.model, data.valid.take(torch.arange(20)))).numpy()
    loaded = load_dataset("ml-1m-prefix", source)
    frame = ml1m_ctr_frame(loaded.events, loaded.user_features, loaded.item_features)
    raw = frame[frame["split"] == "valid"].iloc[:20][ML1M_CTR_RAW].reset_index(drop=True)
    np.testing.assert_array_equal(frame[frame["split"] == "valid"]["label"].iloc[:20].to_numpy(np.float32),
                                  data.valid.labels[:20].numpy())
    odd = frame[frame["split"] == "valid"].iloc[[0]].copy()
    odd["user_id"], odd["gender"], odd["release_year"] = 10**7, "", np.nan
    dense, sparse, _, _, _ = reference_encode(pd.concat([frame, odd], ignore_index=True))
    assert sparse[-1, ML1M_CTR_CATEGORICAL.index("user_id")] == 0 and sparse[-1, 2] == 0
    with torch.no_grad():
        odd_offline = torch.sigmoid(run.model(torch.from_numpy(dense[-1:]), torch.from_numpy(sparse[-1:]))).numpy()
    offline = np.concatenate([offline, odd_offline])
    raw = pd.concat([raw, odd[ML1M_CTR_RAW]], ignore_index=True)
    raw.to_parquet(tmp_path / "rows.parquet")

    with cli_server(["--repo", repo], tmp_path_factory.mktemp("serve") / "serve.log") as handle:
        http = handle["http"].split(":")[1]
        capsys.readouterr()
        assert main(["query", "--url", f"127.0.0.1:{http}", "--model-name", "ctr", "--request",
                     str(tmp_path / "rows.parquet"), "--json"]) == 0, capsys.readouterr().err
        lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [line["row"] for line in lines] == list(range(21))
        np.testing.assert_allclose([line["click_probability"] for line in lines], offline, atol=1e-5, rtol=0)
        raw.drop(columns=["genre_2"]).to_parquet(tmp_path / "short.parquet")
        assert main(["query", "--url", f"127.0.0.1:{http}", "--model-name", "ctr", "--request",
                     str(tmp_path / "short.parquet")]) == 2
        assert "lacks column(s) ['genre_2']" in capsys.readouterr().err
