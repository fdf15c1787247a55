"""HLLM: the item encoder (real all-MiniLM-L6-v2) against plain transformers forwards, the loss against a plain loop,
false-negative masking, the embedding cache, the three training modes through the one loop, the NVTabular item-text
step, the cold-start protocol, items added by their text, and the served model against the offline one.

Data: 40 real ML-1M movies (movies.dat titles and genres) and a small seeded log over them, preprocessed by the
session workflow with raw ids (as MovieLens is), so the whole file stays within a couple of minutes on 1 thread.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_hstu.common import schema as roles
from merlin_hstu.hllm.cache import EmbeddingCache
from merlin_hstu.hllm.config import HLLMConfig, ItemEncoderConfig
from merlin_hstu.hllm.losses import LogitScale, batch_negatives, hllm_loss

NUM_MOVIES = 40
H = 10  # history window


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def movies(shared_data):
    from merlin_hstu.workflows import datasets

    frame = datasets.read_movielens_dat_movies(datasets.locate(shared_data / "movielens-1m", "movies.dat", "ml-1m"))
    return frame.iloc[:NUM_MOVIES].reset_index(drop=True)


@pytest.fixture(scope="module")
def dataset(movies, tmp_path_factory):
    """A seeded log over the movies -> session workflow (raw ids, catalogue = the movies) -> item_text step."""
    from merlin_hstu.workflows.item_text import write_item_text
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, preprocess

    rng = np.random.default_rng(7)
    ids = movies["item_id"].to_numpy()
    rows = []
    for user in range(1, 81):
        taste = ids[(user % 4) * 10:(user % 4) * 10 + 10]  # four groups of ten movies: learnable structure
        for k, item in enumerate(rng.choice(taste, size=int(rng.integers(4, 12)))):
            rows.append((user, int(item), 1_000_000 + 3600 * k + user))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    out = tmp_path_factory.mktemp("hllm") / "data"
    config = SessionWorkflowConfig(action_column=None, item_encoding="raw", max_length=H + 2, min_length=1)
    preprocess(events, out, config, candidates=ids)
    table = write_item_text(out, movies, ["title", "genres"], separators={"genres": "|"}, source="movies.dat")
    return {"path": out, "events": events, "item_table": table}


@pytest.fixture(scope="module")
def data(dataset):
    from merlin_hstu.hllm.data import load_hllm_data

    return load_hllm_data(dataset["path"])


@pytest.fixture(scope="module")
def encoder():
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder

    return ItemTextEncoder(ItemEncoderConfig())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return EmbeddingCache(tmp_path_factory.mktemp("cache"))


def small_config(*overrides: str) -> HLLMConfig:
    return HLLMConfig().with_overrides([f"data.max_history={H}", "train.epochs=2", "train.batch_size=16",
                                        "user.embedding_dim=32", "loss.num_negatives=16", *overrides])


TEXTS = ["title: Toy Story (1995). genres: Animation, Children's, Comedy.",
         "title: Heat (1995). genres: Action, Crime, Thriller.",
         "title: Sabrina (1995). genres: Comedy, Romance."]


# --- item encoder -----------------------------------------------------------------------------------------
def test_mean_and_first_pooling_equal_a_plain_transformers_forward(encoder):
    """mean / first pooling = the plain AutoModel's outputs for prompt + text (the item token is invisible to them)."""
    import transformers

    from merlin_hstu.hllm.item_encoder import ItemTextEncoder, pretrained_path

    folder = str(pretrained_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    plain = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tokenizer([encoder.config.prompt + t for t in TEXTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = plain(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for pooling, want in (("mean", (hidden * mask).sum(1) / mask.sum(1)), ("first", hidden[:, 0])):
        other = ItemTextEncoder(ItemEncoderConfig(pooling=pooling), encoder.tokenizer, encoder.backbone)
        torch.testing.assert_close(other.encode(TEXTS), want, atol=1e-5, rtol=1e-5)


def test_item_token_pooling_equals_a_plain_forward_with_the_token_appended(encoder):
    """item_token pooling = BertModel over [words..., item token] with a mask where text rows skip the item column,
    built here position by position."""
    texts = TEXTS[:2]
    got = encoder.encode(texts)
    backbone = encoder.backbone
    for n, text in enumerate(texts):
        ids = encoder.tokenizer(encoder.config.prompt + text, return_tensors="pt")["input_ids"][0]
        length = len(ids)
        with torch.no_grad():
            words = backbone.get_input_embeddings()(ids)
            inputs = torch.cat([words, encoder.item_token.detach().unsqueeze(0)]).unsqueeze(0)
            mask = torch.ones(1, length + 1, length + 1, dtype=torch.long)
            for row in range(length):
                mask[0, row, length] = 0  # text tokens never read the item token
            hidden = backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got[n], hidden[0, length], atol=1e-5, rtol=1e-5)
    # the token starts as the mask token's word embedding
    torch.testing.assert_close(encoder.item_token.detach(),
                               backbone.get_input_embeddings().weight[encoder.tokenizer.mask_token_id])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from merlin_hstu.hllm.item_encoder import pretrained_path

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        pretrained_path(str(tmp_path / "nowhere"))


# --- loss -------------------------------------------------------------------------------------------------
def plain_hllm_loss(user, positives, table, negatives, scale, threshold):
    """One position at a time: cosine logits, skip the positive's id and near-duplicates of the positive."""
    total = 0.0
    for p in range(user.shape[0]):
        u = user[p] / user[p].norm()
        pos = table[positives[p]] / table[positives[p]].norm()
        logits = [scale * float(u @ pos)]
        for n in negatives.tolist():
            v = table[n] / table[n].norm()
            if n == int(positives[p]) or float(pos @ v) > threshold:
                continue
            logits.append(scale * float(u @ v))
        total += math.log(sum(math.exp(z) for z in logits)) - logits[0]
    return total / user.shape[0]


def test_loss_equals_a_plain_loop_and_masks_false_negatives():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 8, generator=g, dtype=torch.float64)
    table[7] = table[3] * 2.0  # item 7 is item 3 again (cosine 1): a false negative for positives 3
    user = torch.randn(6, 8, generator=g, dtype=torch.float64)
    positives = torch.tensor([3, 5, 3, 1, 9, 5])
    negatives = batch_negatives(positives, torch.arange(1, 12), 10, True, g)
    assert negatives[:4].tolist() == [1, 3, 5, 9]  # distinct in-batch ids first
    negatives = torch.cat([negatives, torch.tensor([7])])
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    got = hllm_loss(user, positives, table[positives], negatives, table[negatives], scale, 0.99)
    assert math.isclose(float(got), plain_hllm_loss(user, positives, table, negatives, float(scale), 0.99),
                        rel_tol=1e-9)
    # without the mask, item 7 would count as a negative of the positions whose positive is 3: a larger loss
    unmasked = hllm_loss(user, positives, table[positives], negatives, table[negatives], scale, 1.01)
    assert float(unmasked) > float(got)
    assert math.isclose(float(unmasked), plain_hllm_loss(user, positives, table, negatives, float(scale), 1.01),
                        rel_tol=1e-9)


def test_logit_scale_starts_at_one_over_0_07_and_is_capped():
    scale = LogitScale(0.07, 100.0)
    assert math.isclose(float(scale()), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert float(scale()) == 100.0


# --- cache ------------------------------------------------------------------------------------------------
def test_cache_hits_and_invalidates_when_text_or_model_changes(encoder, tmp_path):
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder

    cache = EmbeddingCache(tmp_path / "c")
    first = cache.encode(encoder, TEXTS)
    assert (cache.hits, cache.misses) == (0, 3)
    again = EmbeddingCache(tmp_path / "c").encode(encoder, TEXTS)  # a new process reads the shards
    torch.testing.assert_close(again, first)
    changed = cache.encode(encoder, [TEXTS[0], TEXTS[1] + " Extended cut."])
    assert (cache.hits, cache.misses) == (1, 4)  # the changed text is a miss
    torch.testing.assert_close(changed[0], first[0])
    # another pooling is another model key
    mean = ItemTextEncoder(ItemEncoderConfig(pooling="mean"), encoder.tokenizer, encoder.backbone)
    assert mean.fingerprint() != encoder.fingerprint()
    cache.encode(mean, TEXTS[:1])
    assert cache.misses == 5
    # other weights are another model key: nudge one weight, then restore it
    weight = encoder.item_token
    before = encoder.fingerprint()
    with torch.no_grad():
        weight[0] += 1e-3
    try:
        assert encoder.fingerprint() != before
        cache.encode(encoder, TEXTS[:1])
        assert cache.misses == 6
    finally:
        with torch.no_grad():
            weight[0] -= 1e-3
    assert not list((tmp_path / "c").rglob("*.tmp"))  # atomic writes leave no temporary files


# --- the NVTabular item-text step -------------------------------------------------------------------------
def test_item_text_step_joins_tags_and_keeps_the_mapping(dataset, movies):
    from merlin.schema import Tags

    table = dataset["item_table"]
    frame = table.frame
    assert frame[roles.ITEM_ID].tolist() == sorted(movies["item_id"].tolist())  # raw ids: encoded == raw
    toy = frame.loc[frame[roles.ITEM_ID] == 1, roles.ITEM_TEXT].item()
    assert toy == "title: Toy Story (1995). genres: Animation, Children's, Comedy."
    schema = table.schema
    assert schema[roles.ITEM_TEXT].properties[roles.ROLE_PROPERTY] == roles.ROLE_ITEM_TEXT
    assert {Tags.TEXT, Tags.ITEM} <= set(schema[roles.ITEM_TEXT].tags)
    assert Tags.TEXT in schema["genres"].tags
    assert {Tags.ITEM, Tags.ID} <= set(schema[roles.ITEM_ID].tags)
    texts = table.text_by_id(NUM_MOVIES + 10)
    assert texts[0] is None and texts[1] == toy


def test_item_text_step_names_catalogue_items_without_metadata(dataset, movies):
    from merlin_hstu.workflows.item_text import write_item_text

    with pytest.raises(ValueError, match=r"no metadata row \(raw ids e.g. \[40\]"):
        write_item_text(dataset["path"], movies.iloc[:-1], ["title"], source="movies.dat", overwrite=True)
    with pytest.raises(ValueError, match="'plot'"):
        write_item_text(dataset["path"], movies, ["plot"], overwrite=True)


# --- training modes ---------------------------------------------------------------------------------------
def test_frozen_mode_never_changes_the_lm_and_finetune_trains_only_the_top_layers(data, encoder, cache):
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder, lm_state_digest
    from merlin_hstu.hllm.train import train_hllm

    before = lm_state_digest(encoder)
    token = encoder.item_token.detach().clone()
    frozen = train_hllm(data, small_config("train.mode=frozen"), encoder=encoder, cache=cache)
    assert lm_state_digest(encoder) == before and torch.equal(encoder.item_token, token)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert 0.0 <= frozen.metrics["hr@10"] <= 1.0 and frozen.fit.steps > 0

    tuned = ItemTextEncoder(ItemEncoderConfig(trainable_layers=1), encoder.tokenizer,
                            __import__("copy").deepcopy(encoder.backbone))
    bottom = lm_state_digest(tuned, (0, 5))
    top = lm_state_digest(tuned, (5, 6))
    result = train_hllm(data, small_config("train.mode=finetune", "item_encoder.trainable_layers=1",
                                           "train.epochs=1", "train.lm_learning_rate=1e-3"),
                        encoder=tuned, cache=cache)
    assert lm_state_digest(tuned, (0, 5)) == bottom  # frozen layers untouched
    assert lm_state_digest(tuned, (5, 6)) != top  # the top layer trained
    assert not torch.equal(tuned.item_token, token)  # and the item token
    # the evaluation table was refreshed with the trained weights: it equals a fresh encoding
    torch.testing.assert_close(result.model.item_text[1:NUM_MOVIES + 1], tuned.encode(list(data.texts[1:NUM_MOVIES + 1])),
                               atol=1e-5, rtol=1e-5)
    assert result.refresh_seconds


def test_finetune_on_cached_frozen_layers_equals_running_the_whole_lm(data, encoder, tmp_path):
    """With mean pooling the frozen layers' output depends on the text alone: computing it once per item and running
    only the trained top layers gives the whole LM's item vectors and gradients, and a finetune run's every step
    loss and trained weights (to float rounding); with the cache off the whole LM runs."""
    import copy

    from merlin_hstu.hllm.cache import EmbeddingCache
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder
    from merlin_hstu.hllm.train import train_hllm

    def tuned(cached: bool) -> ItemTextEncoder:
        config = ItemEncoderConfig(pooling="mean", trainable_layers=2, cache_frozen_layers=cached)
        return ItemTextEncoder(config, encoder.tokenizer, copy.deepcopy(encoder.backbone))

    fast, full = tuned(True), tuned(False)
    fast.set_trainable(2), full.set_trainable(2)
    assert fast.caches_frozen_layers() and not full.caches_frozen_layers()
    fast.train(), full.train()
    for module in (fast, full):  # dropout off in the trained layers, so that both passes are deterministic
        for layer in module.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
    ids, lengths = fast.tokenize(TEXTS)
    want = full(ids, lengths)
    got = fast.forward_from_frozen(fast.frozen_states(ids, lengths), lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (want ** 2).sum().backward(), (got ** 2).sum().backward()
    trained = [(a, b) for a, b in zip(full.backbone.parameters(), fast.backbone.parameters()) if a.requires_grad]
    assert len(trained) > 0 and all(b.grad is not None for _, b in trained)
    for a, b in trained:
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)

    runs = {}
    for cached in (True, False):
        cfg = small_config("train.mode=finetune", "item_encoder.pooling=mean", "item_encoder.trainable_layers=2",
                           f"item_encoder.cache_frozen_layers={str(cached).lower()}", "train.epochs=1",
                           "train.max_steps=3", "train.lm_learning_rate=1e-3")
        runs[cached] = train_hllm(data, cfg, encoder=tuned(cached), cache=EmbeddingCache(tmp_path / str(cached)))
    assert (runs[True].model._frozen is not None) and (runs[False].model._frozen is None)
    start = runs[True].model._frozen[2]
    assert start[0] == -1 and int((start >= 0).sum()) == sum(t is not None for t in data.texts)  # items with text only
    assert runs[True].fit.steps == runs[False].fit.steps == 3
    # the evaluation table, refreshed from the frozen states, equals a whole-LM encoding with the trained weights
    trained = runs[True].model
    torch.testing.assert_close(trained.item_text[1:NUM_MOVIES + 1],
                               trained.item_encoder.encode(list(data.texts[1:NUM_MOVIES + 1])), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(trained.item_text[0]) == 0  # the padding row has no text
    np.testing.assert_allclose(runs[True].fit.step_losses, runs[False].fit.step_losses, rtol=1e-4)
    for (name, a), (_, b) in zip(runs[False].model.item_encoder.backbone.named_parameters(),
                                 runs[True].model.item_encoder.backbone.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)
    assert not torch.equal(runs[True].model.item_encoder.backbone.encoder.layer[5].output.dense.weight,
                           encoder.backbone.encoder.layer[5].output.dense.weight)  # the top layer did train
    tuned_model = runs[True].model
    # an item added later gets its frozen states when first asked for; the others are kept
    new_text = ["title: Toy Story 5 (2031). genres: Animation, Comedy."]
    ids, lengths = tuned_model.item_encoder.tokenize(new_text)
    kept = tuned_model._frozen[1].shape[0]
    (new_id,) = tuned_model.add_items(tuned_model.item_encoder.encode(new_text), ids, lengths).tolist()
    got = tuned_model.frozen_item_states(torch.tensor([new_id]))
    torch.testing.assert_close(got, tuned_model.item_encoder.frozen_states(ids, lengths), atol=1e-6, rtol=1e-6)
    assert tuned_model._frozen[1].shape[0] == kept + int(lengths[0])


def test_a_killed_finetune_run_resumes_to_the_uninterrupted_end(data, encoder, tmp_path):
    """A finetune run with the frozen-layer cache, stopped in the middle of its second epoch and resumed from its
    checkpoint in a fresh model (whose frozen states are recomputed on first use), ends with the uninterrupted run's
    epoch losses, trained weights and metrics; a checkpoint of another config is refused."""
    import copy

    from merlin_hstu.hllm.item_encoder import ItemTextEncoder
    from merlin_hstu.hllm.train import train_hllm

    overrides = ["train.mode=finetune", "item_encoder.pooling=mean", "item_encoder.trainable_layers=1",
                 "train.lm_learning_rate=1e-3", "train.checkpoint_every=1"]
    cfg = small_config(*overrides)

    def run(**kwargs):
        fresh = ItemTextEncoder(ItemEncoderConfig(pooling="mean", trainable_layers=1), encoder.tokenizer,
                                copy.deepcopy(encoder.backbone))
        return train_hllm(data, cfg, encoder=fresh, cache=EmbeddingCache(tmp_path / "cache"), **kwargs)

    full = run()
    per_epoch = full.fit.steps // cfg.train.epochs
    assert cfg.train.epochs == 2 and per_epoch >= 2
    killed = run(checkpoint_dir=tmp_path / "ck", stop_after_steps=per_epoch + 1)  # one step into epoch 2
    assert killed.fit.steps == per_epoch + 1 and killed.model._frozen is not None
    resumed = run(checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.fit.resumed_from == per_epoch + 1
    assert resumed.fit.epoch_losses == full.fit.epoch_losses
    assert resumed.fit.step_losses == full.fit.step_losses[per_epoch + 1:]
    assert resumed.metrics == full.metrics
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="different configuration or dataset"):
        train_hllm(data, small_config(*overrides, "train.learning_rate=5e-4"), encoder=encoder,
                   cache=EmbeddingCache(tmp_path / "cache"), checkpoint_dir=tmp_path / "ck", resume=True)


def test_streaming_is_refused_with_the_setting_named(data, encoder, cache):
    """HLLM reads its sequences in memory: train.streaming=true is an error that names the setting and the tasks
    that do stream, not a silently in-memory run."""
    from merlin_hstu.hllm.train import train_hllm

    with pytest.raises(ValueError, match=r"train.streaming.*hllm task reads its data in memory.*ranking"):
        train_hllm(data, small_config("train.mode=frozen", "train.streaming=true"), encoder=encoder, cache=cache)


def test_hybrid_mode_learns_on_the_structured_log(data, encoder, cache):
    """Four taste groups of ten movies: the hybrid model must beat most-popular's HR@10 after training."""
    from merlin_hstu.hllm.train import train_hllm
    from merlin_hstu.retrieval.train import evaluate_most_popular

    cfg = small_config("train.mode=hybrid", "train.epochs=6")
    result = train_hllm(data, cfg, encoder=encoder, cache=cache)
    popular = evaluate_most_popular(result.split, cfg)
    assert result.metrics["hr@10"] > popular["hr@10"]
    assert result.model.id_embedding is not None


def test_transformer_user_model_initialised_from_the_lm(data, encoder, cache):
    from merlin_hstu.hllm.item_encoder import transformer_layers
    from merlin_hstu.hllm.model import HLLMModel, HLLMModelConfig
    from merlin_hstu.hllm.config import UserModelConfig

    cfg = HLLMModelConfig(num_items=data.table.num_items, text_dim=384, mode="frozen", max_history=H,
                          user=UserModelConfig(kind="transformer", embedding_dim=384, num_heads=12, num_blocks=2,
                                               init_from_lm=True))
    model = HLLMModel(cfg, torch.zeros(data.table.num_items, 384), encoder)
    lm_layer = transformer_layers(encoder.backbone)[1]
    torch.testing.assert_close(model.encoder.layers[1].output.dense.weight, lm_layer.output.dense.weight)
    assert model.encoder.layers[1] is not lm_layer  # a copy: training it never touches the item LM
    # causal: the user vector at position 2 does not change when a later item changes
    model.eval()
    model.set_item_text(torch.randn(data.table.num_items, 384))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    u = model.user_vectors(ids, torch.tensor([5]))
    ids2 = ids.clone()
    ids2[0, 4] = 9
    torch.testing.assert_close(model.user_vectors(ids2, torch.tensor([5]))[0, :4], u[0, :4])


# --- cold start and new items -----------------------------------------------------------------------------
def test_cold_start_split_keeps_cold_items_out_of_training(data):
    from merlin_hstu.hllm.data import cold_eval_samples, cold_start_split
    from merlin_hstu.retrieval.data import LeaveOneOut

    cold = cold_start_split(data.table, fraction=0.15, seed=3)
    assert len(cold.cold_items) == round(0.15 * len(np.unique(np.concatenate(data.table.items))))
    split = LeaveOneOut(cold.table, max_history=H)
    trained = split.train.ids[split.train.ids > 0]
    assert not np.isin(trained, cold.cold_items).any()
    assert not np.isin(cold.warm_pool, cold.cold_items).any()
    samples = cold_eval_samples(split, cold.cold_items)
    targets = samples.ids[np.arange(len(samples.lengths)), samples.lengths]
    assert np.isin(targets, cold.cold_items).all() and len(targets) > 0
    # each user's last item is kept, and histories hold warm items only
    assert [s[-1] for s in cold.table.items] == [s[-1] for s in data.table.items]


def test_an_unseen_item_gets_a_score_after_its_text_is_added(data, encoder, cache):
    from merlin_hstu.hllm.losses import normalize
    from merlin_hstu.hllm.train import train_hllm

    result = train_hllm(data, small_config("train.mode=hybrid", "train.epochs=1"), encoder=encoder, cache=cache)
    model = result.model.eval()
    ids, lengths = torch.tensor([[1, 2, 3, 0]]), torch.tensor([3])
    times = torch.tensor([[1_000_000, 1_003_600, 1_007_200, 1_010_800]])
    before = model.score_all_items(ids, lengths, times)
    text = "title: Toy Story 5 (2031). genres: Animation, Children's, Comedy."
    new = model.add_items(cache.encode(encoder, [text]))
    assert new.tolist() == [data.table.num_items]
    after = model.score_all_items(ids, lengths, times)
    assert after.shape[1] == before.shape[1] + 1
    torch.testing.assert_close(after[:, :-1], before)  # nothing else moved: no retraining
    user = model.last_user_vector(ids, lengths, times)[0]
    expected = user @ normalize(model.project(cache.encode(encoder, [text]))[0])  # zero ID vector in hybrid
    torch.testing.assert_close(after[0, -1], expected)
    assert torch.isfinite(after[0, -1])


# --- serving: the project's export path, a real tritonserver ----------------------------------------------
def offline_topk(model, events: pd.DataFrame, k: int):
    """Plain reference: each user's last H events (raw ids = encoded ids), the eager model's cosine scores, history
    and non-catalogue ids removed, sorted by (score descending, id ascending)."""
    rankable = np.zeros(model.config.num_items, dtype=bool)
    rankable[1:] = True  # raw ids: 0 is padding, every other row is a catalogue item here
    out_ids, out_scores = [], []
    for _, rows in events.groupby("user_id", sort=False):
        items = rows["item_id"].to_numpy()[-H:]
        times = rows["timestamp"].to_numpy()[-H:]
        n = len(items)
        ids = torch.zeros(1, n + 1, dtype=torch.long)
        ts = torch.zeros(1, n + 1, dtype=torch.long)
        ids[0, :n], ts[0, :n], ts[0, n] = torch.from_numpy(items), torch.from_numpy(times), int(times[-1])
        with torch.no_grad():
            scores = model.score_all_items(ids, torch.tensor([n]), ts)[0].double().numpy()
        scores[~rankable] = -np.inf
        scores[items] = -np.inf
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        out_ids.append(order)
        out_scores.append(scores[order])
    return np.array(out_ids), np.array(out_scores)


def test_served_topk_equals_offline_and_new_items_are_served_without_retraining(data, dataset, encoder, cache,
                                                                                  tmp_path):
    import copy

    from serving_helpers import cli_server

    from merlin_hstu.hllm.serving import add_items_by_text, export_hllm_repository
    from merlin_hstu.hllm.train import train_hllm
    from merlin_hstu.serving.client import ServingClient
    from merlin_hstu.serving.repository import ExportConfig

    model = train_hllm(data, small_config("train.mode=hybrid", "train.epochs=1"), encoder=encoder,
                       cache=cache).model.eval()
    repo = export_hllm_repository(model, dataset["path"], tmp_path / "repo", ExportConfig(model_name="hllm", top_k=5))
    grown = copy.deepcopy(model)
    text = "title: Toy Story 5 (2031). genres: Animation, Children's, Comedy."
    (new_id,) = add_items_by_text(grown, encoder, [text], cache).tolist()
    assert new_id == NUM_MOVIES + 1  # raw ids 1..40: the new item is 41
    grown_repo = export_hllm_repository(grown, dataset["path"], tmp_path / "grown",
                                        ExportConfig(model_name="hllm_grown", top_k=5))
    events = dataset["events"]
    requested = events[events["user_id"].isin([3, 8, 21, 50])]
    with cli_server([repo, grown_repo], tmp_path / "serve.log") as server:
        with ServingClient(server["http"], model_name="hllm") as client:
            served = client.recommend(requested)
        with ServingClient(server["http"], model_name="hllm_grown") as client:
            max_k = client.contract.max_k
            everything = client.recommend(requested, top_k=max_k)
    ids, scores = offline_topk(model, requested, 5)
    np.testing.assert_array_equal(served.item_ids, ids)
    np.testing.assert_allclose(served.scores, scores, rtol=1e-5, atol=1e-5)
    # the grown catalogue: every non-history item ranked, the new one among them with the offline score
    ids, scores = offline_topk(grown, requested, max_k)
    np.testing.assert_array_equal(everything.item_ids, ids)
    np.testing.assert_allclose(everything.scores, scores, rtol=1e-5, atol=1e-5)
    assert (everything.item_ids == new_id).any(axis=1).all()


# --- Transformers4Rec -------------------------------------------------------------------------------------
def test_t4r_model_reads_the_text_table_as_its_item_table(dataset, data, encoder, cache):
    from merlin.io import Dataset

    from merlin_hstu.hllm.t4r import hllm_t4r_model, t4r_item_table
    from merlin_hstu.hllm.train import encode_item_table

    table = encode_item_table(encoder, data.texts, cache)
    processed = Dataset(str(dataset["path"] / "processed"), engine="parquet", cpu=True)
    torch.manual_seed(0)
    model = hllm_t4r_model(processed.schema, table, H + 1)
    frame = processed.to_ddf().compute().iloc[:16]
    batch = {}
    for column in ("item_id-list", "timestamp-list"):
        padded = torch.zeros(len(frame), H + 1, dtype=torch.long)
        for row, values in enumerate(frame[column]):
            values = np.asarray(values, dtype=np.int64)[-(H + 1):]
            padded[row, :len(values)] = torch.from_numpy(values)
        batch[column] = padded
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(batch, training=True)["loss"]
    loss.backward()
    optimizer.step()
    items = t4r_item_table(model)
    assert torch.equal(items.weight, table) and items.weight.grad is None  # frozen text table, after a step
    model.eval()
    with torch.no_grad():
        scores = model(batch)
    assert scores.shape == (16, data.table.num_items) and torch.isfinite(scores[:, 1:]).all()


def _bench_hllm_arguments(dataset, output, cache_dir, extra=()):
    return ["bench", "hllm", "--datasets", str(dataset["path"]), "--models", "most-popular,id-hstu,hllm-frozen",
            "--protocols", "warm", "--seeds", "0", "--epochs", "2", "--batch-size", "16", "--max-history", str(H),
            "--pooling", "mean", "--user-dim", "16", "--threads", "1", "--throughput-items", "8",
            "--embedding-cache", str(cache_dir), "--set", "train.checkpoint_every=2", "--no-progress",
            "--output", str(output), *extra]


def test_bench_hllm_on_a_dataset_directory_killed_mid_run_resumes_to_the_uninterrupted_result(dataset, tmp_path,
                                                                                               capsys):
    """`bench hllm` on our own preprocessed directory (with its item table); a real SIGKILL while HLLM trains, then
    `--resume`: ID-HSTU's finished run is reused, HLLM continues from its newest checkpoint, and the metrics equal
    the uninterrupted bench's."""
    import json
    import os
    import sys

    from process_helpers import sigkill_when

    from merlin_hstu.cli.main import main
    from merlin_hstu.train.loop import checkpoint_paths
    from merlin_hstu.train.run_dir import run_dir_name

    full = tmp_path / "full"
    assert main(_bench_hllm_arguments(dataset, full, tmp_path / "cache")) == 0
    killed = tmp_path / "killed"
    work = tmp_path / "killed.incomplete"
    name = str(dataset["path"])
    hllm_run = work / run_dir_name(name, "warm-hllm-frozen", 0)
    env = {**os.environ, "MERLIN_HSTU_MALLOC": "default", "PYTHONUNBUFFERED": "1"}
    sigkill_when([sys.executable, "-m", "merlin_hstu.cli.main",
                  *_bench_hllm_arguments(dataset, killed, tmp_path / "cache")],
                 lambda: bool(checkpoint_paths(hllm_run / "checkpoints")), env)
    assert (work / run_dir_name(name, "warm-id-hstu", 0) / "result.json").is_file()
    assert not (killed / "bench.json").exists()
    steps_at_kill = int(checkpoint_paths(hllm_run / "checkpoints")[-1].name[5:-3])
    capsys.readouterr()
    assert main(_bench_hllm_arguments(dataset, killed, tmp_path / "cache", ["--resume"])) == 0
    out = capsys.readouterr().out
    assert "id-hstu, warm, seed 0: finished before the interruption; reusing" in out
    assert f"hllm-frozen, warm, seed 0: continued from step {steps_at_kill} of the interrupted run" in out
    assert not work.exists()
    want, got = (json.loads((d / "bench.json").read_text())["sections"][0] for d in (full, killed))
    assert got["dataset"] == name and got["mean"] == want["mean"]
    for model in ("id-hstu", "hllm-frozen"):
        assert got["runs"][model][0]["epoch_losses"] == want["runs"][model][0]["epoch_losses"]
