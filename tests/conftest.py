"""The fixtures every test file may ask for: a tiny world, its tokenizer, the M-BEIR sample."""

import pytest

import data
import mbeir as realdata
import retriever


@pytest.fixture(scope="module")
def world():
    return data.GrainWorld(data.WorldConfig(seed=3, n_train=200, n_val=20, n_test=60))


@pytest.fixture(scope="module")
def tok(world):
    return retriever.train_tokenizer(data.world_corpus(world, n=300))


@pytest.fixture(scope="module")
def mbeir(tmp_path_factory):
    return realdata.write_mbeir_sample(tmp_path_factory.mktemp("mbeir"))
