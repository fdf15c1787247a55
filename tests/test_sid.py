"""Semantic IDs: the tokenizers (determinism, unique tuples, usage statistics and the residual math against plain
NumPy, reconstruction error by level), the trie-constrained beam search (only catalogue items; equal to exhaustive
scoring on a tiny catalogue), KV-cache decoding against full recomputation, a tiny decoder that trains, the
NVTabular step, the Amazon protocol's validation split, run directories, the bench commands on tiny settings, and
the exported beam search served by a real tritonserver against the offline lists."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from merlin_hstu.encoders.stu import HSTUEncoderConfig
from merlin_hstu.retrieval.data import LeaveOneOut, SequenceTable
from merlin_hstu.sid.config import SIDConfig, load_sid_config
from merlin_hstu.sid.decode import SemanticIdTrie, beam_ranks, beam_search, exhaustive_scores
from merlin_hstu.sid.model import SIDDecoder, SIDModelConfig, item_token_sequences, next_token_loss
from merlin_hstu.sid.tokenizer import (
    BOS_TOKEN,
    SemanticIds,
    TokenizerConfig,
    code_statistics,
    deduplicate,
    fit_tokenizer,
    format_statistics,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered_embeddings(n_items: int = 120, dim: int = 8, clusters: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    labels = np.arange(n_items) % clusters
    return centres[labels] + rng.normal(size=(n_items, dim)), labels


@pytest.fixture(scope="module")
def tiny_sids():
    x, _ = clustered_embeddings(40, 6, 4, seed=1)
    return fit_tokenizer(np.arange(3, 43), x, TokenizerConfig(levels=2, codebook_size=4, seed=3))


def tiny_decoder(sids, *, time_bias=False, positions="token", seed=0, dim=16):
    torch.manual_seed(seed)
    encoder = HSTUEncoderConfig(embedding_dim=dim, num_blocks=2, num_heads=2, attention_dim=8, linear_dim=8,
                                max_seq_len=48, time_bias=time_bias, linear_dropout=0.0)
    return SIDDecoder(SIDModelConfig(sids.codebook_sizes, encoder, input_dropout=0.0, positions=positions)).eval()


def history_of(sids, items):
    table = sids.token_table()
    return torch.cat([torch.tensor([BOS_TOKEN]), table[torch.tensor(items)].reshape(-1)])


# --- tokenizers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rq-kmeans", "rq-vae"])
def test_tokenizer_is_deterministic_and_every_item_gets_a_unique_tuple(method):
    x, _ = clustered_embeddings(90, 8, 5)
    x[10] = x[11] = x[12]  # identical embeddings: identical L codes, told apart by the final level only
    cfg = TokenizerConfig(method=method, levels=2, codebook_size=8, seed=7, vae_epochs=3, vae_batch_size=32,
                          hidden_dims=(16,), latent_dim=4)
    ids = np.arange(5, 95)
    a, b = fit_tokenizer(ids, x, cfg), fit_tokenizer(ids, x, cfg)
    assert np.array_equal(a.codes, b.codes) and a.stats == b.stats
    assert len({tuple(c) for c in a.codes}) == len(ids)  # unique tuples
    assert np.array_equal(a.codes[10:13, :2], np.repeat(a.codes[10:11, :2], 3, axis=0))
    assert sorted(a.codes[10:13, 2]) == [0, 1, 2]  # the final level orders the colliding items by id
    assert a.codebook_sizes[-1] == a.stats["largest_collision_group"] >= 3
    shuffled = np.random.default_rng(0).permutation(len(ids))  # row order does not matter: items are keyed by id
    c = fit_tokenizer(ids[shuffled], x[shuffled], cfg)
    assert np.array_equal(c.item_ids, ids) and (method == "rq-vae" or np.array_equal(c.codes, a.codes))


def test_usage_and_collision_statistics_equal_a_plain_count():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, size=(200, 3))
    final = deduplicate(codes, np.arange(200))
    full = np.concatenate([codes, final[:, None]], axis=1)
    sizes = [5, 4, 4, int(final.max()) + 1]
    stats = code_statistics(full, sizes)
    for level in range(4):
        counts = Counter(full[:, level].tolist())
        row = stats["levels"][level]
        assert row["used"] == len(counts) and row["size"] == sizes[level]
        assert row["usage"] == pytest.approx(len(counts) / sizes[level])
        p = np.array(list(counts.values())) / 200
        assert row["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
        assert row["largest_code_share"] == pytest.approx(max(counts.values()) / 200)
    groups = Counter(tuple(c) for c in codes.tolist())
    assert stats["distinct_tuples_before_final_level"] == len(groups)
    assert stats["items_in_collisions"] == sum(n for n in groups.values() if n > 1)
    assert stats["colliding_tuples"] == sum(1 for n in groups.values() if n > 1)
    assert stats["largest_collision_group"] == max(groups.values()) == sizes[-1]
    assert stats["unique_final_tuples"] == 200
    for key, members in groups.items():  # within a group, final codes are 0.. in item-id order
        rows = [i for i in range(200) if tuple(codes[i]) == key]
        assert final[rows].tolist() == list(range(members))
    assert "largest group" in format_statistics({**stats, "method": "x"})


def test_rq_kmeans_residual_math_equals_a_plain_implementation():
    x, _ = clustered_embeddings(150, 6, 5, seed=2)
    sids = fit_tokenizer(np.arange(3, 153), x, TokenizerConfig(levels=3, codebook_size=6, normalize="center", seed=1))
    books = sids.codebooks
    # plain: centre, then per level the nearest centroid by a Python loop over the codebook, subtract it
    residual = x.astype(np.float64) - x.astype(np.float64).mean(0)
    total = np.mean(np.sum((residual - residual.mean(0)) ** 2, axis=1))
    for level, book in enumerate(books):
        dists = np.array([[np.sum((r - c) ** 2) for c in book] for r in residual])
        code = dists.argmin(1)
        assert np.array_equal(code, sids.codes[:, level])
        residual = residual - book[code]
        assert sids.stats["reconstruction_error"][level] == pytest.approx(np.mean(np.sum(residual ** 2, 1)) / total)
        # Lloyd's fixed point: each used centroid is the mean of the residuals it was fitted on
        before = residual + book[code]
        for k in np.unique(code):
            np.testing.assert_allclose(book[k], before[code == k].mean(0), atol=1e-9)
    assert np.array_equal(sids.encode(x), sids.codes[:, :3])  # new rows through the saved codebooks


@pytest.mark.parametrize("method", ["rq-kmeans", "rq-vae"])
def test_reconstruction_error_decreases_with_levels(method):
    x, _ = clustered_embeddings(200, 8, 8, seed=4)
    cfg = TokenizerConfig(method=method, levels=4, codebook_size=8, seed=0, vae_epochs=20, vae_batch_size=64,
                          hidden_dims=(32,), latent_dim=8)
    errors = fit_tokenizer(np.arange(3, 203), x, cfg).stats["reconstruction_error"]
    assert len(errors) == 4 and errors[0] < 1.0
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_tokenizer_round_trips_and_rejects_bad_input(tmp_path, tiny_sids):
    path = tiny_sids.save(tmp_path / "tok")
    back = SemanticIds.load(path)
    assert np.array_equal(back.codes, tiny_sids.codes) and back.codebook_sizes == tiny_sids.codebook_sizes
    assert torch.equal(back.token_table(50), tiny_sids.token_table(50))
    assert back.stats == json.loads((path / "tokenizer.json").read_text())["stats"]
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_tokenizer([3, 4], np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="all zero"):
        fit_tokenizer([3, 4], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one row per item"):
        fit_tokenizer([3, 4, 5], np.ones((2, 3)))
    with pytest.raises(ValueError, match="tokenizer.method"):
        TokenizerConfig(method="pq")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SemanticIds.load(tmp_path)


# --- decoding -----------------------------------------------------------------------------------------------
def test_trie_holds_exactly_the_catalogue(tiny_sids):
    trie = SemanticIdTrie.from_semantic_ids(tiny_sids)
    assert trie.level_sizes()[0] == 1
    leaves = trie.children[-1]
    assert sorted(leaves[leaves >= 0].tolist()) == tiny_sids.item_ids.tolist()
    for item, codes in zip(tiny_sids.item_ids, tiny_sids.codes):  # walking an item's codes ends at the item
        node = 0
        for level, code in enumerate(codes):
            node = int(trie.children[level][node, code])
        assert node == item


@pytest.mark.parametrize("engine", ["cached", "full"])
def test_constrained_beams_emit_only_catalogue_items(tiny_sids, engine):
    model = tiny_decoder(tiny_sids)
    histories = [history_of(tiny_sids, [5, 9, 12]), history_of(tiny_sids, [30])]
    items, scores = beam_search(model, SemanticIdTrie.from_semantic_ids(tiny_sids), histories, 7, engine)
    assert items.shape == (2, 7)
    catalogue = set(tiny_sids.item_ids.tolist())
    for row, row_scores in zip(items.tolist(), scores):
        assert set(row) <= catalogue and len(set(row)) == 7
        assert torch.all(row_scores[:-1] >= row_scores[1:]) and torch.all(row_scores <= 0)


@pytest.mark.parametrize("engine", ["cached", "full"])
def test_beam_search_with_width_catalogue_equals_exhaustive_scoring(tiny_sids, engine):
    model = tiny_decoder(tiny_sids, seed=2)
    trie = SemanticIdTrie.from_semantic_ids(tiny_sids)
    history = history_of(tiny_sids, [7, 8, 20, 33])
    items, scores = beam_search(model, trie, [history], max(trie.level_sizes()) * 8, engine)
    found = {i: s for i, s in zip(items[0].tolist(), scores[0].tolist()) if i >= 0}
    ids, exact = exhaustive_scores(model, trie, tiny_sids, history)
    assert set(found) == set(ids.tolist()) == set(tiny_sids.item_ids.tolist())
    for item, score in zip(ids.tolist(), exact.tolist()):
        assert found[item] == pytest.approx(score, abs=1e-5)
    assert float(torch.logsumexp(exact, 0)) == pytest.approx(0.0, abs=1e-5)  # a distribution over the catalogue
    # the ranking equals sorting every item's exact score (ties by id)
    order = sorted(zip(exact.tolist(), ids.tolist()), key=lambda t: (-t[0], t[1]))
    assert [i for _, i in order][:10] == items[0, :10].tolist()


@pytest.mark.parametrize("time_bias,positions", [(False, "token"), (True, "item")])
def test_kv_cache_decoding_equals_full_recomputation(tiny_sids, time_bias, positions):
    model = tiny_decoder(tiny_sids, time_bias=time_bias, positions=positions, seed=5)
    trie = SemanticIdTrie.from_semantic_ids(tiny_sids)
    histories = [history_of(tiny_sids, items) for items in ([5, 9, 12, 40], [30], [3, 4])]
    kwargs = {}
    if time_bias:  # every token at its item's time, BOS at the first; the decoded item at the query time
        times = [torch.tensor([100, 100, 100, 100, 250, 250, 250, 900, 900, 900, 5000, 5000, 5000]),
                 torch.tensor([7, 7, 7, 7]), torch.tensor([1000, 1000, 1000, 1000, 1100, 1100, 1100])]
        kwargs = {"history_times": times, "query_times": torch.tensor([9000, 20, 1_000_000])}
    cached = beam_search(model, trie, histories, 6, "cached", return_steps=True, **kwargs)
    full = beam_search(model, trie, histories, 6, "full", return_steps=True, **kwargs)
    assert len(cached[2]) == trie.num_levels
    for a, b in zip(cached[2], full[2]):  # hidden states after the history and after every beam prefix
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert torch.equal(cached[0], full[0])
    torch.testing.assert_close(cached[1], full[1], atol=1e-5, rtol=1e-5)


def test_beam_ranks_follow_the_retrieval_protocol():
    items = torch.tensor([[9, 4, 7, 5, -1], [1, 2, 3, 4, 5], [6, 8, 4, 3, 2]])
    targets = torch.tensor([7, 9, 4])
    history = torch.tensor([[4, 0], [7, 0], [6, 4]])  # user 2's target is in its own history: never filtered
    assert beam_ranks(items, targets, history).tolist() == [2, 6, 2]
    assert beam_ranks(items, targets).tolist() == [3, 6, 3]


# --- training -----------------------------------------------------------------------------------------------
def test_next_token_loss_supervises_each_slot_over_its_level(tiny_sids):
    model = tiny_decoder(tiny_sids)
    table = tiny_sids.token_table(50)
    tokens, lengths, _ = item_token_sequences(table, torch.tensor([[5, 9, 0], [30, 31, 32]]), torch.tensor([2, 3]))
    assert tokens[0, :7].tolist() == [BOS_TOKEN, *table[5].tolist(), *table[9].tolist()] and lengths.tolist() == [7, 10]
    loss = next_token_loss(model, tokens, lengths)
    # plain: every slot s < len - 1 predicts token s + 1 among the codes of level s % T
    h = model.hidden(tokens, lengths)
    offsets, sizes, levels = model.config.token_offsets, model.config.codebook_sizes, model.config.num_levels
    terms = []
    for b in range(2):
        for s in range(int(lengths[b]) - 1):
            level = s % levels
            logits = model.level_logits(h[b, s], level)
            terms.append(-torch.log_softmax(logits, 0)[int(tokens[b, s + 1]) - offsets[level]])
            assert 0 <= int(tokens[b, s + 1]) - offsets[level] < sizes[level]
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-5)


def clustered_table(users: int = 240, seed: int = 0):
    """Users walk inside one of 4 clusters of 10 items (ids 3..42) in id order."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(users):
        cluster = rng.integers(4)
        start = rng.integers(10)
        items.append((3 + cluster * 10 + (start + np.arange(rng.integers(5, 9))) % 10).astype(np.int64))
    return SequenceTable(items, None, np.arange(users), 43)


def test_a_tiny_model_trains(tmp_path):
    from merlin_hstu.sid.train import load_sid_run, recommend_sid, save_sid_run, train_sid

    table = clustered_table()
    emb = np.zeros((40, 4))
    emb[np.arange(40), np.arange(40) // 10] = 1.0
    emb += np.random.default_rng(1).normal(scale=0.05, size=emb.shape)
    sids = fit_tokenizer(np.arange(3, 43), emb, TokenizerConfig(levels=2, codebook_size=4, seed=0))
    cfg = SIDConfig.from_dict({
        "model": {"embedding_dim": 32, "num_blocks": 1, "num_heads": 2, "attention_dim": 16, "linear_dim": 16,
                  "linear_dropout": 0.0, "input_dropout": 0.0},
        "data": {"max_history": 8}, "decode": {"beam_width": 10, "batch_size": 256},
        "train": {"epochs": 6, "batch_size": 32, "learning_rate": 0.005, "ks": [5, 10], "validation_fraction": 1.0,
                  "early_stopping_patience": 3}})
    result = train_sid(table, sids, cfg, progress=False)
    losses = result.epoch_losses
    assert losses[-1] < 0.7 * losses[0]
    metrics = result.metrics["SID-HSTU"]
    # the next item is the successor inside the user's cluster: recall@5 far above the 5/40 of a random guess
    assert metrics["hr@5"] > 0.6 and metrics["ndcg@10"] > 0.35
    run = save_sid_run(tmp_path / "run", result, cfg)
    model, back, back_cfg, record = load_sid_run(run)
    assert back_cfg.to_dict() == cfg.to_dict() and record["metrics"]["SID-HSTU"] == metrics
    before = recommend_sid(result.model.cpu().eval(), sids, [[3, 4, 5], [33, 34]], k=3, beam_width=10)
    assert recommend_sid(model, back, [[3, 4, 5], [33, 34]], k=3, beam_width=10) == before
    assert all(3 <= i <= 12 for i in before[0]) and not {3, 4, 5} & set(before[0])


def test_amazon_protocol_validates_every_users_second_to_last_item():
    table = SequenceTable([np.arange(3, 3 + n, dtype=np.int64) for n in (5, 7, 3)], None, np.arange(3), 20)
    split = LeaveOneOut(table, max_history=10)
    split.hold_out_validation(1.0, seed=0)
    first = lambda part, row: (part.ids[row, :part.lengths[row]].tolist(), int(part.ids[row, part.lengths[row]]))  # noqa
    assert first(split.validation, 0) == ([3, 4, 5], 6) and first(split.eval, 0) == ([3, 4, 5, 6], 7)
    assert first(split.train, 0) == ([3, 4], 5)  # training ends before the validation item
    assert len(split.train.lengths) == 2  # the 3-item user has validation and test samples only
    from merlin_hstu.retrieval.config import load_config

    for name in ("sasrec-amazon", "hstu-amazon", "hstu-large-amazon"):
        cfg = load_config(name)
        assert cfg.train.validation_fraction == 1.0 and cfg.train.early_stopping_patience > 0
        assert cfg.data.timestamp_column is None and set(cfg.train.ks) >= {5, 10}
    assert load_sid_config("sid-hstu-amazon").train.validation_fraction == 1.0


def test_sid_config_errors_name_the_key():
    with pytest.raises(ValueError, match="beam_widht"):
        load_sid_config("sid-hstu-amazon", ["decode.beam_widht=3"])
    with pytest.raises(ValueError, match="raise the beam width"):
        load_sid_config("sid-hstu-amazon", ["decode.beam_width=5"])
    with pytest.raises(ValueError, match="embeddings_path"):
        load_sid_config("sid-hstu-amazon", ["data.embeddings=file"])
    with pytest.raises(ValueError, match="model.positions"):
        load_sid_config("sid-hstu-amazon", ["model.positions=slot"])


# --- the NVTabular step and the bench commands --------------------------------------------------------------
def synthetic_events():
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    return generate_event_log(SyntheticConfig(num_users=120, num_items=80, num_categories=10, min_events=5,
                                              max_events=12, seed=1))


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A synthetic log (Categorify ids, timestamps, actions) through the session workflow."""
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, preprocess

    out = tmp_path_factory.mktemp("sid") / "data"
    preprocess(synthetic_events(), out, SessionWorkflowConfig(max_length=22), overwrite=True)
    return out


def test_nvtabular_step_maps_items_to_their_tokens(processed):
    from merlin_hstu.common import schema as roles
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.workflows.semantic_ids import read_semantic_ids, write_semantic_ids

    table = load_processed(processed)
    catalogue = table.candidate_ids.numpy()
    x, _ = clustered_embeddings(len(catalogue), 6, 5)
    sids = fit_tokenizer(catalogue, x, TokenizerConfig(levels=2, codebook_size=6))
    rows = write_semantic_ids(processed, sids)
    assert len(rows) == len(table.items) and rows.equals(read_semantic_ids(processed))
    table_np = sids.token_table(table.num_items).numpy()
    for items, tokens in zip(rows[roles.ITEM_LIST], rows[roles.SEMANTIC_ID_LIST]):
        assert np.array_equal(np.asarray(tokens), table_np[np.asarray(items)].reshape(-1))
    from merlin.io import Dataset

    schema = Dataset(str(processed / "semantic_ids"), engine="parquet", cpu=True).schema
    assert roles.semantic_id_list_column(schema) == roles.SEMANTIC_ID_LIST
    column = schema[roles.SEMANTIC_ID_LIST]
    assert int(column.properties[roles.TOKENS_PER_ITEM_PROPERTY]) == sids.num_levels
    assert "categorical" not in {str(t.value) for t in column.tags}
    partial = fit_tokenizer(catalogue[1:], x[1:], TokenizerConfig(levels=2, codebook_size=6))
    with pytest.raises(ValueError, match=rf"item id\(s\) \[{catalogue[0]}\] have no semantic ID"):
        write_semantic_ids(processed, partial)


def test_text_embeddings_feed_the_tokenizer(processed, tmp_path):
    """Item texts (the NVTabular item-text step) encoded by the real HLLM item encoder (MiniLM, offline) -> a
    tokenizer; similar texts share leading codes more often than not."""
    import pandas as pd

    from merlin_hstu.hllm.cache import EmbeddingCache
    from merlin_hstu.hllm.config import ItemEncoderConfig
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.sid.embeddings import text_embeddings
    from merlin_hstu.workflows.item_text import write_item_text
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    table = load_processed(processed)
    catalogue = table.candidate_ids.numpy()
    raw = load_item_id_mapping(processed / "workflow")[catalogue]
    topics = ["hair shampoo and conditioner", "red lipstick and lip gloss", "garden hose and sprinkler",
              "tennis racket and balls"]
    metadata = pd.DataFrame({"item_id": raw, "title": [f"{topics[i % 4]} number {i}" for i in range(len(raw))]})
    write_item_text(processed, metadata, ["title"])
    encoder = ItemTextEncoder(ItemEncoderConfig(pooling="mean"))
    vectors, source = text_embeddings(processed, catalogue, encoder, EmbeddingCache(tmp_path / "cache"))
    assert vectors.shape == (len(catalogue), encoder.hidden_size) and source["kind"] == "text"
    sids = fit_tokenizer(catalogue, vectors, TokenizerConfig(levels=2, codebook_size=4), source)
    first = sids.codes[:, 0]
    topic = np.arange(len(catalogue)) % 4
    same_topic = np.mean([first[i] == first[j] for i in range(40) for j in range(40) if i != j and topic[i] == topic[j]])
    other_topic = np.mean([first[i] == first[j] for i in range(40) for j in range(40) if topic[i] != topic[j]])
    assert same_topic > other_topic


def test_bench_commands_run_on_tiny_settings(processed, tmp_path, capsys):
    from merlin_hstu.cli.main import main

    tiny = ["--set", "tokenizer.codebook_size=4", "--set", "tokenizer.levels=2", "--set", "model.num_blocks=1",
            "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
            "--set", "data.max_history=6", "--set", "decode.beam_width=10"]
    id_tiny = ["--id-model", "hstu-amazon", "--id-set", "data.max_history=10", "--id-set", "model.max_seq_len=21",
               "--id-set", "model.num_blocks=1", "--id-set", "model.embedding_dim=16",
               "--id-set", "model.attention_dim=16", "--id-set", "model.linear_dim=16"]
    # the spelling, `bench --model sid-hstu-...`, is `bench sid --model sid-hstu-...`
    assert main(["bench", "--model", "sid-hstu-amazon", "--dataset", str(processed), "--seeds", "1", "--epochs", "1",
                 "--id-epochs", "1", "--max-steps", "2", "--threads", "1", "--no-progress",
                 "--output", str(tmp_path / "sid"), "--nvtabular-step", *tiny, *id_tiny]) == 0
    out = capsys.readouterr().out
    for phrase in ("recon. error", "SID-sid-hstu-amazon (mean of 1)", "ID-hstu-amazon, tail targets",
                   "NVTabular step", "equal to the tokenizer's table"):
        assert phrase in out
    record = json.loads((tmp_path / "sid" / "bench.json").read_text())
    assert record["benchmark"] == "sid" and (tmp_path / "sid" / "seed-42" / "tokenizer" / "codes.parquet").is_file()
    # the recorded command reproduces the run: it parses back to the same arguments (no parent-parser options)
    import shlex

    from merlin_hstu.cli.main import build_parser

    command = record["markdown"].split("command: `")[1].split("`")[0]
    again = vars(build_parser().parse_args(shlex.split(command)[1:]))
    for key, value in record["arguments"].items():
        assert again[key] == value, (key, again[key], value)
    assert main(["bench", "sid-decode", "--dataset", str(processed), "--users", "16", "--beams", "3,6",
                 "--engines", "cached,full", "--repeats", "1", "--threads", "1", "--output", str(tmp_path / "dec"),
                 *tiny, *id_tiny]) == 0
    out = capsys.readouterr().out
    assert "beam 6 (cached)" in out and "brute-force top-10" in out and "users/s" in out


# --- serving ------------------------------------------------------------------------------------------------
def test_served_top_k_equals_offline_beam_search(processed, tmp_path):
    """Export a trained SID run through the retrieval export path, serve it with a real tritonserver, and get the
    offline beam lists (cached engine) for raw requests."""
    from serving_helpers import cli_server

    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.serving.client import ServingClient
    from merlin_hstu.serving.repository import ExportConfig
    from merlin_hstu.serving.sid import export_sid_repository
    from merlin_hstu.sid.train import load_sid_run, recommend_sid, save_sid_run, train_sid
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    table = load_processed(processed)
    catalogue = table.candidate_ids.numpy()
    x, _ = clustered_embeddings(len(catalogue), 6, 5)
    sids = fit_tokenizer(catalogue, x, TokenizerConfig(levels=2, codebook_size=6))
    cfg = SIDConfig.from_dict({"model": {"embedding_dim": 16, "num_blocks": 2, "num_heads": 2, "attention_dim": 8,
                                         "linear_dim": 8},
                               "data": {"max_history": 6}, "decode": {"beam_width": 10},
                               "train": {"epochs": 2, "ks": [5, 10]}})
    save_sid_run(tmp_path / "run", train_sid(table, sids, cfg, progress=False), cfg)
    repo = export_sid_repository(tmp_path / "run", processed, tmp_path / "repo",
                                 ExportConfig(model_name="sid", top_k=5))
    record = json.loads((repo / "serving.json").read_text())
    width = record["beam_width"]
    assert width == max(10, 5 + 6)
    events = synthetic_events()
    users = [2, 5, 9, 40]
    with cli_server([repo], tmp_path / "serve.log") as server:
        with ServingClient(server["http"], model_name="sid") as client:
            served = client.recommend(events[events["user_id"].isin(users)])
            assert client.contract.max_k == width - 6
    model, sids, _, _ = load_sid_run(tmp_path / "run")
    raw = load_item_id_mapping(processed / "workflow")
    assert sorted(served.user_ids.tolist()) == users
    rows = [int(np.flatnonzero(table.keys == u)[0]) for u in served.user_ids]
    offline = recommend_sid(model, sids, [table.items[r] for r in rows], k=5, beam_width=width)
    assert served.item_ids.tolist() == [[raw[i] for i in items] for items in offline]
    assert np.all(np.isfinite(served.scores)) and np.all(np.diff(served.scores, axis=1) <= 0)


def test_bench_amazon_records_the_selection_figures(processed, tmp_path, capsys):
    """`bench amazon` on tiny settings: test metrics per preset, and beside them the validation figures of the epoch
    early stopping kept (what hyperparameters are chosen on), equal to the run's own validation history."""
    from merlin_hstu.cli.main import main

    tiny = ["--set", "data.max_history=10", "--set", "model.max_seq_len=21", "--set", "model.embedding_dim=16",
            "--set", "train.early_stopping_patience=1"]
    assert main(["bench", "amazon", "--datasets", str(processed), "--models", "hstu-amazon,sasrec-amazon",
                 "--seeds", "1", "--id-epochs", "2", "--max-steps", "6", "--threads", "1", "--no-progress",
                 "--output", str(tmp_path / "amazon"), *tiny]) == 0
    out = capsys.readouterr().out
    assert "selection (validation item only)" in out
    record = json.loads((tmp_path / "amazon" / "bench.json").read_text())
    section = record["sections"][str(processed)]
    for preset in ("hstu-amazon", "sasrec-amazon"):
        chosen = section["selection"][preset][0]
        assert chosen["seed"] == 42 and 1 <= chosen["best_epoch"] <= chosen["epochs"] <= 2
        assert 0.0 <= chosen["validation_ndcg@10"] <= chosen["validation_recall@10"] <= 1.0
        assert section["runs"][preset][0]["recall@10"] >= section["runs"][preset][0]["recall@5"]
        # the curve early stopping chose from: every evaluated epoch, the kept one at its best NDCG@10
        curve = chosen["validation_curve"]
        assert [c[0] for c in curve] == list(range(1, chosen["epochs"] + 1))
        kept = dict((c[0], c) for c in curve)[chosen["best_epoch"]]
        assert kept[1:] == [chosen["validation_recall@10"], chosen["validation_ndcg@10"]]
        assert kept[2] == max(c[2] for c in curve)
    assert "Selection figures" in record["markdown"] and "val N@10" in record["markdown"]
    assert (tmp_path / "amazon" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bench_amazon_command(processed, output, extra=()):
    import sys

    tiny = ["--set", "data.max_history=10", "--set", "model.max_seq_len=21", "--set", "model.embedding_dim=16",
            "--set", "train.batch_size=8", "--set", "train.early_stopping_patience=2", "--set", "train.checkpoint_every=2"]
    return [sys.executable, "-m", "merlin_hstu.cli.main", "bench", "amazon", "--datasets", str(processed),
            "--models", "hstu-amazon", "--seeds", "2", "--id-epochs", "4", "--threads", "1", "--no-progress",
            "--output", str(output), *tiny, *extra]


def test_bench_amazon_killed_mid_run_resumes_to_the_uninterrupted_result(processed, tmp_path):
    """A real SIGKILL during the second seed: `--resume` reuses the first seed's finished result, continues the
    second from its newest checkpoint, and writes the bench.json an uninterrupted bench writes; nothing is
    published under the final name before that. Without --resume an unfinished folder is discarded."""
    import os
    import subprocess

    from process_helpers import sigkill_when

    from merlin_hstu.train.run_dir import run_dir_name
    from merlin_hstu.train.loop import checkpoint_paths

    env = {**os.environ, "MERLIN_HSTU_MALLOC": "default", "PYTHONUNBUFFERED": "1"}
    # the uninterrupted bench; it finds an unfinished folder under its name and, without --resume, discards it
    full = tmp_path / "full"
    stale = tmp_path / "full.incomplete" / run_dir_name(str(processed), "hstu-amazon", 42)
    stale.mkdir(parents=True)
    (stale / "result.json").write_text("{}")
    fresh = subprocess.run(_bench_amazon_command(processed, full), env=env, capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "discarding the unfinished bench" in fresh.stdout and "reusing" not in fresh.stdout
    assert not (tmp_path / "full.incomplete").exists()
    assert json.loads((full / "bench.json").read_text())["machine"]["threads"] == 1  # --threads, as trained
    killed = tmp_path / "killed"
    work = tmp_path / "killed.incomplete"
    first, second = (work / run_dir_name(str(processed), "hstu-amazon", seed) for seed in (42, 43))
    sigkill_when(_bench_amazon_command(processed, killed), lambda: bool(checkpoint_paths(second / "checkpoints")), env)
    assert not killed.exists()
    assert (first / "result.json").is_file() and not (first / "checkpoints").exists()
    steps_at_kill = int(checkpoint_paths(second / "checkpoints")[-1].name[5:-3])
    resumed = subprocess.run(_bench_amazon_command(processed, killed, ["--resume"]), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "seed 42: finished before the interruption; reusing" in resumed.stdout
    assert not work.exists()  # the work folder goes once bench.json is written
    want, got = (json.loads((d / "bench.json").read_text())["sections"][str(processed)] for d in (full, killed))
    assert got["runs"] == want["runs"] and got["rows"] == want["rows"]
    for a, b in zip(got["selection"]["hstu-amazon"], want["selection"]["hstu-amazon"]):
        assert {k: v for k, v in a.items() if k not in ("train_seconds", "resumed_from")} == \
            {k: v for k, v in b.items() if k not in ("train_seconds", "resumed_from")}
    assert [r["resumed_from"] for r in got["selection"]["hstu-amazon"]] == [None, steps_at_kill]
    assert "* resumed after a kill" in json.loads((killed / "bench.json").read_text())["markdown"]
    assert f"hstu-amazon, seed 43: continued from step {steps_at_kill} of the interrupted run" in resumed.stdout


def test_recorded_bench_amazon_command_parses_back():
    """`bench amazon` records the command that reproduces it: only its own options, none of the parent `bench`
    parser's (an `--epochs 3` there made the recorded command fail to parse)."""
    import shlex

    from merlin_hstu.bench.sid import command_line
    from merlin_hstu.cli.main import build_parser

    args = build_parser().parse_args(["bench", "amazon", "--datasets", "amazon-s3rec-toys", "--models", "hstu-amazon",
                                      "--seeds", "1", "--threads", "2", "--output", "out"])
    command = command_line("amazon", args)
    assert "--epochs" not in command and "--cache" not in command  # not its options / its default
    again = build_parser().parse_args(shlex.split(command)[1:])
    for key in ("datasets", "models", "seeds", "threads", "output", "seed", "cache"):
        assert getattr(again, key) == getattr(args, key), key


def test_resume_refuses_a_finished_run_of_another_configuration(tmp_path):
    from merlin_hstu.train.run_dir import RUN_RESULT_FORMAT, finished_run

    assert finished_run(tmp_path, "abc") is None
    (tmp_path / "result.json").write_text(json.dumps({"format": RUN_RESULT_FORMAT, "fingerprint": "abc", "test": {}}))
    assert finished_run(tmp_path, "abc")["test"] == {}
    with pytest.raises(ValueError, match="another configuration or dataset.*without --resume"):
        finished_run(tmp_path, "other")


def _bench_sid_arguments(processed, output, extra=()):
    tiny = ["--set", "tokenizer.codebook_size=4", "--set", "tokenizer.levels=2", "--set", "model.num_blocks=1",
            "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
            "--set", "data.max_history=6", "--set", "decode.beam_width=10", "--set", "train.batch_size=16",
            "--set", "train.checkpoint_every=2"]
    id_tiny = ["--id-model", "hstu-amazon", "--id-set", "data.max_history=10", "--id-set", "model.max_seq_len=21",
               "--id-set", "model.embedding_dim=16", "--id-set", "train.batch_size=16"]
    return ["bench", "sid", "--dataset", str(processed), "--seeds", "1", "--epochs", "3", "--id-epochs", "2",
            "--threads", "1", "--no-progress", "--output", str(output), *tiny, *id_tiny, *extra]


def test_bench_sid_killed_in_the_decoder_stage_resumes_to_the_uninterrupted_result(processed, tmp_path, capsys):
    """`bench sid --resume` after a real SIGKILL while the decoder trains: the ID stage (model, tail items,
    tokenizer) is reused from its record, the decoder continues from its newest checkpoint, and bench.json equals
    the uninterrupted bench's; the work folder is gone once it is written."""
    import os
    import sys

    from process_helpers import sigkill_when

    from merlin_hstu.cli.main import main
    from merlin_hstu.train.loop import checkpoint_paths

    full = tmp_path / "full"
    assert main(_bench_sid_arguments(processed, full)) == 0
    assert not (tmp_path / "full.incomplete").exists()
    assert json.loads((full / "bench.json").read_text())["machine"]["threads"] == 1  # --threads, as trained
    killed = tmp_path / "killed"
    stage = tmp_path / "killed.incomplete" / "seed-42"
    env = {**os.environ, "MERLIN_HSTU_MALLOC": "default", "PYTHONUNBUFFERED": "1"}
    sigkill_when([sys.executable, "-m", "merlin_hstu.cli.main", *_bench_sid_arguments(processed, killed)],
                 lambda: bool(checkpoint_paths(stage / "sid-checkpoints")), env)
    assert not (killed / "bench.json").exists()
    assert (stage / "id.json").is_file() and (stage / "tokenizer").is_dir() and not (stage / "id-checkpoints").exists()
    steps_at_kill = int(checkpoint_paths(stage / "sid-checkpoints")[-1].name[5:-3])
    capsys.readouterr()
    assert main(_bench_sid_arguments(processed, killed, ["--resume"])) == 0
    out = capsys.readouterr().out
    assert "ID model, seed 42: finished before the interruption; reusing" in out
    assert f"SID decoder, seed 42: continued from step {steps_at_kill} of the interrupted run" in out
    assert not (tmp_path / "killed.incomplete").exists() and (killed / "seed-42" / "model.pt").is_file()
    want, got = (json.loads((d / "bench.json").read_text())["sections"][str(processed)] for d in (full, killed))
    assert got["runs"] == want["runs"] and got["rows"] == want["rows"]
    for a, b in zip(got["details"], want["details"]):
        assert {k: v for k, v in a.items() if k not in ("sid_train_seconds", "run")} == \
            {k: v for k, v in b.items() if k not in ("sid_train_seconds", "run")}
    # a stage record of other arguments is refused, not mixed into this bench
    stage.mkdir(parents=True)
    (stage / "id.json").write_text(json.dumps({"format": 1, "fingerprint": "another run"}))
    assert main(_bench_sid_arguments(processed, killed, ["--resume"])) == 2
    assert "another configuration or dataset" in capsys.readouterr().err


def test_plain_bench_naming_a_sid_preset_is_the_sid_bench():
    from merlin_hstu.cli.main import sid_bench_argv

    assert sid_bench_argv(["bench", "--dataset", "d", "--model", "sid-hstu-amazon", "--epochs", "2"]) == \
        ["bench", "sid", "--dataset", "d", "--model", "sid-hstu-amazon", "--epochs", "2"]
    assert sid_bench_argv(["bench", "--model=sid-hstu-amazon"]) == ["bench", "sid", "--model=sid-hstu-amazon"]
    for unchanged in (["bench", "--model", "hstu-amazon"], ["bench", "sid", "--model", "sid-hstu-amazon"],
                      ["bench", "--task", "ranking", "--model", "sid-hstu-amazon"], ["train", "--model", "x"],
                      ["bench", "sid-decode", "--model", "sid-hstu-amazon"]):
        assert sid_bench_argv(list(unchanged)) == unchanged
