"""
GrainWorld: a synthetic multi-grain image/text world where every grain is exact, and the stages'
batches made from it.

    python data.py          # draws a few scenes to grainworld_samples.png and prints their captions

Why a synthetic world (ELVA, Section 3.2, Definition 2): the paper's claim is that InfoNCE with
random negatives leaves secondary grains (attributes, bindings, relations) under-trained. Here the
generator knows every grain, so relevance ("does this image satisfy every grain the query
states?") is a rule. A scene holds 1-3 objects on a 3x3 grid; an object's grains are its shape
(the entity), colour and size (attributes) and cell; between objects, spatial relations (this
world's stand-in for the paper's "action"). Random negatives almost never differ from a positive
in only which colour sits on which shape: the bag-of-words failure ARO / SugarCrepe report for
CLIP-style models. MRBench-mini's near misses test exactly that. Real data: mbeir.py.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from PIL import Image, ImageDraw


class BadInput(ValueError):
    """An input (file, record, flag, argument) that is not what was expected: the
    command lines print its message as one line (a traceback is for bugs)."""


class MissingInput(BadInput, FileNotFoundError):
    """An input file or folder that is not there."""

# ----------------------------------------------------------------------------------------
# The world's vocabulary. Eight colours and five shapes make one-grain differences common enough to
# mine and rare enough that a random negative almost never is one.

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (230, 205, 35),
    "purple": (145, 55, 190), "orange": (240, 135, 30), "cyan": (40, 200, 210),
    "white": (250, 250, 250),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
RELATIONS = ("left of", "right of", "above", "below")
RELATION_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# The paper's template (ELVA, Section 3.4, generative embeddings)
PROMPT = ("Analyze and summarize the key information of the above input. "
          "Finally, append the special token [RET] to represent the entire input.")
# the template's words, in every tokenizer's training text
TEMPLATE_TEXT = (PROMPT, "USER:", "ASSISTANT:")
# one instruction per task, M-BEIR style; candidates get none (as in M-BEIR's pools)
INSTRUCTIONS = {
    "t2i": "Retrieve an image that matches the given caption:",
    "i2t": "Find a caption that describes the given image.",
    "i2i": "Find another picture of the same scene.",
    "it2i": "Retrieve the image after this edit:",
}
TASKS = tuple(INSTRUCTIONS)
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[IMG]", "[RET]"]


# ----------------------------------------------------------------------------------------
# Scenes and captions

@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted by (col, row): the canonical order used by summaries

    @staticmethod
    def of(objs) -> "Scene":
        objs = tuple(sorted(objs, key=lambda o: (o.col, o.row)))
        cells = {(o.row, o.col) for o in objs}
        kinds = {(o.color, o.shape) for o in objs}
        if len(cells) != len(objs) or len(kinds) != len(objs):
            raise ValueError(f"invalid scene {objs}: objects need distinct cells and distinct "
                             "(colour, shape)")
        return Scene(objs)

    def summary(self) -> str:
        """The reference summary of an image: every grain, objects in canonical order."""
        return " ; ".join(f"{o.words()} {ROWS[o.row]} {COLS[o.col]}" for o in self.objects)


@dataclass(frozen=True)
class Mention:
    shape: str
    color: str | None = None  # None: the caption does not state this grain
    size: str | None = None

    def words(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape) if w)

    def matches(self, o: Obj) -> bool:
        return (o.shape == self.shape and (self.color is None or o.color == self.color)
                and (self.size is None or o.size == self.size))


@dataclass(frozen=True)
class Caption:
    mentions: tuple[Mention, ...]            # 1 or 2 objects
    relation: str | None = None              # between mentions[0] and mentions[1], or None ("and")

    def text(self) -> str:
        a = f"a {self.mentions[0].words()}"
        if len(self.mentions) == 1:
            return a
        return f"{a} {self.relation or 'and'} a {self.mentions[1].words()}"

    def summary(self) -> str:
        """The reference summary of a text: its grains restated without articles."""
        if len(self.mentions) == 1:
            return self.mentions[0].words()
        return f"{self.mentions[0].words()} {self.relation or 'and'} {self.mentions[1].words()}"

    def n_grains(self) -> int:
        """Entities, attributes and relations the caption states (ELVA, Section 3.2: a query is a
        set of grains)."""
        n = sum(1 + (m.color is not None) + (m.size is not None) for m in self.mentions)
        return n + (self.relation is not None)


def holds(rel: str, a: Obj, b: Obj) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[rel]


def assignments(scene: Scene, cap: Caption) -> list[tuple[Obj, ...]]:
    """Every injective assignment of the caption's mentions to the scene's objects that matches
    every stated grain."""
    objs = scene.objects
    if len(cap.mentions) == 1:
        return [(o,) for o in objs if cap.mentions[0].matches(o)]
    m0, m1 = cap.mentions
    return [(a, b) for a in objs for b in objs
            if a != b and m0.matches(a) and m1.matches(b)
            and (cap.relation is None or holds(cap.relation, a, b))]


def satisfies(scene: Scene, cap: Caption) -> bool:
    """Exact relevance: the scene satisfies every grain the caption states."""
    return bool(assignments(scene, cap))


# ----------------------------------------------------------------------------------------
# Random scenes and captions

def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    # mostly 3 objects: a binding needs company to be ambiguous
    n = n_objects or rng.choice((2, 3, 3))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    return Scene.of(Obj(s, c, rng.choice(SIZES), r, col) for (c, s), (r, col) in zip(kinds, cells))


def _relation_between(rng: random.Random, a: Obj, b: Obj) -> str | None:
    true = [r for r in RELATIONS if holds(r, a, b)]
    return rng.choice(true) if true else None


def random_caption(rng: random.Random, scene: Scene) -> Caption:
    """A reference caption as real captions are: a random subset of grains, always true of the
    scene: one object (1-3 grains), two joined by "and" (binding), two with a relation."""
    kind = rng.choice(("one", "and", "rel", "rel")) if len(scene.objects) > 1 else "one"
    if kind == "one":
        o = rng.choice(scene.objects)
        color, size = rng.choice((o.color, None)), rng.choice((o.size, None, None))
        return Caption((Mention(o.shape, color, size),))
    a, b = rng.sample(scene.objects, 2)
    rel = _relation_between(rng, a, b) if kind == "rel" else None
    # both objects keep their colour, so that the caption binds colours to shapes
    ma = Mention(a.shape, a.color, rng.choice((a.size, None, None)))
    mb = Mention(b.shape, b.color, rng.choice((b.size, None, None)))
    return Caption((ma, mb), rel)


def full_caption(rng: random.Random, scene: Scene) -> Caption:
    """A caption stating every grain of two objects and their relation (the i2t candidates)."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        return Caption((Mention(o.shape, o.color, o.size),))
    a, b = rng.sample(scene.objects, 2)
    return Caption((Mention(a.shape, a.color, a.size), Mention(b.shape, b.color, b.size)),
                   _relation_between(rng, a, b))


# ----------------------------------------------------------------------------------------
# One-grain edits: the near misses. Each returns None when the edit is impossible for this input.

def _replace(objs, i, **kw):
    objs = list(objs)
    objs[i] = Obj(**{**objs[i].__dict__, **kw})
    return objs


def _try_scene(objs) -> Scene | None:
    try:
        return Scene.of(objs)
    except ValueError:
        return None


def scene_edit(rng: random.Random, scene: Scene, kind: str,
               pair: tuple[Obj, Obj] | None = None) -> Scene | None:
    """A scene one grain away: 'attribute' (one colour, size or shape changes; 'color', 'size' or
    'shape' names which), 'position' (one object moves to an empty cell), 'binding' (two objects
    swap colours), 'relation' (two objects swap places). `pair` picks the two objects (default:
    two at random)."""
    objs = list(scene.objects)
    if kind in ("attribute", "color", "size", "shape"):
        i = rng.randrange(len(objs))
        which = rng.choice(("color", "size", "shape")) if kind == "attribute" else kind
        pool = {"color": list(COLORS), "size": list(SIZES), "shape": list(SHAPES)}[which]
        new = rng.choice([v for v in pool if v != getattr(objs[i], which)])
        return _try_scene(_replace(objs, i, **{which: new}))
    if kind == "position":
        i = rng.randrange(len(objs))
        taken = {(o.row, o.col) for o in objs}
        empty = sorted({(r, c) for r in range(3) for c in range(3)} - taken)
        row, col = rng.choice(empty)
        return _try_scene(_replace(objs, i, row=row, col=col))
    if len(objs) < 2:
        return None
    i, j = (objs.index(pair[0]), objs.index(pair[1])) if pair else rng.sample(range(len(objs)), 2)
    a, b = objs[i], objs[j]
    if kind == "binding":
        if a.color == b.color:
            return None
        return _try_scene(_replace(_replace(objs, i, color=b.color), j, color=a.color))
    if kind == "relation":
        moved = _replace(objs, i, row=b.row, col=b.col)
        return _try_scene(_replace(moved, j, row=a.row, col=a.col))
    raise ValueError(f"unknown edit kind {kind!r}; expected attribute, color, size, shape, "
                     "position, binding or relation")


def edit_neighbours(scene: Scene) -> set[Scene]:
    """Every scene one scene_edit away: each attribute of each object changed, each pair's
    colours or places swapped."""
    objs, out = list(scene.objects), set()
    for i, o in enumerate(objs):
        for which, values in (("color", COLORS), ("size", SIZES), ("shape", SHAPES)):
            out |= {_try_scene(_replace(objs, i, **{which: v}))
                    for v in values if v != getattr(o, which)}
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            out.add(_try_scene(_replace(_replace(objs, i, color=b.color), j, color=a.color)))
            moved = _replace(objs, i, row=b.row, col=b.col)
            out.add(_try_scene(_replace(moved, j, row=a.row, col=a.col)))
    return out - {None, scene}


def caption_edit(rng: random.Random, cap: Caption, kind: str) -> Caption | None:
    """A caption one grain away, with the same three kinds as scene_edit."""
    ms = list(cap.mentions)
    if kind == "attribute":
        i = rng.randrange(len(ms))
        m = ms[i]
        which = rng.choice([w for w in ("color", "size", "shape")
                            if w == "shape" or getattr(m, w) is not None])
        pool = {"color": list(COLORS), "size": list(SIZES), "shape": list(SHAPES)}[which]
        value = rng.choice([v for v in pool if v != getattr(m, which)])
        ms[i] = Mention(**{**m.__dict__, which: value})
        return Caption(tuple(ms), cap.relation)
    if len(ms) < 2:
        return None
    if kind == "binding":
        a, b = ms
        if a.color is None or b.color is None or a.color == b.color:
            return None
        return Caption((Mention(a.shape, b.color, a.size), Mention(b.shape, a.color, b.size)),
                       cap.relation)
    if kind == "relation":
        return None if cap.relation is None else Caption(cap.mentions, RELATION_FLIP[cap.relation])
    raise ValueError(f"unknown edit kind {kind!r}; expected attribute, binding or relation")


def entailed_caption(rng: random.Random, cap: Caption) -> Caption | None:
    """A caption the premise `cap` entails, reworded: a subset of its grains (an attribute
    dropped, one of two objects dropped) or the same grains from the other side ("a B right of an
    A" for "an A left of a B")."""
    ms, options = cap.mentions, []
    for i, m in enumerate(ms):
        for g in ("color", "size"):
            if getattr(m, g) is not None:
                kept = list(ms)
                kept[i] = Mention(**{**m.__dict__, g: None})
                options.append(Caption(tuple(kept), cap.relation))
    if len(ms) == 2:
        options += [Caption(ms[:1]), Caption(ms[1:]),
                    Caption((ms[1], ms[0]), RELATION_FLIP[cap.relation] if cap.relation else None)]
    return rng.choice(options) if options else None


def nli_triplet(rng: random.Random, scene: Scene,
                tries: int = 10) -> tuple[Caption, Caption, Caption] | None:
    """(premise, entailed, contradiction), stage 1's NLI in miniature: a caption of the scene
    with >= 2 grains, a caption it entails, and the premise with one grain contradicted (an
    attribute, a binding, a relation) that the scene does not satisfy."""
    for _ in range(tries):
        premise = random_caption(rng, scene)
        if premise.n_grains() < 2:
            continue
        hyp = entailed_caption(rng, premise)
        contra = caption_edit(rng, premise, rng.choice(("attribute", "binding", "relation")))
        if hyp is not None and contra is not None and not satisfies(scene, contra):
            return premise, hyp, contra
    return None


@dataclass(frozen=True)
class Edit:
    """An edit instruction for the (image, text) -> image task: set one grain of one object."""
    target: Obj
    grain: str   # "color" | "size" | "shape"
    value: str

    def text(self) -> str:
        t = self.target
        if self.grain == "shape":
            return f"turn the {t.color} {t.shape} into a {self.value}"
        return f"make the {t.color} {t.shape} {self.value}"

    def apply(self, scene: Scene, on: Obj | None = None) -> Scene | None:
        """Apply to `on` (default: the named target). Applying to another object is the binding
        near miss."""
        objs = list(scene.objects)
        i = objs.index(on or self.target)
        return _try_scene(_replace(objs, i, **{self.grain: self.value}))


def random_edit(rng: random.Random, scene: Scene) -> tuple[Edit, Scene] | None:
    o = rng.choice(scene.objects)
    grain = rng.choice(("color", "color", "size", "shape"))
    pool = {"color": list(COLORS), "size": list(SIZES), "shape": list(SHAPES)}[grain]
    e = Edit(o, grain, rng.choice([v for v in pool if v != getattr(o, grain)]))
    out = e.apply(scene)
    return None if out is None else (e, out)


# ----------------------------------------------------------------------------------------
# Rendering with Pillow. Every render of a scene jitters positions and sizes and adds pixel noise,
# so that two renders of one scene differ in pixels (the image -> image task).

def render(scene: Scene, image_size: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    # dark background: white is visible
    img = Image.new("RGB", (image_size, image_size), (rng.randint(20, 60),) * 3)
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    for o in scene.objects:
        frac = (0.42 if o.size == "small" else 0.82) * rng.uniform(0.9, 1.05)
        r = cell * frac / 2
        cx = (o.col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cy = (o.row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        fill = tuple(int(np.clip(v + rng.randint(-15, 15), 0, 255)) for v in COLORS[o.color])
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif o.shape == "cross":
            w = r / 2.6
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    arr = np.asarray(img, dtype=np.int16) + np.random.default_rng(seed).integers(-8, 9,
                                                                                 img.size + (3,))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------
# Items, the four tasks and exact relevance.
# An Item is one side of a retrieval pair: optional image (a scene to render) and optional text.

@dataclass(frozen=True)
class Item:
    scene: Scene | None = None      # rendered as the image, if present
    text: str = ""                  # query / candidate text (caption or edit instruction)
    summary: str = ""               # reference summary the contrastive stage teaches
    render_seed: int = 0
    caption: Caption | None = None  # the structured caption when text is a caption (for relevance)
    target: Scene | None = None     # for edits: the scene the query asks for
    edit: Edit | None = None        # for edits: the instruction, structured
    image_path: str | None = None   # real data: an image on disk instead of a scene
    # or an image in memory (PIL)
    image: Image.Image | None = field(default=None, compare=False, hash=False)

    @property
    def has_image(self) -> bool:
        return self.scene is not None or self.image_path is not None or self.image is not None


@dataclass
class Query:
    task: str
    item: Item
    positive: Item
    n_grains: int = 0
    # (kind, item): MRBench-mini near misses
    distractors: list[tuple[str, Item]] = field(default_factory=list)
    # real data: the query's own instruction (GrainWorld: INSTRUCTIONS[task])
    instruction: str | None = None


def relevant(task: str, q: Item, c: Item) -> bool:
    """The exact relevance rule: a candidate is relevant if it satisfies every grain stated."""
    # a candidate of the wrong modality (a caption for a text->image query) is never relevant
    if task == "t2i":
        return c.scene is not None and satisfies(c.scene, q.caption)
    if task == "i2t":
        return c.caption is not None and satisfies(q.scene, c.caption)
    if task == "i2i":
        return c.scene == q.scene
    if task == "it2i":
        return c.scene == q.target
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def candidate_item(task: str, rng: random.Random, scene: Scene) -> Item:
    """A task's pool item for a scene: a full caption for i2t, a fresh render otherwise."""
    if task == "i2t":
        cap = full_caption(rng, scene)
        return Item(text=cap.text(), summary=cap.summary(), caption=cap)
    return Item(scene=scene, summary=scene.summary(), render_seed=rng.getrandbits(31))


def make_query(task: str, rng: random.Random, scene: Scene) -> Query | None:
    seed = rng.getrandbits(31)
    if task == "t2i":
        cap = random_caption(rng, scene)
        q = Item(text=cap.text(), summary=cap.summary(), caption=cap)
        return Query(task, q, candidate_item(task, rng, scene), cap.n_grains())
    if task == "i2t":
        q = Item(scene=scene, summary=scene.summary(), render_seed=seed)
        pos = candidate_item(task, rng, scene)
        return Query(task, q, pos, pos.caption.n_grains())
    if task == "i2i":
        q = Item(scene=scene, summary=scene.summary(), render_seed=seed)
        return Query(task, q, candidate_item(task, rng, scene), 3 * len(scene.objects))
    if task == "it2i":
        made = random_edit(rng, scene)
        if made is None:
            return None
        e, target = made
        q = Item(scene=scene, text=e.text(), summary=target.summary(), render_seed=seed,
                 target=target, edit=e)
        # object, edited grain, new value
        return Query(task, q, candidate_item(task, rng, target), 3)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ----------------------------------------------------------------------------------------
# Near misses for a query (MRBench-mini): candidates that differ from the query in one grain.

def near_misses(rng: random.Random, query: Query, per_kind: int = 2, tries: int = 30,
                exclude: set | frozenset = frozenset()) -> list[tuple[str, Item]]:
    """Up to per_kind near misses of each kind; no near-miss scene is in `exclude` (the other
    splits' scenes)."""
    task, q, out = query.task, query.item, []
    if task == "it2i":
        # binding: the same edit applied to another object; no-edit: the source image itself;
        # attribute: the right object edited to a wrong value.
        e, src = q.edit, q.scene
        cands = [("binding", e.apply(src, on=o)) for o in src.objects if o != e.target]
        cands.append(("no-edit", src))
        pool = {"color": list(COLORS), "size": list(SIZES), "shape": list(SHAPES)}[e.grain]
        wrong = [v for v in pool if v not in (e.value, getattr(e.target, e.grain))]
        cands += [("attribute", Edit(e.target, e.grain, v).apply(src))
                  for v in rng.sample(wrong, min(len(wrong), per_kind))]
        seen = {q.target}
        for kind, s in cands:
            new = s is not None and s not in seen and s not in exclude
            room = sum(k == kind for k, _ in out) < per_kind      # this kind's quota not yet met
            if new and (kind == "no-edit" or s != src) and room:
                seen.add(s)
                out.append((kind, candidate_item(task, rng, s)))
        return out
    for kind in ("attribute", "binding", "relation"):
        got = 0
        for _ in range(tries):
            if got >= per_kind:
                break
            if task == "i2t":
                cap = caption_edit(rng, query.positive.caption, kind)
                if cap is None or satisfies(q.scene, cap):
                    continue
                item = Item(text=cap.text(), summary=cap.summary(), caption=cap)
            else:
                base = query.positive.scene
                # t2i: a binding or relation near miss swaps the two objects the caption names,
                # nothing else
                pair = (rng.choice(assignments(base, q.caption))
                        if task == "t2i" and kind != "attribute" else None)
                if pair is not None and len(pair) < 2:
                    break
                s = scene_edit(rng, base, kind, pair)
                if s is None or s == base or s in exclude:
                    continue
                if task == "t2i" and satisfies(s, q.caption):
                    continue  # the edit touched a grain the caption does not state: not a near miss
                item = candidate_item(task, rng, s)
            if all(item.text != o.text or item.scene != o.scene for _, o in out):
                out.append((kind, item))
                got += 1
    return out


# ----------------------------------------------------------------------------------------
# The world: disjoint train / val / test scenes, deterministic from a seed.

@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_train: int = 6000        # scenes (each gives endless captions and renders)
    n_val: int = 300
    n_test: int = 500          # the standard test pool: one candidate per test scene
    image_size: int = 36


class GrainWorld:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        scenes = {}                                    # distinct scenes in the order drawn
        while len(scenes) < cfg.n_train + cfg.n_val + cfg.n_test:
            scenes.setdefault(random_scene(rng))
        scenes = list(scenes)
        self.splits = {"train": scenes[:cfg.n_train],
                       "val": scenes[cfg.n_train:cfg.n_train + cfg.n_val],
                       "test": scenes[cfg.n_train + cfg.n_val:]}
        # Derived scenes (edit targets, near misses, siblings) never cross splits: training derives
        # no held-out scene nor one an edit away; a test query derives no training scene.
        self.heldout = set(scenes[cfg.n_train:])
        self.near_heldout = self.heldout.union(*(edit_neighbours(s) for s in self.heldout))
        self.train_scenes = set(self.splits["train"])

    def outside(self, split: str) -> set:
        """The scenes a split's derived scenes (edit targets, near misses, siblings) must avoid."""
        return self.near_heldout if split == "train" else self.train_scenes

    def sample_queries(self, rng: random.Random, n: int, split: str = "train") -> list[Query]:
        """Random queries over the four tasks for the contrastive stage (fresh captions and
        renders each call)."""
        out = []
        while len(out) < n:
            q = make_query(rng.choice(TASKS), rng, rng.choice(self.splits[split]))
            if q is not None and (split != "train" or q.item.target not in self.near_heldout):
                out.append(q)
        return out

    def standard_split(self, task: str, n_queries: int, split: str = "test", seed: int = 1):
        """(queries, pool): queries on split scenes; the pool holds one candidate per split scene
        (plus, for edits, each query's target). Relevance over the pool is exact (`relevant`)."""
        rng = random.Random(f"{self.cfg.seed}-{split}-{task}-{seed}")
        scenes = self.splits[split]
        pool = [candidate_item(task, rng, s) for s in scenes]
        queries = []
        for i in rng.sample(range(len(scenes)), min(n_queries, len(scenes))):
            q = make_query(task, rng, scenes[i])
            if q is None or (q.item.target is not None and q.item.target in self.outside(split)):
                # an edit whose result is another split's scene would leak that scene
                # into this split
                continue
            if task == "it2i":
                pool.append(q.positive)
            else:
                q.positive = pool[i]
            queries.append(q)
        return queries, pool

    def mrbench_mini(self, n_per_task: int, per_kind: int = 2, split: str = "test", seed: int = 2):
        """MRBench-mini: {task: (queries, pool)}. Queries state >= 2 grains, an equal number per
        task, each with near misses one grain away (a binding, a relation, an attribute); a
        task's pool is its queries' positives and near misses."""
        out = {}
        for task in TASKS:
            rng = random.Random(f"{self.cfg.seed}-mrbench-{task}-{seed}")
            queries, pool = [], []
            while len(queries) < n_per_task:
                q = make_query(task, rng, rng.choice(self.splits[split]))
                if q is None or q.n_grains < 2 or (q.item.target is not None
                                                   and q.item.target in self.outside(split)):
                    continue
                q.distractors = near_misses(rng, q, per_kind, exclude=self.outside(split))
                if not q.distractors:
                    continue
                queries.append(q)
                pool.append(q.positive)
                pool.extend(item for _, item in q.distractors)
            out[task] = (queries, pool)
        return out

    def rl_pool(self, task: str, n_scenes: int, rng: random.Random) -> list[Item]:
        """A training pool for mining hard negatives: train scenes plus one-grain siblings of
        them, as a real corpus holds near duplicates that random batches rarely bring together."""
        base = rng.sample(self.splits["train"], n_scenes)
        scenes = list(base)
        for s in base:
            for kind in ("attribute", "binding", "relation"):
                t = scene_edit(rng, s, kind)
                if t is not None and t not in self.near_heldout:
                    scenes.append(t)
        scenes = list(dict.fromkeys(scenes))
        return [candidate_item(task, rng, s) for s in scenes]


# ----------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained with `tokenizers` on the world's text.

def world_corpus(world: GrainWorld, n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [*TEMPLATE_TEXT, *INSTRUCTIONS.values()]
    for q in world.sample_queries(rng, n):
        lines += [q.item.text, q.item.summary, q.positive.text, q.positive.summary]
    return [l for l in lines if l]


# ----------------------------------------------------------------------------------------
@dataclass
class Source:
    """The stages' one interface to their data: train.grainworld_source or mbeir.training_source."""
    data: object                 # GrainWorld, or mbeir.MBeirTrain
    meta: dict       # what a checkpoint records to rebuild it: {"world": {...}} or {"mbeir": {...}}
    texts: object                # () -> the lines the run's BPE tokenizer is trained on
    # (args, data, step) -> stage 2's global batch of that step (a dict)
    contrastive_inputs: object
    # (args, data) -> per task [(queries, pool, relevant (Q, P), listed (Q, P) or None)]: what
    # stage 3 mines its negatives from (train.mine_instances)
    rl_candidates: object
    describe: str                # one line for the log


# ----------------------------------------------------------------------------------------
# GrainWorld as the stages' data (mbeir.py gives M-BEIR the same interface): each step's batch,
# made from the step's seed without the model, and stage 3's candidates.


@dataclass
class Pairs:
    """A stage-1/2 step's batch: `blocks` blocks of B items -- the B queries, then their
    candidates (the positives; in stage 1 also the contradictions) -- with each item's instruction
    and summary dropout, and which candidates are relevant to which query."""
    items: list                  # (blocks * B) Items, block-major
    instructions: list           # (blocks * B) str or None
    drop: list                   # (blocks * B) bool: embedded with no summary (summary dropout)
    false_neg: torch.Tensor      # (B, (blocks - 1) * B) bool: a candidate relevant to the query
    blocks: int
    n_queries: int = 0           # B (after part(): this process's share of it)
    encoded: tuple | None = None     # (token tensors, images (N_img, 3, H, W)), once encoded
    lm_only: bool = False        # a describe batch (stage 0): the next-token loss alone

    def part(self, rank: int, world: int) -> "Pairs":
        """This process's share under torchrun (itself on one): rows r*b..(r+1)*b of every block,
        and the false negatives' columns in the order Run.gather lays out the candidates:
        process 0's candidate blocks, then process 1's, ..."""
        B = len(self.items) // self.blocks
        b = B // world
        rows = [k * B + rank * b + i for k in range(self.blocks) for i in range(b)]
        cols = [k * B + p * b + i for p in range(world) for k in range(self.blocks - 1)
                for i in range(b)]
        lists = {f.name: [getattr(self, f.name)[j] for j in rows] for f in fields(self)
                 if isinstance(getattr(self, f.name), list)}
        return replace(self, **lists, false_neg=self.false_neg[rank * b:(rank + 1) * b][:, cols],
                       n_queries=b)


@dataclass
class Instances:
    """A stage-3 step's share of RL instances, with their items' prompts encoded (the rollout
    samples the summaries)."""
    batch: list                  # [(Query, [negative Items])], B instances
    prompts: dict                # tokens / attn (U, P), U = B * (query, positive, negatives)
    images: torch.Tensor         # (N_img, 3, H, W), in item order


def make_describe_inputs(args, world, step: int) -> Pairs:
    """Stage 0's batch (ours): B training images, each with its reference summary to learn to
    write (the next-token loss only: no summary is dropped, no InfoNCE)."""
    rng = random.Random(f"{args.seed}-describe-{step}")
    scenes = [rng.choice(world.splits["train"]) for _ in range(args.batch_size)]
    items = [Item(scene=s, summary=s.summary(), render_seed=rng.getrandbits(31)) for s in scenes]
    return Pairs(items, [None] * len(items), [False] * len(items),
                 torch.zeros(len(items), 0, dtype=torch.bool), blocks=1, n_queries=len(items),
                 lm_only=True)


def make_text_inputs(args, world, step: int) -> Pairs:
    """Stage 1's global batch from the step's seed: B NLI triplets in 3 blocks, the dropout
    flags, the candidates each premise's scene satisfies. --scene_premises of the premises are
    the scene's summary written as text (the form [RET] reads after an image's summary)."""
    rng = random.Random(f"{args.seed}-text-{step}")
    scenes, triplets, premises = [], [], []
    while len(triplets) < args.batch_size:
        s = rng.choice(world.splits["train"])
        t = nli_triplet(rng, s)
        if t is not None:
            scenes.append(s)
            triplets.append(t)
            if rng.random() < args.scene_premises:   # the scene's summary as the premise
                premises.append(Item(text=s.summary(), summary=s.summary()))
            else:
                premises.append(Item(text=t[0].text(), summary=t[0].summary(), caption=t[0]))
    B = len(triplets)
    drop = [rng.random() < args.summary_dropout for _ in range(3 * B)]   # summary dropout
    caps = [t[k] for k in range(3) for t in triplets]                          # (3B,) block-major
    items = premises + [Item(text=c.text(), summary=c.summary(), caption=c) for c in caps[B:]]
    false_neg = torch.tensor([[j != i and satisfies(s, c) for j, c in enumerate(caps[B:])]
                              for i, s in enumerate(scenes)])                 # (B, 2B)
    return Pairs(items, [None] * len(items), drop, false_neg, blocks=3, n_queries=B)


def in_batch_false_negatives(queries) -> torch.Tensor:
    """(B, B) bool: query j's positive is relevant to query i too (of any task: candidates carry
    no instruction)."""
    return torch.tensor([[i != j and relevant(qi.task, qi.item, qj.positive)
                          for j, qj in enumerate(queries)] for i, qi in enumerate(queries)],
                        dtype=torch.bool)


def make_stage2_inputs(args, world, step: int) -> Pairs:
    """Stage 2's global batch, from the step's seed: B queries over the four tasks and their
    positives (2 blocks), the dropout flags, the in-batch false negatives."""
    rng = random.Random(f"{args.seed}-contrastive-{step}")
    queries = world.sample_queries(rng, args.batch_size)
    drop = [rng.random() < args.summary_dropout for _ in range(2 * len(queries))]
    items = [q.item for q in queries] + [q.positive for q in queries]
    instructions = [INSTRUCTIONS[q.task] for q in queries] + [None] * len(queries)
    return Pairs(items, instructions, drop, in_batch_false_negatives(queries), blocks=2,
                 n_queries=len(queries))


def grainworld_rl_candidates(args, world) -> list:
    """Stage 3's candidates per task: rl_queries queries and a mining pool of training scenes
    and their one-grain siblings -> [(queries, pool, relevant (Q, P), None)]."""
    rng = random.Random(f"{args.seed}-rl-data")
    out = []
    for task in TASKS:
        pool = world.rl_pool(task, args.rl_pool_scenes, rng)
        queries = []
        while len(queries) < args.rl_queries:
            scene = rng.choice(world.splits["train"]) if task == "i2t" else rng.choice(pool).scene
            q = make_query(task, rng, scene)
            if q is not None and q.item.target not in world.outside("train"):
                queries.append(q)
        rel = torch.tensor([[relevant(task, q.item, c) for c in pool] for q in queries])
        out.append((queries, pool, rel, None))
    return out


@functools.lru_cache(maxsize=2)   # one world a process and config: a run's stages and eval share it
def grain_world(cfg: WorldConfig) -> GrainWorld:
    return GrainWorld(cfg)


def grainworld_source(cfg: WorldConfig) -> Source:
    """GrainWorld as the stages' data (train.read_source): its text, batches and RL instances."""
    world = grain_world(cfg)
    n_train, n_test = len(world.splits["train"]), len(world.splits["test"])
    return Source(data=world, meta={"world": cfg.__dict__},
                  texts=functools.partial(world_corpus, world, seed=cfg.seed),
                  contrastive_inputs=make_stage2_inputs, rl_candidates=grainworld_rl_candidates,
                  describe=f"world: {n_train} train / {n_test} test scenes")


if __name__ == "__main__":
    sheet = Image.new("RGB", (8 * 100, 100), "white")
    for i, q in enumerate(GrainWorld(WorldConfig()).sample_queries(random.Random(0), 8)):
        it = q.item if q.item.scene is not None else q.positive
        sheet.paste(render(it.scene, 96, it.render_seed), (i * 100, 2))
        print(f"{i} {q.task:5s} query={q.item.text!r:50s} summary={q.item.summary!r}")
    sheet.save("grainworld_samples.png")
    print("wrote grainworld_samples.png")
