"""The Retriever, the user's API."""

import random

import numpy as np
import pytest
import torch

import data
import retriever
from tests.helpers import (tiny_model)


def test_retriever_api(world, tok, tmp_path, capsys):
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    r = retriever.Retriever.from_pretrained(tmp_path / "ck")
    long_text = "a red circle " * 200
    e = r.encode_text(["a red circle", long_text], instruction=data.INSTRUCTIONS["t2i"])
    assert "1 of 2 texts were cut" in capsys.readouterr().out
    assert e.shape == (2, r.model.cfg.d_model) and torch.allclose(e.norm(dim=-1), torch.ones(2),
                                                                  atol=1e-5)
    img = data.render(world.splits["test"][0], 36, 0)
    img.save(tmp_path / "a.png")
    c = r.encode_image([img, str(tmp_path / "a.png")])
    # a PIL image and its file embed alike
    assert torch.allclose(c[0], c[1], atol=1e-5)
    scores, idx = r.search(e, c, k=1)
    assert idx.shape == (2, 1) and scores.shape == (2, 1)
    # a single input gives one vector; a list (N, D); an empty list (0, D) -- the API people know
    D = r.model.cfg.d_model
    one = r.encode_text("a triangle", instruction=data.INSTRUCTIONS["t2i"])
    assert one.shape == (D,) and torch.allclose(one,
                                                r.encode_text(["a triangle"],
                                                              data.INSTRUCTIONS["t2i"])[0])
    # not one embedding per character
    assert r.encode_text("triangle").shape == (D,)
    assert r.encode_image(img).shape == (D,)
    assert r.encode_image(str(tmp_path / "a.png")).shape == (D,)
    assert r.encode_text([]).shape == (0, D)
    composed, words = r.encode(texts=["make the circle blue", "x"], images=[img, img],
                               return_summaries=True)
    assert composed.shape == (2, D) and len(words) == 2 and all(isinstance(w, str) for w in words)
    assert isinstance(r.encode_text("a circle", return_summaries=True)[1], str)
    arr = r.encode_text(["a", "b"], convert_to_numpy=True)
    s_np, i_np = r.search(arr, c.numpy(), k=2)                         # numpy in, numpy out
    assert isinstance(i_np, np.ndarray) and i_np.shape == (2, 2)
    hits = r.search(arr[0], c.numpy(), k=2, as_hits=True)              # sentence-transformers' form
    assert len(hits) == 1 and set(hits[0][0]) == {"corpus_id", "score"}
    for bad, err in (((" ",), "text 0 is blank"),
                     ((str(tmp_path / "gone.jpg"),), "image 0 .*gone.jpg.* not a file"),
                     ((3,), "texts must be")):
        with pytest.raises((ValueError, FileNotFoundError, TypeError), match=err):
            if "gone" in str(bad[0]):
                r.encode_image(bad[0])
            else:
                r.encode_text(bad[0])
    r.save_pretrained(tmp_path / "saved")                              # round trip
    r2 = retriever.Retriever.from_pretrained(tmp_path / "saved")
    assert torch.allclose(r2.encode_text("a triangle"), r.encode_text("a triangle"))
    # evaluation's pools: chunks made in DataLoader workers embed to the same numbers as in-process
    qs = world.sample_queries(random.Random(0), 5)
    items = [q.positive for q in qs] + [q.item for q in qs]
    instr = [None] * 5 + [data.INSTRUCTIONS[q.task] for q in qs]
    e0, t0 = r.embed_items(items, instr, batch_size=3, workers=0)
    e2, t2 = r.embed_items(items, instr, batch_size=3, workers=2)
    assert torch.equal(e0, e2) and t0 == t2
