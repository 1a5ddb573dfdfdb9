"""mmkernels.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss on a
tiny randomly initialised BERT (no download), against sentence-transformers' own
CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss in the same
process: the loss and every parameter's gradient, for each direction set and
partition mode, 0 and 1 hard negatives, mini-batches smaller than, not dividing,
and equal to the batch; the margin against an fp64 reference; the errors."""

import pytest
import torch

import reference
from embedding_cases import ALL, CONFIGS, TEXTS, save_tiny_bert
from embedding_cases import assert_same as _assert_same
from embedding_cases import run_loss as _run

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")
from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from mmkernels.integrations.sentence_transformers import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

BATCH = len(TEXTS[0])


def _tiny_bert(path, dropout):
    """A randomly initialised 1-layer BERT with a word-level vocab, saved to ``path``."""
    return st.SentenceTransformer(save_tiny_bert(path, dropout), device="cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Without dropout: the cached and the uncached losses see the same embeddings."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"), dropout=0.0)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert_dropout"), dropout=0.3)


def _features(model, columns):
    return [model.preprocess(column) for column in TEXTS[:columns]]


# --- against the originals ----------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("hard_negatives", [0, 1])
@pytest.mark.parametrize("mini_batch_size", [2, 4, BATCH])
def test_against_theirs(model, backend, small_tiles, config, hard_negatives, mini_batch_size):
    """Ours, their cached loss and their uncached loss: one value, one set of gradients
    (mini-batches of 2, of 4 (the last one short) and of the whole batch)."""
    directions, mode = config
    features = _features(model, 2 + hard_negatives)
    kw = dict(scale=20.0, directions=directions, partition_mode=mode)
    ours = _run(model, CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=mini_batch_size, backend=backend, **kw), features)
    theirs_cached = _run(model, losses.CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=mini_batch_size, **kw), features)
    theirs = _run(model, losses.MultipleNegativesRankingLoss(model, **kw), features)
    _assert_same(ours, theirs_cached)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("similarity, scale", [("dot_score", 1.0), ("cos_sim", 100.0)])
def test_similarity_and_scale(model, similarity, scale):
    features = _features(model, 3)
    kw = dict(scale=scale, similarity_fct=getattr(util, similarity), directions=ALL)
    ours = _run(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw), features)
    theirs = _run(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw),
                  features)
    _assert_same(ours, theirs)


def test_dropout_replayed_as_theirs(dropout_model):
    """With dropout, the second (graph) pass must redraw the first pass's masks: ours and
    theirs, seeded alike, give the same gradients (and a different seed does not)."""
    features = _features(dropout_model, 3)
    kw = dict(mini_batch_size=2, directions=ALL)
    ours = _run(dropout_model, CachedMultipleNegativesRankingLoss(dropout_model, **kw), features)
    theirs = _run(dropout_model, losses.CachedMultipleNegativesRankingLoss(dropout_model, **kw),
                  features)
    _assert_same(ours, theirs)
    other_seed = _run(dropout_model, CachedMultipleNegativesRankingLoss(dropout_model, **kw),
                      features, seed=1)
    assert not torch.allclose(other_seed[0], ours[0])


def test_token_budget_mini_batches(model):
    """mini_batch_num_tokens packs the embedding mini-batches by tokens, as in theirs."""
    features = _features(model, 3)
    kw = dict(mini_batch_num_tokens=12, directions=("query_to_doc", "doc_to_query"))
    _assert_same(_run(model, CachedMultipleNegativesRankingLoss(model, **kw), features),
                 _run(model, losses.CachedMultipleNegativesRankingLoss(model, **kw), features))


def test_without_gradients(model):
    """Evaluation (no grad): the value only, theirs."""
    features = _features(model, 3)
    model.eval()
    with torch.no_grad():
        got = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, directions=ALL)(
            features, None)
        expected = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4,
                                                             directions=ALL)(features, None)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


def test_upstream_gradient_reaches_every_mini_batch(model):
    """Their backward hook scales each mini-batch by the upstream gradient (fp16 scaler,
    accumulation): 3 * loss gives 3 times the gradients."""
    features = _features(model, 2)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    value, grads = _run(model, loss, features)
    model.zero_grad()
    tripled = 3.0 * loss(features, None)
    tripled.backward()
    got = (tripled.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                              if p.grad is not None})
    _assert_same(got, (3.0 * value, {name: 3.0 * g for name, g in grads.items()}))


# --- the margin, which theirs does not have -----------------------------------------

def margin_reference(q, docs, scale, margin):
    """All four directions, joint, cos_sim, on the materialized fp64 matrices: a
    candidate scoring more than the positive + margin leaves row i's denominator
    (the positive never does)."""
    n, m = q.shape[0], docs.shape[0]
    rows, cols = torch.arange(n).unsqueeze(1), torch.arange(m).unsqueeze(0)
    q_docs = reference.logits(q, docs, scale, True)
    positive = q_docs.diagonal()
    blocks = [  # (logits, candidate, is the positive)
        (q_docs, cols >= 0, cols == rows),
        (reference.logits(q, q, scale, True), cols[:, :n] != rows, cols[:, :n] < 0),
        (q_docs[:, :n].T, cols[:, :n] >= 0, cols[:, :n] == rows),
        (reference.logits(docs[:n], docs, scale, True), cols % n != rows, cols < 0),
    ]
    kept = []
    for x, candidate, is_positive in blocks:
        below = x.detach() <= positive.detach().unsqueeze(1) + margin
        kept.append(x.masked_fill(~(candidate & (below | is_positive)), float("-inf")))
    return (torch.logsumexp(torch.cat(kept, 1), 1) - positive).mean()


def test_margin_against_fp64_reference(model):
    """false_negative_margin on the model: the value and every parameter's gradient
    against the fp64 reference on the same embeddings, and the margin drops something."""
    features = _features(model, 3)
    features.append(model.preprocess(TEXTS[0]))  # duplicates of the anchors: false negatives
    margin = 0.5
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, directions=ALL,
                                              false_negative_margin=margin)
    got = _run(model, loss, features)

    model.zero_grad()
    embeddings = [model(f)["sentence_embedding"].double() for f in features]
    expected_value = margin_reference(embeddings[0], torch.cat(embeddings[1:]), 20.0, margin)
    expected_value.backward()
    expected = (expected_value.float().detach(),
                {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    _assert_same(got, expected)
    unfiltered = margin_reference(embeddings[0].detach(), torch.cat(embeddings[1:]).detach(), 20.0,
                                  float("inf"))
    assert float(unfiltered) > float(expected_value.detach()) + 0.1


@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_margin_as_uncached(model, margin):
    """The margin changes nothing of the caching: cached and uncached drop-ins agree."""
    features = _features(model, 3)
    kw = dict(directions=ALL, false_negative_margin=margin)
    _assert_same(_run(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **kw),
                      features),
                 _run(model, MultipleNegativesRankingLoss(model, **kw), features))


# --- constructor, attributes, errors -----------------------------------------------

def test_a_subclass_with_their_config(model):
    loss = CachedMultipleNegativesRankingLoss(model, scale=10.0, mini_batch_size=3, directions=ALL,
                                              false_negative_margin=1.0)
    theirs = losses.CachedMultipleNegativesRankingLoss(model, scale=10.0, mini_batch_size=3,
                                                       directions=ALL)
    assert isinstance(loss, losses.CachedMultipleNegativesRankingLoss)
    assert loss.get_config_dict() == {**theirs.get_config_dict(), "false_negative_margin": 1.0}
    assert loss.temperature == theirs.temperature == 0.1
    assert loss.citation == theirs.citation


def test_assignments_reach_the_loss(model):
    """As theirs, hyperparameters assigned on the cached loss reach the computation."""
    features = _features(model, 2)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    loss.scale = 5.0
    expected = _run(model, losses.MultipleNegativesRankingLoss(model, scale=5.0), features)
    _assert_same(_run(model, loss, features), expected)
    loss.false_negative_margin = 0
    assert loss.false_negative_margin == 0.0 and loss.loss.false_negative_margin == 0.0
    with pytest.raises(TypeError, match="false_negative_margin"):
        loss.false_negative_margin = "1"
    loss.similarity_fct = util.manhattan_sim
    with pytest.raises(ValueError, match="similarity_fct"):
        loss(features, None)


def test_refuses():
    """Each error names its argument and comes before any model call (model=None)."""
    with pytest.raises(ValueError, match="similarity_fct"):
        CachedMultipleNegativesRankingLoss(None, similarity_fct=util.manhattan_sim)
    with pytest.raises(NotImplementedError, match="hardness_mode"):
        CachedMultipleNegativesRankingLoss(None, hardness_mode="in_batch_negatives",
                                           hardness_strength=9.0)
    with pytest.raises(ValueError, match="per_direction"):
        CachedMultipleNegativesRankingLoss(None, directions=ALL, partition_mode="per_direction")
    with pytest.raises(TypeError, match="false_negative_margin"):
        CachedMultipleNegativesRankingLoss(None, false_negative_margin="0.1")


def test_refuses_one_column(model):
    loss = CachedMultipleNegativesRankingLoss(model)
    with pytest.raises(ValueError, match="at least 2 inputs"):
        loss(_features(model, 1), None)


def test_hardness_strength_zero_is_plain(model):
    """hardness_mode with strength 0 is no penalty (theirs too): accepted."""
    features = _features(model, 3)
    kw = dict(hardness_mode="hard_negatives", hardness_strength=0.0, mini_batch_size=4)
    _assert_same(_run(model, CachedMultipleNegativesRankingLoss(model, **kw), features),
                 _run(model, losses.CachedMultipleNegativesRankingLoss(model, **kw), features))
