"""DLRM-HSTU (merlin_hstu.ranking.model): layout, numeric parity with a plain implementation, target-aware mask,
multi-task loss, planted-data training, input validation.

The plain implementation below reads only the raw parameter tensors from the model's state_dict and loops over
users, tokens and heads.  Its rules (module docstring of merlin_hstu/ranking/model.py):

    tokens      [contextual E_f[v]*sqrt(D) ...] + per event (E[item]*sqrt(D) + act) or (E[item]*sqrt(D), act)
                + per candidate E[cand]*sqrt(D) + W_a unknown + b_a;   act = W_a concat_b([bit b] E_a[b]) + b_a
    visible     contextual query: earlier-or-same contextual keys (+ every history key when contextual_full)
                history query: every contextual key, history keys at or before it
                candidate query: every contextual and history key, and itself
    bias(i,j)   0 if i or j contextual, else w_pos[clamp(p_j - p_i, -(N-1), N-1) + N-1] + w_time[bucket(t_i - t_j)]
    STU         u|v|q|k = SiLU(LN(x) W); O_i = sum_j vis * SiLU(q_i.k_j + bias)/N v_j; x += W_o(u*LN(O)) + b_o
    head        user = LN_a(x_cand), item = LN_a(E[cand]); z = W0(user*item)+b0; z = z*sigmoid(LN_a(z)); W2 z+b2
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from merlin_hstu.ranking.model import INTERACTIONS, DlrmHSTU, DlrmHSTUConfig, register_interaction
from merlin_hstu.ranking.batch import RankingBatch, RankingTask, multitask_loss
from merlin_hstu.common.metrics import auc

TASKS = (RankingTask("click", bit=0), RankingTask("like", bit=1, weight=0.5),
         RankingTask("watch", kind="regression", weight=0.2))
CONTEXT = {"age": 4, "city": 3}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def small_config(**kw) -> DlrmHSTUConfig:
    base = dict(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=4, max_seq_len=40,
                action_embedding_dim=3, dropout=0.0, input_dropout=0.0, multitask_hidden=6, kernel="pytorch")
    base.update(kw)
    return DlrmHSTUConfig(**base)


def make_batch(histories, candidates, contextual=None, tasks=TASKS, seed=0) -> RankingBatch:
    """histories: per user a list of (item, bitmask, time); candidates: per user a list of (item, time)."""
    g = torch.Generator().manual_seed(seed)
    h_items = [e[0] for h in histories for e in h]
    h_acts = [e[1] for h in histories for e in h]
    h_times = [e[2] for h in histories for e in h]
    c_items = [c[0] for cs in candidates for c in cs]
    c_times = [c[1] for cs in candidates for c in cs]
    hoff = torch.tensor([0] + [len(h) for h in histories]).cumsum(0)
    coff = torch.tensor([0] + [len(c) for c in candidates]).cumsum(0)
    labels = torch.stack([torch.randint(0, 2, (len(c_items),), generator=g).float() if t.kind == "binary"
                          else torch.rand(len(c_items), generator=g) for t in tasks], dim=1)
    if contextual is None:
        contextual = {"age": torch.arange(len(histories)) % 4, "city": torch.arange(len(histories)) % 3}
    return RankingBatch(torch.tensor(h_items, dtype=torch.long), torch.tensor(h_acts, dtype=torch.long),
                        torch.tensor(h_times, dtype=torch.long), hoff, torch.tensor(c_items, dtype=torch.long),
                        torch.tensor(c_times, dtype=torch.long), coff, labels, tasks, contextual)


def parity_batch() -> RankingBatch:
    day = 86_400
    histories = [
        [(3, 0b01, 1_000_000), (7, 0b11, 1_000_050), (2, 0b00, 1_000_050 + 3 * day), (9, 0b1010, 1_100_000)],
        [(11, 0b10, 2_000_000), (4, 0b01, 2_000_600)],
        [],
    ]
    candidates = [[(5, 1_200_000), (3, 1_100_001), (12, 1_200_000)], [(1, 2_000_700), (6, 2_900_000)], [(8, 50)]]
    return make_batch(histories, candidates)


# ----------------------------------------------------------------------------------------------------------
# Plain implementation
# ----------------------------------------------------------------------------------------------------------
def ln(vec, weight=None, bias=None, eps=1e-6):
    n = vec.shape[0]
    mean = vec.sum() / n
    var = ((vec - mean) ** 2).sum() / n
    out = (vec - mean) / torch.sqrt(var + eps)
    return out if weight is None else out * weight + bias


def silu(z):
    return z / (1 + torch.exp(-z))


def bucket(dt: float, num_buckets: int) -> int:
    return min(max(math.floor(math.log(max(abs(dt), 1.0)) / 0.301), 0), num_buckets)


def plain_tokens(p, cfg: DlrmHSTUConfig, names, bits, batch: RankingBatch, b: int):
    """[(vector, kind, position, time)] for user b."""
    d = cfg.embedding_dim
    scale = math.sqrt(d)
    wa, ba = p["action_projection.weight"], p["action_projection.bias"]

    def action(mask):
        parts = [p["action_embedding"][bit] if (mask >> bit) & 1 else torch.zeros(cfg.action_embedding_dim,
                                                                                   dtype=wa.dtype)
                 for bit in range(bits)]
        return wa @ torch.cat(parts) + ba

    tokens = []
    for name in names:
        tokens.append((p[f"contextual_embeddings.{name}.weight"][int(batch.contextual[name][b])] * scale, "ctx", 0, 0))
    lo, hi = int(batch.history_offsets[b]), int(batch.history_offsets[b + 1])
    for e, i in enumerate(range(lo, hi)):
        item = p["item_embedding.weight"][int(batch.history_item_ids[i])] * scale
        act = action(int(batch.history_actions[i]))
        t = int(batch.history_timestamps[i])
        if cfg.interleave:
            tokens += [(item, "hist", e, t), (act, "hist", e, t)]
        else:
            tokens.append((item + act, "hist", e, t))
    n = hi - lo
    for i in range(int(batch.candidate_offsets[b]), int(batch.candidate_offsets[b + 1])):
        vec = p["item_embedding.weight"][int(batch.candidate_item_ids[i])] * scale + wa @ p["unknown_action"] + ba
        tokens.append((vec, "cand", n, int(batch.candidate_timestamps[i])))
    return tokens


def plain_visible(tokens, i, j, full_ctx: bool) -> bool:
    ki, kj = tokens[i][1], tokens[j][1]
    if ki == "ctx":
        return (kj == "ctx" and j <= i) or (full_ctx and kj == "hist")
    if ki == "hist":
        return kj == "ctx" or (kj == "hist" and j <= i)
    return kj in ("ctx", "hist") or j == i


def plain_forward(model: DlrmHSTU, batch: RankingBatch) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    cfg = model.config
    n_max, h, dqk, dv = cfg.max_seq_len, cfg.num_heads, cfg.attention_dim, cfg.linear_dim
    out = []
    for b in range(batch.batch_size):
        tokens = plain_tokens(p, cfg, model.contextual_names, model.num_action_bits, batch, b)
        xs = [t[0] for t in tokens]
        for layer in range(cfg.num_blocks):
            pre = f"encoder.layers.{layer}."
            w_pos, w_time = p[pre + "relative_bias.position_weights"], p[pre + "relative_bias.time_weights"]
            proj = [silu(ln(x) @ p[pre + "uvqk"]) for x in xs]
            u = [z[: h * dv] for z in proj]
            v = [z[h * dv: 2 * h * dv] for z in proj]
            q = [z[2 * h * dv: 2 * h * dv + h * dqk] for z in proj]
            k = [z[2 * h * dv + h * dqk:] for z in proj]
            new = []
            for i in range(len(xs)):
                o = torch.zeros(h * dv, dtype=torch.float64)
                for j in range(len(xs)):
                    if not plain_visible(tokens, i, j, cfg.contextual_full_attention):
                        continue
                    bias = 0.0
                    if tokens[i][1] != "ctx" and tokens[j][1] != "ctx":
                        rel = min(max(tokens[j][2] - tokens[i][2], -(n_max - 1)), n_max - 1) + n_max - 1
                        bias = w_pos[rel] + w_time[bucket(tokens[i][3] - tokens[j][3], cfg.num_time_buckets)]
                    for hh in range(h):
                        s = q[i][hh * dqk:(hh + 1) * dqk] @ k[j][hh * dqk:(hh + 1) * dqk] + bias
                        o[hh * dv:(hh + 1) * dv] += silu(s) / n_max * v[j][hh * dv:(hh + 1) * dv]
                y = u[i] * ln(o)
                new.append(xs[i] + p[pre + "output.weight"] @ y + p[pre + "output.bias"])
            xs = new
        for i, tok in enumerate(tokens):
            if tok[1] != "cand":
                continue
            first_candidate_token = len(tokens) - int(batch.num_candidates[b])
            cand = int(batch.candidate_item_ids[int(batch.candidate_offsets[b]) + i - first_candidate_token])
            user = ln(xs[i], p["user_norm.weight"], p["user_norm.bias"], 1e-5)
            item = ln(p["item_embedding.weight"][cand], p["item_norm.weight"], p["item_norm.bias"], 1e-5)
            z = p["interaction.net.0.weight"] @ (user * item) + p["interaction.net.0.bias"]
            z = z * torch.sigmoid(ln(z, p["interaction.net.1.norm.weight"], p["interaction.net.1.norm.bias"], 1e-5))
            out.append(p["interaction.net.2.weight"] @ z + p["interaction.net.2.bias"])
    return torch.stack(out)


def build(seed=0, **kw) -> DlrmHSTU:
    torch.manual_seed(seed)
    model = DlrmHSTU(small_config(**kw), num_items=13, contextual_cardinalities=CONTEXT, tasks=TASKS)
    with torch.no_grad():  # non-trivial norms and biases, so the plain check covers them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleave,full_ctx", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["combined", "interleaved", "combined-ctxfull", "interleaved-ctxfull"])
def test_forward_matches_plain_implementation(interleave, full_ctx):
    model = build(interleave=interleave, contextual_full_attention=full_ctx).double()
    batch = parity_batch()
    got = model(batch)
    want = plain_forward(model, batch)
    assert got.shape == (batch.candidate_item_ids.numel(), len(TASKS))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_interleaving_layout_hand_made():
    """Two users, contextual c=2; tokens, event positions, times and flags in the exact hand-written order."""
    histories = [[(3, 0b01, 100), (5, 0b10, 200)], [(4, 0b11, 50)]]
    candidates = [[(7, 300), (9, 301)], [(2, 60)]]
    batch = make_batch(histories, candidates)
    for interleave in (False, True):
        model = build(interleave=interleave)
        p = {k: v.detach() for k, v in model.state_dict().items()}
        s = math.sqrt(8)
        item = lambda i: p["item_embedding.weight"][i] * s  # noqa: E731
        ctx = lambda n, v: p[f"contextual_embeddings.{n}.weight"][v] * s  # noqa: E731
        wa, ba, ea = p["action_projection.weight"], p["action_projection.bias"], p["action_embedding"]
        zero = torch.zeros(3)
        act = {0b01: wa @ torch.cat([ea[0], zero]) + ba, 0b10: wa @ torch.cat([zero, ea[1]]) + ba,
               0b11: wa @ torch.cat([ea[0], ea[1]]) + ba}
        unknown = wa @ p["unknown_action"] + ba
        if interleave:
            want = [ctx("age", 0), ctx("city", 0), item(3), act[0b01], item(5), act[0b10], item(7) + unknown,
                    item(9) + unknown,
                    ctx("age", 1), ctx("city", 1), item(4), act[0b11], item(2) + unknown]
            pos = [0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 1]
            time = [0, 0, 100, 100, 200, 200, 300, 301, 0, 0, 50, 50, 60]
            lengths, cand_index = [8, 5], [6, 7, 12]
        else:
            want = [ctx("age", 0), ctx("city", 0), item(3) + act[0b01], item(5) + act[0b10], item(7) + unknown,
                    item(9) + unknown, ctx("age", 1), ctx("city", 1), item(4) + act[0b11], item(2) + unknown]
            pos = [0, 0, 0, 1, 2, 2, 0, 0, 0, 1]
            time = [0, 0, 100, 200, 300, 301, 0, 0, 50, 60]
            lengths, cand_index = [6, 4], [4, 5, 9]
        layout = model.sequence_layout(batch)
        torch.testing.assert_close(layout.tokens, torch.stack(want), rtol=1e-6, atol=1e-7)
        assert layout.meta.position.tolist() == pos
        assert layout.meta.time.tolist() == time
        flags = [False] * len(pos)
        for start in (0, lengths[0]):
            flags[start] = flags[start + 1] = True
        assert layout.meta.contextual.tolist() == flags
        assert layout.lengths.tolist() == lengths
        assert layout.offsets.tolist() == [0, lengths[0], sum(lengths)]
        assert layout.num_targets.tolist() == [2, 1]
        assert layout.candidate_index.tolist() == cand_index


def test_candidate_score_unchanged_when_other_candidates_change():
    model = build(interleave=True)
    hist = [[(3, 1, 1000), (7, 2, 2000), (2, 3, 5000)], [(4, 1, 10)]]
    first = make_batch(hist, [[(5, 6000), (1, 6000), (9, 6100)], [(2, 20)]])
    second = make_batch(hist, [[(11, 7000), (5, 6000), (12, 6000), (3, 1), (8, 9)], [(2, 20), (3, 30)]])
    a, b = model(first), model(second)
    torch.testing.assert_close(b[1], a[0], rtol=0, atol=1e-6)  # candidate 5 of user 0, other companions
    torch.testing.assert_close(b[5], a[3], rtol=0, atol=1e-6)  # user 1's candidate, another batch layout
    alone = model(make_batch([hist[0]], [[(5, 6000)]]))
    torch.testing.assert_close(alone[0], a[0], rtol=0, atol=1e-6)
    # the history does reach the candidates: changing one history event changes the score
    changed = model(make_batch([[(3, 1, 1000), (8, 2, 2000), (2, 3, 5000)]], [[(5, 6000)]]))
    assert (changed[0] - a[0]).abs().max() > 1e-5


def test_loss_is_multitask_loss_and_gradients_reach_parameters():
    model = build().train()
    batch = parity_batch()
    total, per_task = model.loss(batch)
    want_total, want_tasks = multitask_loss(model(batch), batch.labels, TASKS)
    torch.testing.assert_close(total, want_total)
    assert set(per_task) == {"click", "like", "watch"}
    total.backward()
    missing = [n for n, prm in model.named_parameters() if prm.grad is None or not prm.grad.abs().sum() > 0]
    # the "mlp" interaction reads user * item only; the contextual features' norm feeds other towers (wukong)
    assert missing == ["contextual_norm.weight", "contextual_norm.bias"]


def planted_batch(num_users: int, gen: torch.Generator, genres=4, items=40, hist_len=12, cands=8) -> RankingBatch:
    """Each user has a favourite genre (item % genres); 80% of their history is from it.  A candidate is clicked
    iff it is of the favourite genre, liked iff clicked and its id is even; watch time 1.0 if clicked else 0.2."""
    fav = torch.randint(0, genres, (num_users, 1), generator=gen)
    from_fav = torch.rand(num_users, hist_len, generator=gen) < 0.8
    liked = torch.randint(0, items // genres, (num_users, hist_len), generator=gen) * genres + fav
    history = torch.where(from_fav, liked, torch.randint(0, items, (num_users, hist_len), generator=gen))
    times = 1_000_000 + torch.randint(60, 3600, (num_users, hist_len), generator=gen).cumsum(1)
    candidates = torch.randint(0, items, (num_users, cands), generator=gen)
    click = (candidates % genres == fav).float().reshape(-1)
    like = click * (candidates.reshape(-1) % 2 == 1).float()  # encoded id (item + 1) even
    return RankingBatch(
        history_item_ids=(history + 1).reshape(-1), history_actions=(history % genres == fav).long().reshape(-1),
        history_timestamps=times.reshape(-1), history_offsets=torch.arange(num_users + 1) * hist_len,
        candidate_item_ids=(candidates + 1).reshape(-1),
        candidate_timestamps=(times[:, -1:] + 60).expand(-1, cands).reshape(-1),
        candidate_offsets=torch.arange(num_users + 1) * cands,
        labels=torch.stack([click, like, 0.2 + 0.8 * click], dim=1), tasks=TASKS,
        contextual={"age": torch.randint(0, 4, (num_users,), generator=gen),
                    "city": torch.randint(0, 3, (num_users,), generator=gen)})


def test_short_training_beats_chance_on_planted_data():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = DlrmHSTU(DlrmHSTUConfig(embedding_dim=16, num_blocks=1, num_heads=1, attention_dim=16, linear_dim=16,
                                    max_seq_len=32, dropout=0.0, input_dropout=0.0, multitask_hidden=32,
                                    kernel="pytorch"), num_items=41, contextual_cardinalities=CONTEXT, tasks=TASKS)
    train = [planted_batch(32, gen) for _ in range(8)]
    test = planted_batch(128, gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _epoch in range(5):
        for batch in train:
            loss, _ = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        pred = model(test)
    click_auc = auc(test.labels[:, 0], pred[:, 0])
    assert click_auc > 0.85, click_auc
    assert auc(test.labels[:, 1], pred[:, 1]) > 0.75  # "like" = click and an even id: also learned
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])


def test_interaction_hook_accepts_a_registered_tower():
    class SumTower(torch.nn.Module):
        def __init__(self, dim, num_tasks, num_features, config):
            super().__init__()
            self.linear = torch.nn.Linear(dim, num_tasks)

        def forward(self, features):
            assert features.shape[1:] == (2 + len(CONTEXT), 8)  # user, item, contextual...
            return self.linear(features.sum(1))

    register_interaction("test-sum", SumTower)
    try:
        model = DlrmHSTU(small_config(interaction="test-sum"), 13, CONTEXT, TASKS).eval()
        assert model(parity_batch()).shape == (6, 3)
    finally:
        INTERACTIONS.pop("test-sum")


def test_wukong_interaction_runs():
    model = DlrmHSTU(small_config(interaction="wukong"), 13, CONTEXT, TASKS).eval()
    assert model(parity_batch()).shape == (6, 3)


def test_bad_inputs_name_the_problem():
    model = build()
    batch = parity_batch()
    with pytest.raises(ValueError, match="contextual feature 'city' is missing"):
        model(make_batch([[(1, 0, 1)]], [[(2, 2)]], contextual={"age": torch.tensor([0])}))
    with pytest.raises(ValueError, match=r"contextual\['age'\] holds values outside \[0, 4\)"):
        model(make_batch([[(1, 0, 1)]], [[(2, 2)]], contextual={"age": torch.tensor([4]), "city": torch.tensor([0])}))
    with pytest.raises(ValueError, match="candidate_item_ids holds ids outside"):
        model(make_batch([[(1, 0, 1)]], [[(13, 2)]]))
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model(make_batch([[(1, 0, t) for t in range(30)]], [[(2, 40)] * 10]))
    with pytest.raises(ValueError, match="differ from the model's"):
        model.loss(make_batch([[(1, 0, 1)]], [[(2, 2)]], tasks=TASKS[:1]))
    with pytest.raises(ValueError, match="DlrmHSTUConfig.interaction"):
        small_config(interaction="nope")
    with pytest.raises(ValueError, match="DlrmHSTUConfig.embedding_dim"):
        small_config(embedding_dim=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        small_config(stochastic_length_alpha=2.5)
    with pytest.raises(ValueError, match="num_items"):
        DlrmHSTU(small_config(), 1, CONTEXT, TASKS)
    assert model(batch).shape == (6, 3)


def padded_inputs(batch: RankingBatch):
    """A RankingBatch as the padded column dict T4R feeds its body (ranking workflow column names)."""
    b = batch.batch_size

    def pad(values, offsets):
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        out = torch.zeros(b, max(lengths), dtype=values.dtype)
        for r, (lo, n) in enumerate(zip(offsets[:-1].tolist(), lengths)):
            out[r, :n] = values[lo:lo + n]
        return out

    inputs = {"item_id-list": pad(batch.history_item_ids, batch.history_offsets),
              "action-list": pad(batch.history_actions, batch.history_offsets),
              "timestamp-list": pad(batch.history_timestamps, batch.history_offsets),
              "candidate_item_id-list": pad(batch.candidate_item_ids, batch.candidate_offsets),
              "query_time": batch.candidate_timestamps[batch.candidate_offsets[:-1]],
              **{f"context-{k}": v for k, v in batch.contextual.items()}}
    actions = labels_to_bitmask(batch.labels)
    targets = {"candidate_action-list": pad(actions, batch.candidate_offsets),
               "candidate_watch_time-list": pad(batch.labels[:, 2], batch.candidate_offsets)}
    return inputs, targets


def labels_to_bitmask(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, 0].long() | (labels[:, 1].long() << 1)


def test_t4r_head_matches_the_model_and_trains():
    import transformers4rec.torch as tr

    from merlin_hstu.t4r.ranking import ranking_head

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    batch = planted_batch(12, gen, cands=5)
    keep = torch.ones(batch.candidate_item_ids.numel(), dtype=torch.bool)
    keep[3:5] = False  # user 0 keeps 3 of its 5 candidates, so the padded [B, K] inputs hold padding
    counts = torch.full((12,), 5)
    counts[0] = 3
    batch = RankingBatch(batch.history_item_ids, batch.history_actions, batch.history_timestamps,
                         batch.history_offsets, batch.candidate_item_ids[keep], batch.candidate_timestamps[keep],
                         F.pad(counts.cumsum(0), (1, 0)), batch.labels[keep], TASKS, batch.contextual)
    model = DlrmHSTU(small_config(max_seq_len=32), num_items=41, contextual_cardinalities=CONTEXT, tasks=TASKS)
    t4r_model = tr.Model(ranking_head(model))
    inputs, targets = padded_inputs(batch)
    t4r_model.eval()
    out = t4r_model(dict(inputs))
    with torch.no_grad():
        want = model(batch)
    mask = inputs["candidate_item_id-list"] != 0
    assert mask.sum() == batch.candidate_item_ids.numel() and not mask[0, 3:].any()
    torch.testing.assert_close(out["click"][mask], torch.sigmoid(want[:, 0]))
    torch.testing.assert_close(out["watch"][mask], want[:, 2])
    assert (out["like"][~mask] == 0).all()
    with torch.no_grad():
        _, per_task = multitask_loss(want, batch.labels, TASKS)
        evaluated = t4r_model(dict(inputs), targets=targets, testing=True)
    mean_weighted = sum(t.weight * per_task[t.name] for t in TASKS) / len(TASKS)  # T4R: mean over tasks
    torch.testing.assert_close(evaluated["loss"], mean_weighted, rtol=1e-5, atol=1e-6)
    opt = torch.optim.Adam(t4r_model.parameters(), lr=1e-2)
    t4r_model.train()
    first = evaluated["loss"].item()
    for _ in range(15):
        loss = t4r_model(dict(inputs), targets=targets, training=True)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
