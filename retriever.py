"""
The retriever as people know it from CLIP and sentence-transformers -- items in, embeddings out,
each from a generated summary and [RET] (ELVA, Section 3.4) -- and the checkpoints it loads.

    from retriever import Retriever
    r = Retriever.from_pretrained("runs/cpu/elva")           # the GPU when there is one
    q = r.encode_text("a red circle left of a blue square", instruction="Retrieve an image ...")
    c = r.encode_image(["a.png", "b.png"])                   # PIL images or paths -> (2, D)
    scores, indices = r.search(q, c, k=2)                    # tensors or numpy

A checkpoint is a folder whose model.safetensors holds the weights with the model's config, the
tokenizer and the run's record in its metadata, written under a temporary name and renamed into
place: a folder holds a whole checkpoint or none. Training keeps its optimizer state beside it
(optimizer-<step>.pt, torch.save, written first) for --resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import elva
from data import (INSTRUCTIONS, PROMPT, SPECIAL_TOKENS, BadInput, Instances, Item, MissingInput,
                  Pairs, Query, Source, render)


# ----------------------------------------------------------------------------------------
# The tokenizer: byte-level BPE on the run's text (data.world_corpus, or M-BEIR's)


def train_tokenizer(lines: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"tokenizer file {path} not found; expected the tokenizer.json "
                           "saved beside a checkpoint")
    return tokenizer_from_str(path.read_text(), f"tokenizer file {path}")


def tokenizer_from_str(text: str, what: str):
    """A tokenizer from its JSON, checked for the template's special tokens."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:
        raise BadInput(f"{what} is not a valid tokenizers JSON file: {e}") from e
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise BadInput(f"{what} lacks the special tokens {missing}")
    return tok


# ----------------------------------------------------------------------------------------
# Images and the template (Section 3.4), left-padded so that every prompt ends in one column:
# [PAD]* [BOS] USER: [IMG]*n <instruction> <text>. Analyze and summarize ... ASSISTANT: <summary>
# [RET] [PAD]*


def image_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> float tensor (3, H, W) in [-1, 1], resized to the model's input size."""
    if 0 in img.size:
        raise BadInput(f"an image of {img.size[0]}x{img.size[1]} pixels; expected one with pixels")
    if img.size != (image_size, image_size):
        img = img.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    # (3, H, W)
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1.0


def load_image(item: Item, image_size: int) -> torch.Tensor:
    """An item's image as a (3, H, W) tensor: a render of its scene, its PIL image, or its file
    on disk."""
    if item.scene is not None:
        return image_tensor(render(item.scene, image_size, item.render_seed), image_size)
    if item.image is not None:
        return image_tensor(item.image, image_size)
    try:
        with Image.open(item.image_path) as img:
            return image_tensor(img, image_size)
    except (OSError, ValueError) as e:
        raise BadInput(f"image {item.image_path} could not be read ({e}); expected an image "
                       "file Pillow can open") from e


class Encoder:
    """Items -> token ids with a trained tokenizer; caches the template's constant pieces."""

    def __init__(self, tok, n_img_tokens: int, image_size: int):
        self.tok, self.n_img_tokens, self.image_size = tok, n_img_tokens, image_size
        ids = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
        self.pad, self.bos, self.eos, self.img, self.ret = ids
        self._user = self._ids("USER:")
        self._tail = self._ids(" " + PROMPT + " ASSISTANT:")

    def _ids(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False).ids

    def prompt(self, item: Item, instruction: str | None, limit: int | None = None) -> list[int]:
        """The prompt's token ids. With `limit`, the instruction + text part is cut so the prompt
        has at most `limit` tokens (the template's fixed parts and the image are kept whole)."""
        if not item.has_image and not item.text.strip():
            raise BadInput("empty query: an item needs a text or an image")
        words = " ".join(w for w in (instruction, item.text.strip()) if w)
        mid = self._ids(" " + words + ".") if words else []
        head = [self.bos, *self._user, *([self.img] * self.n_img_tokens if item.has_image else [])]
        if limit is not None and len(head) + len(mid) + len(self._tail) > limit:
            mid = mid[:max(0, limit - len(head) - len(self._tail))]
        return [*head, *mid, *self._tail]

    def too_long(self, item: Item, instruction: str | None, cfg) -> bool:
        return len(self.prompt(item, instruction)) > cfg.max_seq_len - cfg.max_summary_len - 1

    def summary(self, text: str) -> list[int]:
        """A reference summary's ids; an empty one is no tokens ([RET] right after the prompt)."""
        return self._ids(" " + text) if text.strip() else []

    def reference_summaries(self, items: list[Item], drop: list[bool]) -> list[list[int]]:
        """Each item's reference summary ids, or none where summary dropout drops it (stages 1
        and 2)."""
        return [[] if d else self.summary(it.summary) for it, d in zip(items, drop)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad, self.ret)]).strip()

    def images(self, items: list[Item]) -> torch.Tensor:
        """(N_img, 3, H, W) for the items that carry an image, in order."""
        imgs = [load_image(it, self.image_size) for it in items if it.has_image]
        if not imgs:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack(imgs)


def collate(prompts: list[list[int]], summaries: list[list[int]] | None, pad_id: int,
            ret_id: int) -> dict:
    """Left-pad prompts, append summary + [RET], right-pad -> tokens (B, T), attn (B, T) (False
    on padding), gen_mask (B, T) (the summary and [RET]: what the model writes, where the LM
    and RL losses live), ret_pos (B,) (-1 without summaries)."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    S = max(len(s) + 1 for s in summaries) if summaries is not None else 0
    tokens = torch.full((B, P + S), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + S, dtype=torch.bool)
    gen_mask = torch.zeros(B, P + S, dtype=torch.bool)
    ret_pos = torch.full((B,), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):P] = torch.tensor(p)
        attn[b, P - len(p):P] = True
        if summaries is not None:
            s = list(summaries[b]) + [ret_id]
            tokens[b, P:P + len(s)] = torch.tensor(s)
            attn[b, P:P + len(s)] = True
            gen_mask[b, P:P + len(s)] = True
            ret_pos[b] = P + len(s) - 1
    return {"tokens": tokens, "attn": attn, "gen_mask": gen_mask, "ret_pos": ret_pos}


def encode_batch(enc: Encoder, items: list[Item], instructions: list,
                 summaries: list[list[int]] | None,
                 limit: int | None = None) -> tuple[dict, torch.Tensor]:
    """Items -> (collated token tensors, images (N_img, 3, H, W)) on the CPU: everything a step
    needs that involves no model (rendering, tokenising, padding), so that DataLoader workers can
    make it ahead of the step."""
    prompts = [enc.prompt(it, ins, limit) for it, ins in zip(items, instructions)]
    return collate(prompts, summaries, enc.pad, enc.ret), enc.images(items)


def encode_pairs(enc: Encoder, limit: int, pairs: Pairs) -> Pairs:
    """A stage-1/2 batch (a process's share) with its tensors made: the reference summaries
    teacher-forced, none where summary dropout drops them."""
    items = pairs.items
    summaries = enc.reference_summaries(items, pairs.drop)
    return replace(pairs, encoded=encode_batch(enc, items, pairs.instructions, summaries, limit))


def instruction_of(q: Query) -> str:
    """A query's instruction: its own (real data) or its task's (GrainWorld)."""
    return q.instruction if q.instruction is not None else INSTRUCTIONS[q.task]


def rollout_items(batch) -> tuple[list, list]:
    """The items of an RL batch [(Query, [negative Items])], each once, in (instance, item) order --
    query, positive, negatives -- and their instructions: the query's, candidates none (as in
    M-BEIR's pools)."""
    items, instr = [], []
    for q, negs in batch:
        items += [q.item, q.positive, *negs]
        instr += [instruction_of(q)] + [None] * (1 + len(negs))
    return items, instr


def encode_rollout(enc: Encoder, limit: int, batch) -> Instances:
    """A stage-3 step's share of instances -> Instances: their items' prompts, no summaries."""
    prompts, images = encode_batch(enc, *rollout_items(batch), None, limit)
    return Instances(batch, prompts, images)


# ----------------------------------------------------------------------------------------
# Retriever: model + encoder. Items in, embeddings out, with summaries generated (eval, RL) or
# given (teacher forcing).


class Retriever:
    """A model and its tokenizer: items in, embeddings out, with summaries generated
    (evaluation, RL) or given (teacher forcing); the API of CLIP and sentence-transformers
    (encode_text, encode_image, encode, search, from_pretrained, save_pretrained)."""

    def __init__(self, model: elva.ELVAModel, tok, meta: dict | None = None):
        self.model, self.tok, self.meta = model, tok, meta or {}
        self.enc = Encoder(tok, model.cfg.n_img_tokens, model.cfg.image_size)

    @classmethod
    def from_pretrained(cls, folder, device=None) -> "Retriever":
        """A checkpoint folder -> a Retriever in eval mode, on `device` (None: the GPU when there
        is one)."""
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise data.BadInput(f"from_pretrained: device {device!r}: torch sees no CUDA GPU here "
                                f"(device='cpu', or None for the best there is)")
        model, tok, meta = load_checkpoint(folder, device)
        return cls(model.eval(), tok, meta)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def batch(self, items, instructions, summaries: list[list[int]] | None):
        """Encode items (+ per-item instruction or None) and optional summary ids -> (batch dict,
        images) on device. Prompts longer than the model's maximum length (minus room for the
        summary) are cut; see Encoder.prompt."""
        encoded = encode_batch(self.enc, items, instructions, summaries, self.prompt_limit)
        return self.on_device(*encoded)

    def on_device(self, b: dict, imgs: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """An encoded batch (data.encode_batch / data.collate, made on the CPU) -> on the model's
        device."""
        dev = self.device
        b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        return b, imgs.to(dev, non_blocking=True)

    @property
    def prompt_limit(self) -> int:
        return self.model.cfg.max_seq_len - self.model.cfg.max_summary_len - 1

    @torch.no_grad()
    def summarise(self, items, instructions, temperature=0.0, generator=None, return_ended=False):
        b, imgs = self.batch(items, instructions, None)
        return self.model.generate(b["tokens"], b["attn"], imgs, temperature=temperature,
                                   generator=generator, return_ended=return_ended)

    @torch.no_grad()
    def embed_items(self, items, instructions, batch_size: int = 256, autocast=None,
                    workers: int | None = None, progress: str | None = None):
        """Greedy summaries, then embeddings (N, D) and the decoded summaries. Per chunk: the
        prompts and images made (in DataLoader workers beside a GPU), the summaries generated,
        one teacher-forced pass for [RET]. progress: a label for a line every 10 s."""
        chunks = _PromptChunks(self.enc, items, instructions, batch_size, self.prompt_limit)
        n_workers = workers if workers is not None else 0 if self.device.type == "cpu" else 4
        loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=n_workers,
                                             pin_memory=self.device.type == "cuda")
        embs, texts = [], []
        pad_ret = self.enc.pad, self.enc.ret
        t0 = last = time.time()
        for prompts, imgs in loader:
            if progress and time.time() - last >= 10:   # a long phase says how far it is (10 s)
                last, done = time.time(), len(texts)
                rate = done / (last - t0)
                print(f"{progress}: {done}/{len(items)} items, {rate:.0f} items/s, eta "
                      f"{(len(items) - done) / max(rate, 1e-9):.0f} s", flush=True)
            with autocast or nullcontext():
                pb, imgs = self.on_device(collate(prompts, None, *pad_ret), imgs)
                summ = self.model.generate(pb["tokens"], pb["attn"], imgs)
                b, _ = self.on_device(collate(prompts, summ, *pad_ret), imgs)
                embs.append(self.model.embed(b, imgs).float())
            texts += [self.enc.decode(s) for s in summ]
        return torch.cat(embs), texts

    @torch.no_grad()
    def embed_given(self, items, instructions, summaries, autocast=None, temperature: float = 1.0,
                    chunk: int = 256):
        """Items with the given summaries (str or token ids) teacher-forced, no generation ->
        (embeddings (N, D), log p(summary, then [RET] | prompt) at `temperature` (N,) float64)."""
        embs, lps = [], []
        for i in range(0, len(items), chunk):
            summ = [self.enc.summary(s) if isinstance(s, str) else s
                    for s in summaries[i:i + chunk]]
            with autocast or nullcontext():
                b, imgs = self.batch(items[i:i + chunk], instructions[i:i + chunk], summ)
                logp, h = self.model.token_logprobs(b, imgs, temperature)
            embs.append(self.model.ret_embedding(h, b["ret_pos"]))
            lps.append(logp.double().sum(1))
        return torch.cat(embs), torch.cat(lps)

    # -- the public API ----------------------------------------------------------------------------
    def encode(self, texts=None, images=None, instruction: str | None = None, batch_size: int = 256,
               return_summaries: bool = False, convert_to_numpy: bool = False):
        """Texts, images, or both (image i with text i: a composed query) -> unit embeddings,
        each from a generated summary and [RET]: (D,) for one input, (N, D) for a list. Texts
        longer than the model reads are cut (said). return_summaries: also the summaries."""
        single = isinstance(texts, str) or _is_image(images)
        texts = [texts] if isinstance(texts, str) else texts
        images = [images] if _is_image(images) else images
        if texts is None and images is None:
            raise ValueError("encode: give texts=, images= or both")
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"encode: instruction is a {type(instruction).__name__}; expected a "
                            f"str or None")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"encode: batch_size {batch_size!r}; expected an integer >= 1")
        for name, xs in (("texts", texts), ("images", images)):
            if xs is not None and not isinstance(xs, (list, tuple)):
                one = "str" if name == "texts" else "PIL image, a path"
                raise TypeError(f"encode: {name} must be a {one} or a list of them, got "
                                f"{type(xs).__name__}")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"encode: {len(texts)} texts and {len(images)} images; a composed "
                             f"query pairs text i with image i, so give as many of each")
        n = len(texts if texts is not None else images)
        items = []
        for i in range(n):
            t = texts[i] if texts is not None else ""
            if not isinstance(t, str):
                raise TypeError(f"encode: text {i} is a {type(t).__name__}; expected a str")
            im = images[i] if images is not None else None
            if im is None and not t.strip():
                raise ValueError(f"encode: text {i} is blank; expected some words (or an image)")
            items.append(data.Item(text=t.strip(), **_image_field(im, i)))
        if n == 0:
            e, summ = torch.zeros(0, self.model.cfg.d_model, device=self.device), []
        else:
            n_cut = sum(self.enc.too_long(it, instruction, self.model.cfg) for it in items)
            if n_cut:
                print(f"encode: {n_cut} of {n} texts were cut to the model's maximum length")
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                        if self.device.type == "cuda" else None)
            e, summ = self.embed_items(items, [instruction] * n, batch_size, autocast=autocast,
                                       progress="encode")
        out = (e[0], summ[0]) if single else (e, summ)
        if convert_to_numpy:
            out = (out[0].cpu().numpy(), out[1])
        return out if return_summaries else out[0]

    def encode_text(self, texts, instruction: str | None = None, **kw):
        """A str (-> (D,)) or a list of str (-> (N, D)); see encode."""
        return self.encode(texts=texts, instruction=instruction, **kw)

    def encode_image(self, images, instruction: str | None = None, **kw):
        """A PIL image or a path (-> (D,)), or a list of them (-> (N, D)); see encode."""
        return self.encode(images=images, instruction=instruction, **kw)

    def save_pretrained(self, folder):
        """Write the model and tokenizer as a checkpoint folder that from_pretrained reads back:
        into a new or empty folder only (a training checkpoint folder keeps its optimizer state)."""
        if Path(folder).exists() and any(Path(folder).iterdir()):
            raise data.BadInput(f"save_pretrained: {folder} is not empty; expected a new or empty "
                                f"folder (a checkpoint there would lose its other files)")
        kept = {k: v for k, v in self.meta.items() if k != "optimizer"}
        save_checkpoint(folder, self.model, self.tok, kept)

    @staticmethod
    def search(query_embeddings, corpus_embeddings, k: int = 10, chunk: int = 65536,
               as_hits: bool = False):
        """Each query's k highest-cosine corpus items, best first, by the reward's tie rule;
        tensors or numpy in and out -> (scores, indices) (Q, k); as_hits: a list per query of
        {"corpus_id", "score"} (semantic_search's form). The corpus is streamed in chunks."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"search: k {k!r}; expected an integer >= 1")
        as_numpy = not isinstance(query_embeddings, torch.Tensor)
        q, c = torch.as_tensor(query_embeddings), torch.as_tensor(corpus_embeddings)
        q = q[None] if q.dim() == 1 else q
        scores, idx = ranked_top_k(q, c.to(q.device), k, chunk=chunk)
        if as_hits:
            return [[{"corpus_id": j, "score": v} for j, v in zip(ri, rs)]
                    for ri, rs in zip(idx.tolist(), scores.tolist())]
        return (scores.cpu().numpy(), idx.cpu().numpy()) if as_numpy else (scores, idx)


def _is_image(x) -> bool:
    """A single image input: a PIL image or a path (a str that names a file is a path only for
    images=)."""
    return hasattr(x, "convert") or isinstance(x, (str, os.PathLike))


def _image_field(im, i: int) -> dict:
    """An encode() image -> the Item field that carries it, checked before any work."""
    if im is None:
        return {}
    if hasattr(im, "convert"):
        return {"image": im}
    if isinstance(im, (str, os.PathLike)):
        if not Path(im).is_file():
            raise FileNotFoundError(f"encode: image {i} {str(im)!r} is not a file; expected an "
                                    f"image Pillow can open")
        return {"image_path": str(im)}
    raise TypeError(f"encode: image {i} is a {type(im).__name__}; expected a PIL image or a path")


def ranked_top_k(q: torch.Tensor, corpus: torch.Tensor, k: int, positives=None, chunk: int = 65536):
    """The top k of each query by cosine, streamed in chunks, ranked by the reward's tie rule
    (a NaN last; among equal scores a relevant item -- positives (Q, P_max), -1 pads -- after
    the others, the rest in corpus order) -> (scores, indices) (Q, min(k, N))."""
    qn = F.normalize(q.float(), dim=-1)
    Q, dev = q.shape[0], q.device
    best_s = torch.empty(Q, 0, device=dev)
    best_i = torch.empty(Q, 0, dtype=torch.long, device=dev)
    pos = None
    if positives is not None:
        pos = torch.as_tensor(positives, dtype=torch.long, device=dev).reshape(Q, -1)   # (Q, P_max)
    for n0 in range(0, corpus.shape[0], chunk):
        c = F.normalize(corpus[n0:n0 + chunk].float(), dim=-1)
        s = torch.cat([best_s, qn @ c.T], 1)                     # (Q, k + chunk): best so far first
        i = torch.cat([best_i, torch.arange(n0, n0 + c.shape[0], device=dev).expand(Q, -1)], 1)
        if pos is not None:   # relevant items first sorted to the back, so that the stable sort
            # below keeps them after every equal-scoring other
            rel = torch.zeros(Q, c.shape[0], dtype=torch.bool, device=dev)
            m = (pos >= n0) & (pos < n0 + c.shape[0])
            rel[m.nonzero()[:, 0], pos[m] - n0] = True
            rel = torch.cat([(best_i[:, :, None] == pos[:, None, :]).any(-1), rel], 1)
            order = rel.to(torch.int8).argsort(dim=1, stable=True)
            s, i = s.gather(1, order), i.gather(1, order)
        key = torch.nan_to_num(s, nan=float("-inf"))
        order = key.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
    return best_s, best_i


# ----------------------------------------------------------------------------------------
# Ranks and their metrics, by the same rule (a NaN ranks last; a candidate equal to the positive
# ranks above it, so a collapsed model scores nothing)


def ranks_of_best_positive(eq: torch.Tensor, ep: torch.Tensor,
                           positives: torch.Tensor) -> torch.Tensor:
    """eq (Q, D), ep (P, D), positives (Q, P_max) int64 relevant pool indices (-1 pads) -> rank
    (Q,) of each query's best-scoring relevant candidate among the non-relevant ones (pessimistic
    ties; NaN ranks last), streamed."""
    from kernels import corpus_ranks   # Triton is imported on first use, not with the API
    return corpus_ranks(eq, ep, positives.to(eq.device)).cpu()


def chance_recall(n_relevant: torch.Tensor, pool: int, k: int) -> float:
    """Expected Recall@K of a random ranking: 1 - C(P - r, K) / C(P, K), averaged over queries
    with r relevant."""
    hits = [1.0 - math.comb(pool - int(r), k) / math.comb(pool, k) for r in n_relevant.tolist()]
    return sum(hits) / len(n_relevant)


def n_nonfinite(*embeddings: torch.Tensor) -> int:
    return int(sum((~torch.isfinite(e).all(-1)).sum() for e in embeddings))


def recall_mrr(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@K and MRR from each query's rank (inf: no relevant candidate, a miss: 0 to both)."""
    out = {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
    out["MRR"] = (1.0 / ranks.float()).mean().item()
    return out


def ndcg_at_k(top: torch.Tensor, positives: list[list[int]], k: int = 10) -> float:
    """Mean NDCG@k, binary relevance: top (Q, >= k) pool indices best first (by ranked_top_k
    with the positives, so that a collapsed model earns nothing); DCG = sum_i rel_i / log2(i +
    1) over the top k; a query with no positive in the pool scores 0."""
    total = 0.0
    for row, pos in zip(top.tolist(), positives):
        ps = set(pos)
        dcg = sum(1.0 / math.log2(i + 2) for i, j in enumerate(row[:k]) if j in ps)
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(ps), k)))
        total += dcg / idcg if idcg else 0.0
    return total / max(1, len(positives))


# ----------------------------------------------------------------------------------------
# Balanced negative sampling (ELVA, Section 3.4): stage 3's negatives, mined by the stage-2 model


def balanced_negatives(scores: torch.Tensor, is_relevant: torch.Tensor, n_hard: int, n_rand: int,
                       threshold: float, generator: torch.Generator) -> torch.Tensor:
    """scores [Q, P] (the stage-2 model's cosines), is_relevant [Q, P] -> negatives [Q, n_hard +
    n_rand]: the top n_hard below `threshold` (the paper's filter of likely false negatives;
    those above only fill empty slots), then n_rand at random among the rest. Hard ones alone
    make a group's rewards alike and GRPO's advantages vanish (the paper's reason)."""
    Q, P = scores.shape
    if (~is_relevant).sum(1).min() < n_hard + n_rand:
        raise ValueError("balanced_negatives: a query has fewer than n_hard + n_rand = "
                         f"{n_hard + n_rand} non-relevant candidates in a pool of {P}; enlarge "
                         "the pool or lower the counts")
    # hard: the top of the below-threshold candidates; above-threshold ones only fill slots that
    # would stay empty (a barely trained model may score almost everything above the threshold)
    key = torch.where(scores <= threshold, scores, scores - 1e3).masked_fill(is_relevant,
                                                                             float("-inf"))
    # (Q, n_hard)
    hard = key.topk(n_hard, dim=1).indices if n_hard else torch.empty(Q, 0, dtype=torch.long)
    rest = ~is_relevant.clone()
    rest.scatter_(1, hard, False)
    noise = torch.rand(Q, P, generator=generator).masked_fill(~rest, -1.0)
    # (Q, n_rand)
    rand = noise.topk(n_rand, dim=1).indices if n_rand else torch.empty(Q, 0, dtype=torch.long)
    return torch.cat([hard, rand], dim=1)


def mine_negatives(retriever, queries: list[Item], instructions: list, pool: list[Item],
                   is_relevant: torch.Tensor,
                   n_hard: int, n_rand: int, threshold: float, generator: torch.Generator, autocast,
                   listed: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's negative sampling by the stage-2 model's cosines (balanced_negatives) -> [Q,
    n_hard + n_rand] pool indices. listed [Q, P]: the data's own hard negatives (M-BEIR's
    neg_cand_list), scored at the threshold: above every mined one."""
    t0 = time.time()
    eq, _ = retriever.embed_items(queries, instructions, autocast=autocast(),
                                  progress="mining: queries")
    ep, _ = retriever.embed_items(pool, [None] * len(pool), autocast=autocast(),
                                  progress="mining: pool")
    print(f"mining: {len(queries)} queries x {len(pool)} candidates embedded in "
          f"{time.time() - t0:.0f}s", flush=True)
    scores = (eq @ ep.T).cpu()                                              # (Q, P) stage-2 cosines
    if listed is not None:
        scores = torch.where(listed, torch.full_like(scores, threshold), scores)
    return balanced_negatives(scores, is_relevant, n_hard, n_rand, threshold, generator)


def mine_instances(args, source: Source, ref: Retriever, autocast) -> list:
    """The RL instances: each of the source's queries with n_hard filtered hard + n_rand random
    negatives, mined by the stage-2 model from its task's pool -> [(Query, [negative Items])]."""
    gen = torch.Generator().manual_seed(args.seed)
    instances = []
    for queries, pool, relevant, listed in source.rl_candidates(args, source.data):
        neg = mine_negatives(ref, [q.item for q in queries], [instruction_of(q) for q in queries],
                             pool, relevant, args.n_hard, args.n_rand, args.hard_threshold, gen,
                             autocast, listed)                                  # (Q, N) pool ids
        instances += [(q, [pool[i] for i in idx]) for q, idx in zip(queries, neg.tolist())]
    return instances


# ----------------------------------------------------------------------------------------
# Embedding in chunks


class _PromptChunks(torch.utils.data.Dataset):
    """Chunk k of the items -> (their prompts' token ids, their images (N_img, 3, H, W)): what
    embedding a chunk needs before the model, made by DataLoader workers when there are any."""

    def __init__(self, enc, items, instructions, batch_size: int, limit: int):
        self.enc, self.items, self.instructions = enc, items, instructions
        self.bs, self.limit = batch_size, limit

    def __len__(self):
        return (len(self.items) + self.bs - 1) // self.bs

    def __getitem__(self, k):
        rows = slice(k * self.bs, (k + 1) * self.bs)
        its, ins = self.items[rows], self.instructions[rows]
        return [self.enc.prompt(it, i, self.limit) for it, i in zip(its, ins)], self.enc.images(its)


# ----------------------------------------------------------------------------------------
# Checkpoints


FORMAT = "elva-checkpoint/2"


def atomic_write(path: Path, write):
    """write(tmp), then rename tmp over path: atomic on POSIX, so a crash leaves the old file or
    the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_log(path: Path) -> list[tuple[str, dict]]:
    """A log.jsonl's (line, record) pairs; a last line cut short (a power loss) is dropped with a
    warning, a bad line elsewhere is named."""
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise BadInput(f"{path}:{n}: not a JSON record ({e.msg}); expected the log "
                                    f"train.py writes, one record per line") from e
            print(f"warning: {path}: its last line is cut short (a write was interrupted); "
                  f"dropping it")
    return out


def log_records(folder) -> list[dict]:
    return [rec for _, rec in read_log(Path(folder) / "log.jsonl")]


def write_json(path, obj):
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2)))


def save_checkpoint(folder, model, tok, meta: dict, optimizer=None):
    """optimizer-<step>.pt first (when given), then model.safetensors -- the commit point: its
    metadata names the optimizer file -- then the older optimizer files go."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != "optimizer"}
    if optimizer is not None:
        meta["optimizer"] = f"optimizer-{meta.get('step', 0):06d}.pt"
        atomic_write(folder / meta["optimizer"], lambda p: torch.save(optimizer.state_dict(), p))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)),
              "tokenizer": tok.to_str(), "meta": json.dumps(meta)}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p), header))
    for old in folder.glob("optimizer-*.pt"):
        if old.name != meta.get("optimizer"):
            old.unlink()


def read_checkpoint(folder) -> tuple[dict, dict, object, dict]:
    """-> (weights, model config, tokenizer, the run's record), each checked, or one line saying
    what is wrong with the folder."""
    from safetensors import safe_open
    folder = Path(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        if (folder / "config.json").is_file():
            return read_old_layout(folder)
        what = "no model.safetensors" if folder.is_dir() else "no such folder"
        raise data.MissingInput(f"checkpoint {folder}: {what}; expected a checkpoint folder "
                                f"written by train.py")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != FORMAT:
            raise ValueError(f"its metadata says format {header.get('format')!r}, not {FORMAT!r}")
        cfg, meta = json.loads(header["config"]), json.loads(header["meta"])
        tok = tokenizer_from_str(header["tokenizer"], f"{path}'s tokenizer")
    except data.BadInput:
        raise
    except Exception as e:
        raise data.BadInput(f"checkpoint {folder}: model.safetensors is damaged or not a "
                            f"checkpoint of train.py ({type(e).__name__}: {e})") from e
    return state, cfg, tok, meta


def read_old_layout(folder: Path):
    """A checkpoint of the layout before model.safetensors held everything (config.json naming
    model-<step>.safetensors, tokenizer.json beside them): read as written."""
    from safetensors.torch import load_file
    try:
        old = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / old["files"]["model"]["name"]))
    except Exception as e:
        raise data.BadInput(f"checkpoint {folder}: config.json names no readable model file "
                            f"({type(e).__name__}: {e}); expected a checkpoint of train.py") from e
    tok = load_tokenizer(folder / "tokenizer.json")
    meta = {k: v for k, v in old.items() if k not in ("files", "model")}
    return state, old["model"], tok, meta


def load_checkpoint(folder, device="cpu"):
    """-> (model, tokenizer, the run's record). One line for a missing or damaged folder, or a
    config that does not match the weights."""
    state, cfg, tok, meta = read_checkpoint(folder)
    try:
        cfg = elva.ModelConfig(**cfg)
        cfg.validate()
        model = elva.build_model(cfg, tok)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[:600]
        raise data.BadInput(f"checkpoint {folder}: the weights do not match the config saved "
                            f"with them ({detail})") from e
    return model.to(device), tok, meta
