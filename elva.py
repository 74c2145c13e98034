"""
The model: a tiny MLLM in the shape of Qwen2-VL whose embedding is *generated* (ELVA, Section 3.4).

    python elva.py      # builds each preset, prints its parameter count and image tokens

Image (3, H, W) -> ViT over patches -> 2x2 patch merger + MLP projector (Qwen2-VL's PatchMerger) ->
LM token space, placed at the [IMG] placeholder tokens of the paper's template:

    USER: {image} <Instruction> {query}. Analyze and summarize the key information of the above
    input. Finally, append the special token [RET] to represent the entire input.
    ASSISTANT: {Generated Summary} [RET]

-> causal decoder (RMSNorm, RoPE, SwiGLU) -> LM head (tied to the token embedding). The embedding of
an input is the final hidden state at [RET], L2-normalised. Because the summary before [RET] is
sampled, G rollouts of one input give G different embeddings: the variance GRPO needs (a
fixed-token embedding would give G identical rollouts and no advantage).

Like nanoGPT's model.py this file imports nothing of its project: the Retriever (items in,
embeddings out), its checks and checkpoints are in retriever.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """positions (B, T) long -> cos, sin (B, 1, T, head_dim/2). Positions come from the attention
    mask, so left padding does not shift a sequence's rotary phases."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    ang = positions.float()[..., None] * inv                                  # (B, T, hd/2)
    return ang.cos()[:, None], ang.sin()[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)                                       # (B, H, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, rope: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = n_heads, dim // n_heads, rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask=None, cos=None, sin=None, cache=None):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                    # 3 x (B, H, T, hd)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # KV cache for generation: append this step's keys and values
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)             # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block; the ViT uses it without RoPE (learned positions), the decoder
    with RoPE."""

    def __init__(self, dim: int, n_heads: int, rope: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, n_heads, rope)
        self.mlp = SwiGLU(dim, 4 * dim * 2 // 3 // 8 * 8 or 8)

    def forward(self, x, mask=None, cos=None, sin=None, cache=None):
        x = x + self.attn(self.norm1(x), mask, cos, sin, cache)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------
# Config and presets


@dataclass
class ModelConfig:
    image_size: int = 36        # input images are resized to this square
    patch_size: int = 6         # ViT patch side: 6x6 patches, merged 2x2 into 3x3 LM tokens (one
                                # per GrainWorld cell)
    vit_dim: int = 96           # ViT width
    vit_layers: int = 3
    vit_heads: int = 4
    d_model: int = 128          # decoder width
    n_layers: int = 4           # decoder depth
    n_heads: int = 4
    vocab_size: int = 512       # BPE vocabulary incl. the special tokens (set from the tokenizer)
    max_seq_len: int = 160      # longest prompt + summary + [RET]
    max_summary_len: int = 32   # generation stops here and [RET] is forced

    @property
    def n_img_tokens(self) -> int:  # after the 2x2 patch merger
        return (self.image_size // self.patch_size // 2) ** 2

    def validate(self):
        if self.image_size % (2 * self.patch_size):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2 * patch_size "
                             f"({2 * self.patch_size})")
        for w, h, name in ((self.vit_dim, self.vit_heads, "vit"),
                           (self.d_model, self.n_heads, "decoder")):
            if w % h or (w // h) % 2:
                raise ValueError(f"{name} width {w} must split into {h} heads of even size")


PRESETS = {
    # smoke: seconds per step on a laptop, for tests and CI
    "smoke": ModelConfig(vit_dim=48, vit_layers=1, vit_heads=2, d_model=64, n_layers=2, n_heads=2),
    # cpu: the default on a 2-core CPU (~1M parameters)
    "cpu": ModelConfig(),
    # gpu: a bigger model for one GPU
    "gpu": ModelConfig(vit_dim=256, vit_layers=6, vit_heads=8, d_model=384, n_layers=8, n_heads=6),
}


# ----------------------------------------------------------------------------------------
# The model


class ELVAModel(nn.Module):
    def __init__(self, cfg: ModelConfig, img_token_id: int, ret_token_id: int, pad_token_id: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.img_id, self.ret_id, self.pad_id = img_token_id, ret_token_id, pad_token_id
        # vision tower: patches -> ViT (bidirectional) -> 2x2 merge -> projector into d_model
        n_patch = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.vit_dim)
        self.vit_pos = nn.Parameter(torch.randn(1, n_patch, cfg.vit_dim) * 0.02)
        self.vit = nn.ModuleList(Block(cfg.vit_dim, cfg.vit_heads, rope=False)
                                 for _ in range(cfg.vit_layers))
        self.vit_norm = RMSNorm(cfg.vit_dim)
        self.projector = nn.Sequential(nn.Linear(4 * cfg.vit_dim, cfg.d_model), nn.GELU(),
                                       nn.Linear(cfg.d_model, cfg.d_model))
        # decoder LM
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, rope=True)
                                    for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- vision ------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> image tokens (N, n_img_tokens, d_model)."""
        N, C, H, W = images.shape
        p, g = self.cfg.patch_size, H // self.cfg.patch_size
        x = images.reshape(N, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(N, g * g, C * p * p)                                      # (N, P, 3pp)
        x = self.patch_embed(x) + self.vit_pos
        for blk in self.vit:
            x = blk(x)
        x = self.vit_norm(x)
        # 2x2 patch merger: concatenate each 2x2 neighbourhood (Qwen2-VL), quartering the tokens the
        # LM must read
        x = x.view(N, g // 2, 2, g // 2, 2, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(N, (g // 2) ** 2, -1)                                     # (N, P/4, 4 dv)
        return self.projector(x)

    # -- decoder -----------------------------------------------------------------------------------
    def _embed_tokens(self, tokens, images):
        x = self.tok_emb(tokens)                                                # (B, T, D)
        is_img = tokens == self.img_id
        n_img = int(is_img.sum())
        if n_img:
            if images is None or images.shape[0] * self.cfg.n_img_tokens != n_img:
                got = 0 if images is None else images.shape[0]
                raise ValueError(f"the batch has {n_img} [IMG] tokens, i.e. "
                                 f"{n_img / self.cfg.n_img_tokens:g} images, "
                                 f"but {got} images were given")
            feats = self.encode_images(images).to(x.dtype)
            x = x.masked_scatter(is_img[..., None], feats.reshape(-1, x.shape[-1]))
        return x

    def forward(self, tokens, attn, images=None, cache=None, positions=None):
        """tokens (B, T), attn (B, Tk) over every key so far (cache included) -> hidden states
        (B, T, D). The mask is causal and key-not-padding; each position sees itself, so rows
        of pure padding stay finite (their outputs are never used)."""
        B, T = tokens.shape
        x = self._embed_tokens(tokens, images)
        Tk = attn.shape[1]
        if positions is None:
            positions = (attn.long().cumsum(1) - 1).clamp(min=0)[:, Tk - T:]   # (B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_heads)
        q_idx = torch.arange(Tk - T, Tk, device=tokens.device)
        k_idx = torch.arange(Tk, device=tokens.device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None] & attn[:, None, :]      # (B, T, Tk)
        mask = mask | (k_idx[None, :] == q_idx[:, None])[None]
        mask = mask[:, None]                                                    # (B, 1, T, Tk)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, cos, sin, None if cache is None else cache[i])
        return self.norm(x)

    def logits(self, h):
        return h @ self.tok_emb.weight.T                                        # tied LM head

    def summary_logits(self, h, temperature: float = 1.0):
        """The distribution summaries are sampled from (fp32 logits, [PAD] and [IMG] ruled out,
        / temperature): generate samples from it, token_logprobs scores with it, so GRPO's
        ratio, gradient and KL use exactly the distribution that was sampled."""
        logits = self.logits(h).float()
        logits[..., self.pad_id] = float("-inf")
        logits[..., self.img_id] = float("-inf")
        return logits / temperature if temperature > 0 else logits

    def token_logprobs(self, batch: dict, images=None, temperature: float = 1.0, groups: int = 1):
        """Teacher-forced pass over prompt + summary + [RET] -> (logp (B, T), h (B, T, D)):
        log p(token t | tokens < t) at `temperature` where gen_mask (zero elsewhere), and the
        hidden states (h[b, ret_pos[b]] is the embedding's source). groups > 1: in that many
        passes of rows of like length (length_groups): the same numbers, less padding."""
        if groups > 1:
            logp = torch.zeros(batch["tokens"].shape, device=batch["tokens"].device)
            h = torch.zeros(*batch["tokens"].shape, self.cfg.d_model, device=batch["tokens"].device)
            for rows, cols, part, part_images in length_groups(batch, images, groups, self.img_id,
                                                               self.cfg.n_img_tokens):
                lp_g, h_g = self.token_logprobs(part, part_images, temperature)
                logp = logp.index_put((rows[:, None], cols[None]), lp_g)
                h = h.index_put((rows[:, None], cols[None]), h_g.to(h.dtype))
            return logp, h
        tokens, attn = batch["tokens"], batch["attn"]
        h = self.forward(tokens, attn, images)
        # the LM head only where a summary token is predicted (a tenth of the positions in stage 2):
        # state t-1 predicts token t
        sel = batch["gen_mask"][:, 1:]                                          # (B, T-1)
        logits = self.summary_logits(h[:, :-1][sel], temperature)              # (n, V)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:][sel][:, None])[:, 0]  # (n,)
        logp = torch.zeros(tokens.shape, dtype=lp.dtype, device=tokens.device)
        logp[:, 1:] = logp[:, 1:].masked_scatter(sel, lp)                 # zero outside the summary
        return logp, h

    @staticmethod
    def ret_embedding(h, ret_pos):
        """h (B, T, D), ret_pos (B,) -> L2-normalised [RET] hidden states (B, D)."""
        e = h[torch.arange(h.shape[0], device=h.device), ret_pos]
        return F.normalize(e.float(), dim=-1)

    def embed(self, batch: dict, images=None) -> torch.Tensor:
        """The embedding (B, D): final hidden state at [RET], L2-normalised."""
        h = self.forward(batch["tokens"], batch["attn"], images)
        return self.ret_embedding(h, batch["ret_pos"])

    def shared_prefix_logprobs(self, rb: dict, temperature: float = 1.0):
        """token_logprobs for summaries that continue *shared* prompts (an item's G rollouts):
        each prompt (U, P) runs once and its KV cache is expanded over the rows that continue it
        (row s: prompt index[s]); the summaries (S, Ts, collate_summaries) run per row. The same
        numbers (a test checks), the prompt's cost divided by G -> (logp, h) (S, Ts)."""
        cache = [dict() for _ in self.blocks]
        hp = self.forward(rb["prompt_tokens"], rb["prompt_attn"], rb["images"], cache=cache)
        # hp (U, P, D): the prompts' states
        idx = rb["index"]
        cache = expand_cache(cache, idx)
        attn = torch.cat([rb["prompt_attn"].index_select(0, idx), rb["attn"]], dim=1)  # (S, P + Ts)
        h = self.forward(rb["tokens"], attn, None, cache=cache)                         # (S, Ts, D)
        # summary token t is predicted from the state before it: the prompt's last state (every
        # prompt ends in the last column: left padding) for t = 0, then the summary's own states
        prev = torch.cat([hp[:, -1:].index_select(0, idx), h[:, :-1]], dim=1)           # (S, Ts, D)
        logits = self.summary_logits(prev, temperature)                                 # (S, Ts, V)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, rb["tokens"][..., None])[..., 0]
        return torch.where(rb["gen_mask"], lp, torch.zeros_like(lp)), h

    @torch.no_grad()
    def generate(self, tokens, attn, images=None, max_new: int | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 return_ended: bool = False, index=None):
        """Summaries (token ids, no [RET]) for left-padded prompts (B, P), greedy at temperature
        0, else sampled, with a KV cache, until [RET] or max_new tokens. return_ended: also
        whether each row *sampled* its [RET] (a forced one is not the policy's: RL must not
        train it). index (S,): row s continues prompt index[s] (GRPO's G rollouts)."""
        max_new = max_new or self.cfg.max_summary_len
        cache = [dict() for _ in self.blocks]
        h = self.forward(tokens, attn, images, cache=cache)
        if index is not None:   # expand the prompts' states and KV cache over the rows that follow
            h, attn = h[:, -1:].index_select(0, index), attn.index_select(0, index)
            cache = expand_cache(cache, index)
        B = h.shape[0]
        pos = attn.long().sum(1) - 1                                       # (B,) last real position
        out = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=tokens.device)
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for t in range(max_new):
            logits = self.summary_logits(h[:, -1], temperature)                 # (B, V)
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out[:, t] = nxt
            done |= nxt == self.ret_id
            if bool(done.all()) or t == max_new - 1:
                break
            attn = torch.cat([attn, ~done[:, None] | (nxt == self.ret_id)[:, None]], dim=1)
            pos = pos + 1
            h = self.forward(nxt[:, None], attn, None, cache=cache, positions=pos[:, None])
        rows, ended = [], []
        for r in out.tolist():
            ended.append(self.ret_id in r)
            r = r[:r.index(self.ret_id)] if self.ret_id in r else r
            rows.append([i for i in r if i != self.pad_id])
        return (rows, ended) if return_ended else rows

    def vision_parameters(self):
        """The vision tower and projector (Qwen2-VL's visual module, merger included): frozen in
        ELVA's stage 3."""
        for mod in (self.patch_embed, self.vit, self.vit_norm, self.projector):
            yield from mod.parameters()
        yield self.vit_pos


def length_groups(batch: dict, images, groups: int, img_id: int, n_img_tokens: int):
    """A collated batch -> `groups` parts of rows of similar length, each without the columns
    that are padding in all its rows: the same sequences (positions come from the mask), less
    padding (stage 2's batches are ~70% real tokens). Yields (rows, cols, part, its images)."""
    attn = batch["attn"]
    order = attn.sum(1).argsort(stable=True)                                  # rows, shortest first
    n_img = (batch["tokens"] == img_id).sum(1) // n_img_tokens                 # (B,) images per row
    first_img = n_img.cumsum(0) - n_img                                 # (B,) the row's first image
    for rows in order.tensor_split(groups):
        if len(rows) == 0:
            continue
        rows = rows.sort().values                             # keep the batch's order within a part
        used = attn[rows].any(0).nonzero()[:, 0]
        cols = torch.arange(int(used[0]), int(used[-1]) + 1, device=attn.device)
        part = {k: v[rows][:, cols] for k, v in batch.items() if k != "ret_pos"}
        part["ret_pos"] = batch["ret_pos"][rows] - cols[0]
        imgs = None
        if images is not None and len(images):
            idx = [i for r in rows.tolist()
                   for i in range(int(first_img[r]), int(first_img[r] + n_img[r]))]
            imgs = images[torch.tensor(idx, dtype=torch.long, device=images.device)]
        yield rows, cols, part, imgs


def expand_cache(cache: list[dict], index: torch.Tensor) -> list[dict]:
    """A KV cache of U prompts -> one for S rows, row s continuing prompt index[s] (each layer's
    k, v: (U, H, P, hd) -> (S, H, P, hd)). Gradients flow back into the shared prompt states."""
    return [{"k": c["k"].index_select(0, index), "v": c["v"].index_select(0, index)} for c in cache]


def build_model(cfg: ModelConfig, tok) -> ELVAModel:
    """A fresh model whose special-token ids come from the tokenizer (the one way a model is
    made)."""
    cfg.vocab_size = tok.get_vocab_size()
    ids = [tok.token_to_id(t) for t in ("[IMG]", "[RET]", "[PAD]")]
    return ELVAModel(cfg, *ids)


def collate_summaries(summaries: list[list[int]], pad_id: int, ret_id: int) -> dict:
    """The summary part alone, for prompts whose states are shared (shared_prefix_logprobs):
    summary + [RET], right-padded -> tokens / attn / gen_mask (S, Ts), ret_pos (S,), positions
    within the part."""
    S = len(summaries)
    Ts = max(len(s) + 1 for s in summaries)
    tokens = torch.full((S, Ts), pad_id, dtype=torch.long)
    attn = torch.zeros(S, Ts, dtype=torch.bool)
    ret_pos = torch.empty(S, dtype=torch.long)
    for i, s in enumerate(summaries):
        tokens[i, :len(s) + 1] = torch.tensor(list(s) + [ret_id])
        attn[i, :len(s) + 1] = True
        ret_pos[i] = len(s)
    return {"tokens": tokens, "attn": attn, "gen_mask": attn.clone(), "ret_pos": ret_pos}


if __name__ == "__main__":
    for name, cfg in PRESETS.items():
        m = ELVAModel(cfg, 3, 4, 0)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name:6s} {n / 1e6:6.2f}M parameters, {cfg.n_img_tokens} image tokens, "
              f"d_model {cfg.d_model}")
