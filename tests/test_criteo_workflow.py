"""The Criteo-layout NVTabular workflow (merlin_hstu.workflows.criteo_workflow) and the synthetic generator.

Expected values are computed here from the Criteo recipe: missing -> 0, clip at 0, log(1 + x), then
(x - mean) / std with the training rows' mean and sample std; Categorify ids 0 pad, 1 null, 2 OOV, 3.. vocab.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import nvtabular as nvt
from merlin.io import Dataset
from merlin.schema import Tags

from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, load_criteo_tensors, write_criteo_tsv
from merlin_hstu.workflows.criteo_workflow import (CATEGORICAL_COLUMNS, INTEGER_COLUMNS, CriteoFormatError,
                                                   CriteoWorkflowConfig, preprocess_criteo, read_criteo_tsv)

# 6 hand-made lines: label, I1..I4 (the rest of the integers are the line number), C1, C2, then 24 filler columns
INTS = [[3, "", 0, 10], [1, -1, 5, ""], [0, 2, "", 7], [8, 3, 1, 1], [2, 0, 0, 0], [5, 5, 5, 5]]
C1 = ["aa", "aa", "bb", "", "aa", "cc"]  # freq_threshold=2 on the first 4 lines: only "aa" is in the vocabulary
C2 = ["x1", "x2", "x1", "x3", "x1", "x9"]  # hashed into 5 buckets


def hand_made_lines():
    lines = []
    for k in range(6):
        ints = [str(v) for v in INTS[k]] + [str(k)] * 9
        cats = [C1[k], C2[k]] + [f"{k % 2:08x}"] * 24
        lines.append("\t".join([str(k % 2)] + ints + cats))
    return lines


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    root = tmp_path_factory.mktemp("criteo")
    src = write_lines(root / "day_0.tsv", hand_made_lines())
    config = CriteoWorkflowConfig(freq_threshold=2, hash_buckets={"C2": 5}, valid_fraction=1 / 3)
    return preprocess_criteo(src, root / "out", config), src


def expected_integer(column: int):
    """(train, valid) values of I<column+1> after FillMissing(0) >> Clip(0) >> LogOp >> Normalize(train)."""
    raw = [0.0 if row[column] == "" else float(row[column]) for row in INTS]
    logs = [math.log1p(max(v, 0.0)) for v in raw]
    train = logs[:4]
    mean = sum(train) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in train) / 3)  # sample std, as NVTabular's Normalize
    return [(v - mean) / std for v in logs[:4]], [(v - mean) / std for v in logs[4:]]


def test_workflow_transformations_on_hand_made_file(hand_made):
    ds, _ = hand_made
    assert ds.num_rows == {"train": 4, "valid": 2}
    train, valid = ds.to_pandas("train"), ds.to_pandas("valid")
    assert train["label"].tolist() == [0, 1, 0, 1] and valid["label"].tolist() == [0, 1]
    for j in range(4):
        exp_train, exp_valid = expected_integer(j)
        np.testing.assert_allclose(train[f"I{j + 1}"], exp_train, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(valid[f"I{j + 1}"], exp_valid, rtol=1e-5, atol=1e-6)
    # C1: "aa" (2 train lines) is vocabulary, "bb" (1 line) and unseen "cc" are OOV (2), empty is null (1)
    assert train["C1"].tolist() == [3, 3, 2, 1] and valid["C1"].tolist() == [3, 2]
    assert ds.schema["C1"].int_domain.max == 3
    # C2: hashed, no vocabulary: one value -> one id in every row and split, ids 0..4
    c2 = pd.concat([train["C2"], valid["C2"]]).tolist()
    assert all(0 <= v < 5 for v in c2) and c2[0] == c2[2] == c2[4]
    assert ds.schema["C2"].int_domain.max == 4
    assert set(ds.schema["I1"].tags) == {Tags.CONTINUOUS}
    assert set(ds.schema["C3"].tags) == {Tags.CATEGORICAL}
    assert {Tags.TARGET, Tags.BINARY_CLASSIFICATION} <= set(ds.schema["label"].tags)
    assert sorted(ds.schema.column_names) == sorted(["label", *INTEGER_COLUMNS, *CATEGORICAL_COLUMNS])


def test_saved_workflow_reproduces_the_output_and_nothing_partial_is_left(hand_made):
    ds, src = hand_made
    workflow = nvt.Workflow.load(str(ds.workflow_path))
    rows = read_criteo_tsv(src).iloc[4:].reset_index(drop=True)
    again = workflow.transform(Dataset(rows, cpu=True)).to_ddf().compute()
    pd.testing.assert_frame_equal(again[ds.to_pandas("valid").columns].reset_index(drop=True),
                                  ds.to_pandas("valid"), check_dtype=False)
    assert not [p for p in ds.path.parent.iterdir() if p.name.startswith(".")]  # staging dir renamed away
    with pytest.raises(FileExistsError, match="overwrite=True"):
        preprocess_criteo(src, ds.path)


def test_reads_files_without_label_and_dataframes(hand_made, tmp_path):
    _, src = hand_made
    unlabeled = write_lines(tmp_path / "test.tsv", [line.split("\t", 1)[1] for line in hand_made_lines()])
    df = read_criteo_tsv(unlabeled, CriteoWorkflowConfig(has_label=False))
    assert "label" not in df.columns and len(df) == 6
    assert np.isnan(df["I2"].iloc[0]) and df["I2"].iloc[1] == -1 and df["C1"].iloc[3] is None
    again = read_criteo_tsv(read_criteo_tsv(src))  # a DataFrame goes through the same checks
    pd.testing.assert_frame_equal(again, read_criteo_tsv(src))


def _replace_field(line: str, index: int, value: str) -> str:
    fields = line.split("\t")
    fields[index] = value
    return "\t".join(fields)


@pytest.mark.parametrize("edit, match", [
    (lambda ls: ls[:2] + ["\t".join(ls[2].split("\t")[:-1])] + ls[3:], r"line 3 has 39 tab-separated fields, expected 40"),
    (lambda ls: ls[:4] + [ls[4] + "\textra"] + ls[5:], r"line 5 has 41 tab-separated fields, expected 40"),
    (lambda ls: ["\t".join(ls[0].split("\t")[:30])] + ls[1:], r"line 1 has 30 tab-separated fields"),
    (lambda ls: ls[:1] + [_replace_field(ls[1], 3, "abc")] + ls[2:], r"line 2, integer field 'I3' is 'abc'"),
    (lambda ls: ls[:3] + [_replace_field(ls[3], 1, "1.5")] + ls[4:], r"line 4, integer field 'I1' is '1.5'"),
    (lambda ls: [_replace_field(ls[0], 0, "2")] + ls[1:], r"line 1, field 'label' is '2'"),
    (lambda ls: [], r"the file is empty"),
])
def test_bad_files_give_clear_errors(tmp_path, edit, match):
    lines = edit(hand_made_lines())
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n" if lines else "")
    with pytest.raises(CriteoFormatError, match=match):
        preprocess_criteo(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_config_and_frames_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot combine freq_threshold and max_size"):
        CriteoWorkflowConfig(freq_threshold=2, max_size=100)
    with pytest.raises(ValueError, match=r"hash_buckets names \['I1'\]"):
        CriteoWorkflowConfig(hash_buckets={"I1": 10})
    with pytest.raises(ValueError, match="valid_fraction"):
        CriteoWorkflowConfig(valid_fraction=1.0)
    with pytest.raises(CriteoFormatError, match=r"missing Criteo column\(s\) \['C26'\]"):
        read_criteo_tsv(pd.DataFrame({c: [0] for c in ["label", *INTEGER_COLUMNS, *CATEGORICAL_COLUMNS[:-1]]}))
    with pytest.raises(CriteoFormatError, match="does not exist"):
        read_criteo_tsv(tmp_path / "nope.tsv")


def test_synthetic_criteo_round_trip(tmp_path):
    cfg = SyntheticCriteoConfig(num_rows=3000, seed=1, max_cardinality=500)
    first, second = generate_synthetic_criteo(cfg), generate_synthetic_criteo(cfg)
    pd.testing.assert_frame_equal(first.frame, second.frame)  # seeded: identical
    np.testing.assert_array_equal(first.planted_logit, second.planted_logit)
    ceilings = first.ceiling_aucs()
    assert 0.5 < ceilings["order<=1"] < ceilings["order<=2"] < ceilings["order<=3"]
    src = write_criteo_tsv(first.frame, tmp_path / "synthetic.tsv")
    assert len(src.read_text().splitlines()[0].split("\t")) == 40
    ds = preprocess_criteo(src, tmp_path / "out", CriteoWorkflowConfig(freq_threshold=3))
    data = load_criteo_tensors(ds.path)
    assert (len(data.train), len(data.valid)) == (2700, 300)
    assert data.num_dense == 13 and len(data.cardinalities) == 26
    assert data.cardinalities == [int(ds.schema[c].int_domain.max) + 1 for c in CATEGORICAL_COLUMNS]
    assert bool((data.train.sparse < torch.tensor(data.cardinalities)).all())
    assert data.train.labels.tolist() == first.frame["label"].iloc[:2700].astype(float).tolist()

