"""Fractal expansion (merlin_hstu.data.fractal, `merlin-hstu expand`) on the real MovieLens-100K log: deterministic
and resumable block by block, every expanded event a sampled copy of a source event at its own time, the expected
size, and the shape of the source kept (user-length tail and item-popularity curve, checked numerically)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_hstu.cli.main import main
from merlin_hstu.data.fractal import FractalConfig, expand, reduced_matrix, shape_statistics, source_matrix


@pytest.fixture(scope="module")
def ml100k(shared_data) -> pd.DataFrame:
    from merlin_hstu.workflows.datasets import read_movielens_100k_ratings

    return read_movielens_100k_ratings(shared_data / "movielens-100k" / "u.data.xz")


def read_expansion(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part_*.parquet"))], ignore_index=True)


def test_expansion_is_a_seeded_sample_of_source_events_and_resumes_block_by_block(ml100k, tmp_path):
    config = FractalConfig(user_factor=3, item_factor=2, seed=7)
    manifest = expand(ml100k, tmp_path / "a", config)
    first = read_expansion(tmp_path / "a")
    m, n = ml100k["user_id"].nunique(), ml100k["item_id"].nunique()
    assert (manifest["users"], manifest["items"]) == (3 * m, 2 * n) and manifest["events"] == len(first)
    assert first["user_id"].between(1, 3 * m).all() and first["item_id"].between(1, 2 * n).all()
    # size: a sum of independent Bernoulli draws, within 4 standard deviations of its mean
    p = np.asarray(manifest["reduced_matrix"])
    mean, var = len(ml100k) * p.sum(), len(ml100k) * (p * (1 - p)).sum()
    assert abs(len(first) - mean) < 4 * np.sqrt(var) + 1
    # each part holds its user block, sorted by user then time
    for part in manifest["parts"]:
        frame = pd.read_parquet(tmp_path / "a" / part["file"])
        lo, hi = part["users"]
        assert frame["user_id"].between(lo, hi).all() and len(frame) == part["events"]
        assert frame.sort_values(["user_id", "timestamp"], kind="stable").index.equals(frame.index)
    # every expanded event is a source event (same source user, item, rating and time)
    src = source_matrix(ml100k, config)
    back = pd.DataFrame({"user_id": src.user_ids[(first["user_id"] - 1) % m],
                         "item_id": src.item_ids[(first["item_id"] - 1) % n],
                         "rating": first["rating"], "timestamp": first["timestamp"]})
    joined = back.merge(ml100k.drop_duplicates(), how="left", indicator=True)
    assert (joined["_merge"] == "both").all()
    ids = pd.read_parquet(tmp_path / "a" / "source_items.parquet")
    assert ids["source_id"].tolist() == sorted(ml100k["item_id"].unique().tolist())
    # deterministic; another seed gives another sample
    expand(ml100k, tmp_path / "b", config)
    pd.testing.assert_frame_equal(read_expansion(tmp_path / "b"), first)
    expand(ml100k, tmp_path / "c", FractalConfig(user_factor=3, item_factor=2, seed=8))
    assert not read_expansion(tmp_path / "c").equals(first)
    # a killed run resumes: a missing block (and a stray temp file) is written again, identically
    (tmp_path / "a" / "part_00001.parquet").unlink()
    (tmp_path / "a" / ".part_00002.parquet.tmp-1").write_bytes(b"partial")
    written = []
    expand(ml100k, tmp_path / "a", config, on_block=lambda a, k, rows: written.append(a))
    assert written == [0, 1, 2]
    pd.testing.assert_frame_equal(read_expansion(tmp_path / "a"), first)
    with pytest.raises(FileExistsError, match="another config"):
        expand(ml100k, tmp_path / "a", FractalConfig(user_factor=3, item_factor=2, seed=9))


def test_expansion_keeps_the_shape_of_user_lengths_and_item_popularity(ml100k, tmp_path):
    source = shape_statistics(ml100k)
    expand(ml100k, tmp_path / "x", FractalConfig(user_factor=4, item_factor=4, seed=0))
    grown = shape_statistics(read_expansion(tmp_path / "x"))
    assert grown["users"] == 4 * source["users"] and grown["events"] > 4 * source["events"]
    # power-law exponents (scale-free): item popularity vs rank, and the user-length tail
    assert abs(grown["popularity_slope"] - source["popularity_slope"]) < 0.12, (source, grown)
    assert abs(grown["length_tail_slope"] - source["length_tail_slope"]) < 0.15, (source, grown)
    assert abs(grown["item_gini"] - source["item_gini"]) < 0.06
    for q in ("0.25", "0.5", "0.75", "0.9"):
        s, g = source["length_quantiles_over_mean"][q], grown["length_quantiles_over_mean"][q]
        assert abs(g - s) / s < 0.3, (q, s, g)
    # contrast 0 with density 1 is an exact copy of every event into every block: shapes identical
    expand(ml100k, tmp_path / "u", FractalConfig(user_factor=2, item_factor=3, contrast=0.0, seed=0))
    exact = read_expansion(tmp_path / "u")
    copy = shape_statistics(exact)
    assert copy["events"] == 6 * source["events"]
    lengths = np.sort(exact.groupby("user_id").size().to_numpy())
    np.testing.assert_array_equal(lengths, np.sort(np.tile(3 * ml100k.groupby("user_id").size().to_numpy(), 2)))
    assert copy["item_gini"] == pytest.approx(source["item_gini"], abs=1e-9)


def test_reduced_matrix_follows_the_logs_coarse_structure(ml100k):
    config = FractalConfig(user_factor=3, item_factor=3, contrast=1.0)
    p = reduced_matrix(source_matrix(ml100k, config), config)
    assert p.shape == (3, 3) and p.max() == pytest.approx(1.0) and (p > 0).all()
    # heavy users x popular items (the leading singular direction) form the densest block, and density falls
    # away from it along both axes
    assert p[0, 0] == p.max() and p[0, 0] > p[0, 2] and p[0, 0] > p[2, 0]
    softer = reduced_matrix(source_matrix(ml100k, config), FractalConfig(user_factor=3, item_factor=3, contrast=0.5))
    np.testing.assert_allclose(softer, np.sqrt(p))


def test_cli_expand_and_its_errors(ml100k, tmp_path, capsys):
    log = tmp_path / "log.csv"
    ml100k.head(5000).to_csv(log, index=False)
    assert main(["expand", "--input", str(log), "--output", str(tmp_path / "out"), "--user-factor", "2",
                 "--item-factor", "2", "--no-progress", "--stats"]) == 0
    printed = capsys.readouterr().out
    assert "block 2/2" in printed and "expanded 5,000 events" in printed and '"expansion"' in printed
    manifest = json.loads((tmp_path / "out" / "fractal.json").read_text())
    assert manifest["config"]["user_factor"] == 2 and len(manifest["parts"]) == 2
    assert main(["expand", "--input", str(log), "--output", str(tmp_path / "bad"), "--user-factor", "0"]) == 2
    assert "--user-factor" in capsys.readouterr().err
    assert main(["expand", "--input", str(log), "--output", str(tmp_path / "bad"), "--user-column", "uid"]) == 2
    assert "no column 'uid'" in capsys.readouterr().err
