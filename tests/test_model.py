"""The model: the template, embeddings, generation, shared prompts, checkpoints."""

import json
import random
from contextlib import nullcontext

import pytest
import torch

import data
import elva
import retriever
import train
from tests.helpers import (tiny_model, some_items, rl_args, made_of, rl_instances)


def test_template_and_ret_position(world, tok):
    ret = tiny_model(tok)
    qs, items, instr = some_items(world)
    summ = [ret.enc.summary(it.summary) for it in items]
    b, imgs = ret.batch(items, instr, summ)
    T = b["tokens"].shape[1]
    for i, it in enumerate(items):
        row = b["tokens"][i]
        rp = b["ret_pos"][i].item()
        assert row[rp].item() == ret.enc.ret
        # [RET] is the last real token
        assert rp == T - 1 or not b["attn"][i, rp + 1:].any()
        assert b["gen_mask"][i].sum().item() == len(summ[i]) + 1         # summary + [RET]
        text = tok.decode(row[b["attn"][i]].tolist(), skip_special_tokens=False)
        assert "Analyze and summarize the key information of the above input." in text
        assert text.endswith("ASSISTANT: " + it.summary + "[RET]"), text[-80:]
        n_img = (row == ret.enc.img).sum().item()
        assert n_img == (ret.model.cfg.n_img_tokens if it.scene is not None else 0)
    assert imgs.shape[0] == sum(it.scene is not None for it in items)

def test_embedding_shapes_dtype_unit_norm(world, tok):
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 6)
    b, imgs = ret.batch(items, instr, [ret.enc.summary(it.summary) for it in items])
    e = ret.model.embed(b, imgs)
    assert e.shape == (6, ret.model.cfg.d_model) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(6), atol=1e-5)
    logp, h = ret.model.token_logprobs(b, imgs)
    assert (logp.shape == b["tokens"].shape and torch.all(logp[~b["gen_mask"]] == 0)
            and torch.all(logp <= 0))

def test_padding_does_not_change_embeddings(world, tok):
    """Left padding (batching with longer prompts) must not change an input's embedding:
    positions follow the mask."""
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 6)
    summ = [ret.enc.summary(it.summary) for it in items]
    b, imgs = ret.batch(items, instr, summ)
    together = ret.model.embed(b, imgs)
    for i in range(6):
        bi, ii = ret.batch(items[i:i + 1], instr[i:i + 1], summ[i:i + 1])
        alone = ret.model.embed(bi, ii if ii.shape[0] else None)
        assert (alone[0] - together[i]).abs().max().item() < 1e-5

def test_greedy_generation_is_deterministic_and_matches_no_cache(world, tok):
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 4)
    a = ret.summarise(items, instr)
    assert a == ret.summarise(items, instr)
    # the KV-cache path equals re-running the whole sequence each step
    b, imgs = ret.batch(items, instr, None)
    toks, attn = b["tokens"], b["attn"]
    for t in range(3):
        lg = ret.model.logits(ret.model.forward(toks, attn, imgs)[:, -1])
        lg[:, [ret.enc.pad, ret.enc.img]] = float("-inf")
        nxt = lg.argmax(-1)
        for i in range(4):
            if len(a[i]) > t:
                assert a[i][t] == nxt[i].item()
        toks = torch.cat([toks, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones(4, 1, dtype=torch.bool)], 1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert ret.summarise(items, instr, 1.0, g1) == ret.summarise(items, instr, 1.0, g2)

def test_logprobs_use_the_sampled_distribution(world, tok):
    """token_logprobs scores tokens under the distribution generate samples from ([PAD] and [IMG]
    ruled out)."""
    ret = tiny_model(tok, seed=3)
    _, items, instr = some_items(world, 3)
    summ = ret.summarise(items, instr, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b, imgs = ret.batch(items, instr, summ)
    logp, h = ret.model.token_logprobs(b, imgs, temperature=0.7)
    logits = ret.model.logits(h[:, :-1]).float()
    logits[..., [ret.enc.pad, ret.enc.img]] = float("-inf")
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, b["tokens"][:, 1:, None])[..., 0]
    m = b["gen_mask"][:, 1:]
    assert torch.allclose(logp[:, 1:][m], want[m], atol=1e-5)
    assert torch.all(logp[~b["gen_mask"]] == 0)

def test_shared_prompts_give_the_full_pass_numbers(world, tok):
    """GRPO's G rollouts share each item's prompt: computing it once (KV cache expanded over the
    rollouts) gives the same log-probs, embeddings and gradients as the plain pass over every
    full sequence; generation with shared prompts samples what generation over repeated prompts
    samples."""
    ret = tiny_model(tok, seed=4)
    inst = rl_instances(world, 2, 2)
    G = 3
    ro = train.rollout(rl_args(group_size=G), ret.model, made_of(ret, inst),
                       torch.Generator().manual_seed(0),
                       nullcontext)
    once, once_instr = retriever.rollout_items(inst)
    K = len(once) // len(inst)
    items = [it for b in range(len(inst)) for _ in range(G) for it in once[b * K:(b + 1) * K]]
    instr = [x for b in range(len(inst)) for _ in range(G) for x in once_instr[b * K:(b + 1) * K]]
    # the full sequences, each on its own
    b, imgs = ret.batch(items, instr, ro.summaries)
    logp, h = ret.model.token_logprobs(b, imgs)
    # the summary part starts at column P
    P = b["tokens"].shape[1] - ro.batch["tokens"].shape[1]
    assert torch.allclose(logp[:, P:], ro.logp, atol=1e-5)
    e_full = ret.model.ret_embedding(h, b["ret_pos"])
    assert torch.allclose(e_full.view(ro.e.shape), ro.e, atol=1e-5)
    g_full = torch.autograd.grad(logp.sum() + e_full.sum(), ret.model.tok_emb.weight)[0]
    g_shared = torch.autograd.grad(ro.logp.sum() + ro.e.sum(), ret.model.tok_emb.weight)[0]
    assert torch.allclose(g_full, g_shared, atol=1e-5)
    pb, _ = ret.batch(items, instr, None)
    plain = ret.model.generate(pb["tokens"], pb["attn"], imgs, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert plain == ro.summaries

def test_length_groups_give_the_one_pass_numbers(world, tok):
    """Stages 1-2 run a batch as two passes of rows of similar length, each without its
    all-padding columns (elva.length_groups): the same log-probs, embeddings and gradients as one
    pass, images following their rows."""
    ret = tiny_model(tok, seed=5)
    qs = world.sample_queries(random.Random(1), 12)
    items = [q.item for q in qs] + [q.positive for q in qs]
    instr = [data.INSTRUCTIONS[q.task] for q in qs] + [None] * len(qs)
    drop = [i % 3 == 0 for i in range(len(items))]
    b, imgs = ret.batch(items, instr, ret.enc.reference_summaries(items, drop))
    # rows with and without an image
    assert 0 < len(imgs) < len(items)
    parts = list(elva.length_groups(b, imgs, 2, ret.model.img_id, ret.model.cfg.n_img_tokens))
    assert sorted(r for rows, *_ in parts for r in rows.tolist()) == list(range(len(items)))
    assert sum(p["tokens"].numel() for _, _, p, _ in parts) < b["tokens"].numel()   # less padding
    outs = []
    for groups in (1, 2):
        logp, h = ret.model.token_logprobs(b, imgs, groups=groups)
        e = ret.model.ret_embedding(h, b["ret_pos"])
        grad = torch.autograd.grad(logp.sum() + e.sum(), ret.model.patch_embed.weight)[0]
        outs.append((logp, e, grad))
    for one, two in zip(*outs):
        assert torch.allclose(one, two, atol=1e-5)
    # the images' gradient is checked too
    assert outs[0][2].abs().sum() > 0

def test_checkpoint_round_trip_and_bad_checkpoints(world, tok, tmp_path):
    """One model.safetensors holds weights, config, tokenizer and record; a damaged file, one
    whose config does not fit its weights, or a missing folder is one line; a checkpoint of the
    layout before (config.json naming model-<step>.safetensors) still loads."""
    from safetensors.torch import load_file, save_file
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 3)
    e1, _ = ret.embed_items(items, instr)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 3})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors"]
    ret2 = retriever.Retriever.from_pretrained(tmp_path / "ck")
    e2, _ = ret2.embed_items(items, instr)
    assert torch.equal(e1, e2) and ret2.meta["step"] == 3
    # a config that does not fit the weights
    path = tmp_path / "ck" / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    cfg = json.loads(header["config"])
    save_file(load_file(str(path)), str(tmp_path / "x.safetensors"),
              {**header, "config": json.dumps({**cfg, "d_model": 64})})
    (tmp_path / "bad").mkdir()
    (tmp_path / "x.safetensors").rename(tmp_path / "bad" / "model.safetensors")
    with pytest.raises(data.BadInput, match="do not match the config saved with them"):
        retriever.load_checkpoint(tmp_path / "bad")
    # a damaged file (a write cut short by hand)
    (tmp_path / "bad" / "model.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.BadInput, match="damaged or not a checkpoint"):
        retriever.load_checkpoint(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        retriever.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no model.safetensors"):
        retriever.load_checkpoint(tmp_path / "empty")
    # the layout before: config.json naming the weights file, tokenizer.json beside it
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(str(path)), str(old / "model-000003.safetensors"))
    tok.save(str(old / "tokenizer.json"))
    (old / "config.json").write_text(json.dumps({"model": cfg, "world": {}, "step": 3, "files": {
        "model": {"name": "model-000003.safetensors"}}}))
    e3, _ = retriever.Retriever.from_pretrained(old).embed_items(items, instr)
    assert torch.equal(e1, e3)

@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_state_round_trip_keeps_torch_placement(tok, tmp_path, fused):
    """--resume restores AdamW through load_state_dict: the same state as saved, and each tensor
    where this kind of AdamW keeps it (fused: `step` on the parameter's device as float32; plain:
    on the CPU)."""
    ret = tiny_model(tok)
    opt = torch.optim.AdamW(ret.model.parameters(), lr=1e-3, fused=fused)
    for _ in range(2):
        opt.zero_grad()
        ret.model.norm.weight.sum().backward()
        opt.step()
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 1},
                            optimizer=opt)
    fresh = torch.optim.AdamW(ret.model.parameters(), lr=1e-3, fused=fused)
    name = retriever.read_checkpoint(tmp_path / "ck")[3]["optimizer"]
    fresh.load_state_dict(torch.load(tmp_path / "ck" / name, weights_only=True))   # as --resume
    a, b = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    p = ret.model.norm.weight
    assert fresh.state[p]["step"].device == p.device
    fresh.zero_grad()
    p.sum().backward()
    fresh.step()                                                        # the restored state steps
