"""multiple_negatives_loss, the false-negative margin of contrastive_loss / info_nce, and
the sentence-transformers drop-in: against fp64 references written from the
definitions, on every backend under test, and against sentence-transformers itself."""

import pytest
import torch

import mmkernels
import reference
from compare_to_reference import compare
from embedding_cases import ALL, CONFIGS, save_tiny_bert
from tolerances import fp32_logit_rtol


# --- the reference, from the definitions ------------------------------------------------

def mnrl_reference(q, docs, s, directions=("query_to_doc",), partition_mode="joint",
                   margin=None, normalize=True, reduction="mean"):
    """Row i's candidates per direction, as (logits, kept, is_positive) on the
    materialized matrices; loss_i = log Z_i - S(q_i, d_i)."""
    n, m = q.shape[0], docs.shape[0]
    rows = torch.arange(n).unsqueeze(1)
    cols, qcols = torch.arange(m).unsqueeze(0), torch.arange(n).unsqueeze(0)
    q_docs = reference.logits(q, docs, s, normalize)
    positive = q_docs[:, :n].diagonal()
    candidates = {
        "query_to_doc": (q_docs, torch.ones(n, m, dtype=torch.bool), cols == rows),
        "query_to_query": (reference.logits(q, q, s, normalize), qcols != rows,
                           torch.zeros(n, n, dtype=torch.bool)),
        "doc_to_query": (q_docs[:, :n].T, torch.ones(n, n, dtype=torch.bool), qcols == rows),
        "doc_to_doc": (reference.logits(docs[:n], docs, s, normalize), cols % n != rows,
                       torch.zeros(n, m, dtype=torch.bool)),
    }
    lses = []
    for name in directions:
        x, kept, is_positive = candidates[name]
        if margin is not None:
            kept = kept & ((x.detach() <= positive.detach().unsqueeze(1) + margin) | is_positive)
        lses.append(x.masked_fill(~kept, float("-inf")))
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(lses, 1), 1)
    else:
        log_z = sum(torch.logsumexp(x, 1) for x in lses) / len(lses)
    per_row = log_z - positive
    return {"mean": per_row.mean, "sum": per_row.sum, "none": lambda: per_row}[reduction]()


def _ours(backend, k_layout="tensor", **kw):
    def run(q, *rest):
        *docs, s = rest
        docs = list(docs) if k_layout == "list" else docs[0]
        return mmkernels.multiple_negatives_loss(q, docs, logit_scale=s, backend=backend, **kw)
    return run


def _ref(**kw):
    return lambda q, docs, s: mnrl_reference(q, docs, s, **kw)


def _inputs(n, d, k, near_duplicates=False):
    q = torch.randn(n, d)
    docs = torch.randn(n * (1 + k), d)
    if near_duplicates:  # false negatives: other rows' documents close to query i
        docs[n // 2] = q[0] + 0.05 * torch.randn(d)
        docs[-1] = docs[0] + 0.05 * torch.randn(d)
    return q, docs


# --- multiple_negatives_loss against the reference ------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_directions(backend, small_tiles, config, k):
    directions, mode = config
    q, docs = _inputs(9, 12, k)
    kw = dict(directions=directions, partition_mode=mode)
    compare(_ours(backend, **kw), _ref(**kw), [q, docs], torch.float32,
            scale=torch.tensor(20.0), what=f"{backend} {config} k={k}")


@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
def test_dot_product(backend, small_tiles, partition_mode):
    q, docs = _inputs(11, 7, 2)
    directions = ALL if partition_mode == "joint" else ("query_to_doc", "doc_to_query")
    kw = dict(directions=directions, partition_mode=partition_mode, normalize=False)
    compare(_ours(backend, **kw), _ref(**kw), [q, docs], torch.float32,
            scale=torch.tensor(1.5), what=f"{backend} dot")


@pytest.mark.parametrize("margin", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("config", [(ALL, "joint"), (("query_to_doc", "doc_to_query"),
                                                     "per_direction")], ids=["all", "sym"])
@pytest.mark.parametrize("k", [0, 2])
def test_false_negative_margin(backend, small_tiles, margin, config, k):
    directions, mode = config
    q, docs = _inputs(10, 8, k, near_duplicates=True)
    kw = dict(directions=directions, partition_mode=mode, margin=margin)
    ours = _ours(backend, directions=directions, partition_mode=mode, false_negative_margin=margin)
    compare(ours, _ref(**kw), [q, docs], torch.float32, scale=torch.tensor(20.0),
            what=f"{backend} margin {margin}")


def test_margin_drops_candidates():
    """The margin changes the loss (some candidate is above the positive) and a huge
    one changes nothing."""
    q, docs = _inputs(10, 8, 1, near_duplicates=True)
    kw = dict(directions=ALL, backend="torch")
    plain = mmkernels.multiple_negatives_loss(q, docs, **kw)
    assert mmkernels.multiple_negatives_loss(q, docs, false_negative_margin=0.0, **kw) < plain
    torch.testing.assert_close(
        mmkernels.multiple_negatives_loss(q, docs, false_negative_margin=1e6, **kw), plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_dtypes_and_scales(backend, small_tiles, dtype, scale):
    q, docs = _inputs(13, 16, 1)
    kw = dict(directions=ALL)
    compare(_ours(backend, **kw), _ref(**kw), [q, docs], dtype, scale=torch.tensor(scale),
            what=f"{backend} {dtype} scale {scale}")


def test_fp32_scale_100(backend, small_tiles):
    q, docs = _inputs(13, 16, 3)
    kw = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    compare(_ours(backend, **kw), _ref(**kw), [q, docs], torch.float32,
            scale=torch.tensor(100.0), what=f"{backend} scale 100", rtol=fp32_logit_rtol(100.0))


@pytest.mark.parametrize("k", [0, 2])
def test_list_layout(backend, small_tiles, k):
    q, docs = _inputs(9, 12, k)
    blocks = list(docs.split(9))
    kw = dict(directions=ALL)
    compare(_ours(backend, k_layout="list", **kw), lambda q, *r: mnrl_reference(
        q, torch.cat(r[:-1]), r[-1], **kw), [q, *blocks], torch.float32,
        scale=torch.tensor(20.0), what=f"{backend} list k={k}")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, small_tiles, reduction):
    q, docs = _inputs(9, 5, 1)
    kw = dict(directions=ALL, reduction=reduction)
    compare(_ours(backend, **kw), _ref(**kw), [q, docs], torch.float32,
            scale=torch.tensor(20.0), what=f"{backend} {reduction}")


def test_single_query(backend):
    """N = 1: the self-directions have no candidate left (-inf), the loss stays finite."""
    q, docs = _inputs(1, 4, 2)
    kw = dict(directions=ALL)
    compare(_ours(backend, **kw), _ref(**kw), [q, docs], torch.float32,
            scale=torch.tensor(20.0), what=f"{backend} N=1")


def test_errors():
    q, docs = torch.randn(4, 3), torch.randn(8, 3)
    f = mmkernels.multiple_negatives_loss
    with pytest.raises(ValueError, match="docs"):
        f(q, torch.randn(6, 3))
    with pytest.raises(ValueError, match="docs"):
        f(q, torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"docs\[1\]"):
        f(q, [torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="docs"):
        f(q, [])
    with pytest.raises(ValueError, match="query"):
        f(torch.randn(4), docs)
    with pytest.raises(ValueError, match="directions"):
        f(q, docs, directions=("query_to_doc", "doc_to_everything"))
    with pytest.raises(ValueError, match="directions"):
        f(q, docs, directions=("doc_to_query",))
    with pytest.raises(TypeError, match="directions"):
        f(q, docs, directions="query_to_doc")
    with pytest.raises(ValueError, match="partition_mode"):
        f(q, docs, partition_mode="separate")
    with pytest.raises(ValueError, match="partition_mode"):
        f(q, docs, directions=("query_to_doc", "query_to_query"), partition_mode="per_direction")
    with pytest.raises(ValueError, match="reduction"):
        f(q, docs, reduction="avg")
    with pytest.raises(TypeError, match="false_negative_margin"):
        f(q, docs, false_negative_margin="0.1")
    with pytest.raises(ValueError, match="false_negative_margin"):
        f(q, docs, false_negative_margin=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        f(q, docs, backend="fast")


# --- contrastive_loss and info_nce with a margin ------------------------------------------

def _masked_ce(s, labels, margin):
    """Cross-entropy of each row of s with the entries above s[i, labels[i]] + margin
    left out (the positive stays)."""
    pos = s.gather(1, labels.unsqueeze(1))
    is_pos = torch.arange(s.shape[1]).unsqueeze(0) == labels.unsqueeze(1)
    out = (s.detach() > pos.detach() + margin) & ~is_pos
    return torch.logsumexp(s.masked_fill(out, float("-inf")), 1) - pos.squeeze(1)


@pytest.mark.parametrize("margin", [0.0, 0.7])
@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_margin(backend, small_tiles, margin, normalize):
    a, b = _inputs(17, 9, 0, near_duplicates=True)

    def ref(a, b, s):
        logits = reference.logits(a, b, s, normalize)
        labels = torch.arange(a.shape[0])
        return ((_masked_ce(logits, labels, margin) + _masked_ce(logits.T, labels, margin)) / 2).mean()

    compare(lambda a, b, s: mmkernels.contrastive_loss(a, b, s, normalize=normalize,
                                                       false_negative_margin=margin,
                                                       backend=backend),
            ref, [a, b], torch.float32, scale=torch.tensor(10.0), what=f"{backend} clip margin")


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_info_nce_margin(backend, small_tiles, margin):
    q, keys = torch.randn(11, 6), torch.randn(23, 6)
    keys[5] = q[2]
    labels = torch.randint(0, 23, (11,))
    compare(lambda q, k, s: mmkernels.info_nce(q, k, labels, s, normalize=True,
                                               false_negative_margin=margin,
                                               reduction="none", backend=backend),
            lambda q, k, s: _masked_ce(reference.logits(q, k, s, True), labels, margin),
            [q, keys], torch.float32, scale=torch.tensor(10.0), what=f"{backend} info_nce margin")


def test_contrastive_margin_errors():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="false_negative_margin"):
        mmkernels.contrastive_loss(a, b, false_negative_margin=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="false_negative_margin"):
        mmkernels.info_nce(a, b, false_negative_margin=0.1, label_smoothing=0.1)
    with pytest.raises(TypeError, match="false_negative_margin"):
        mmkernels.contrastive_loss(a, b, false_negative_margin=True)


# --- sentence-transformers itself ------------------------------------------------------

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_against_sentence_transformers(backend, small_tiles, config, k, similarity):
    """Their compute_loss_from_embeddings and ours on the same embeddings: value and
    gradients of every column."""
    directions, mode = config
    fct = getattr(util, similarity)
    scale = 20.0 if similarity == "cos_sim" else 0.5
    embeddings = [torch.randn(10, 16, requires_grad=True) for _ in range(k + 2)]
    theirs = losses.MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=fct,
                                                 directions=directions, partition_mode=mode)
    expected = theirs.compute_loss_from_embeddings(embeddings, None)
    expected_grads = torch.autograd.grad(expected, embeddings)
    got = mmkernels.multiple_negatives_loss(
        embeddings[0], embeddings[1:], logit_scale=scale, directions=directions,
        partition_mode=mode, normalize=similarity == "cos_sim", backend=backend)
    got_grads = torch.autograd.grad(got, embeddings)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 1-layer BERT and its word-level vocab, no download."""
    pytest.importorskip("transformers")
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


TEXTS = [["the cat sat", "a dog ran far", "big red mat", "green", "the small dog"],
         ["the mat", "dog far", "red blue", "a green cat", "small"],
         ["small cat", "the big dog sat", "on the mat", "blue", "far far"]]


@pytest.mark.parametrize("config", [(("query_to_doc",), "joint"), (ALL, "joint"),
                                    (("query_to_doc", "doc_to_query"), "per_direction")], ids=str)
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_drop_in_on_a_model(tiny_model_dir, config, similarity):
    """The drop-in and the original on a tiny model: the loss and every parameter's gradient."""
    from mmkernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

    model = st.SentenceTransformer(tiny_model_dir, device="cpu")
    directions, mode = config
    features = [model.preprocess(column) for column in TEXTS]
    kw = dict(scale=20.0 if similarity == "cos_sim" else 1.0,
              similarity_fct=getattr(util, similarity), directions=directions, partition_mode=mode)
    results = []
    for cls in (losses.MultipleNegativesRankingLoss, MultipleNegativesRankingLoss):
        model.zero_grad()
        loss = cls(model, **kw)(features, None)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                        if p.grad is not None]))
    (expected, expected_grads), (got, got_grads) = results
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    assert len(got_grads) == len(expected_grads) > 0
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_drop_in_margin_and_config(tiny_model_dir):
    from mmkernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

    model = st.SentenceTransformer(tiny_model_dir, device="cpu")
    features = [model.preprocess(column) for column in TEXTS]
    loss = MultipleNegativesRankingLoss(model, directions=ALL, false_negative_margin=0.0)
    assert isinstance(loss, losses.MultipleNegativesRankingLoss)
    assert loss.get_config_dict()["false_negative_margin"] == 0.0
    with torch.no_grad():
        embeddings = [model(f)["sentence_embedding"] for f in features]
        expected = mnrl_reference(embeddings[0].double(), torch.cat(embeddings[1:]).double(),
                                  20.0, directions=ALL, margin=0.0)
        torch.testing.assert_close(loss(features, None).double(), expected, rtol=2e-5, atol=1e-6)


def test_drop_in_refuses():
    from mmkernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

    with pytest.raises(ValueError, match="similarity_fct"):
        MultipleNegativesRankingLoss(None, similarity_fct=util.manhattan_sim)
    with pytest.raises(NotImplementedError, match="hardness_mode"):
        MultipleNegativesRankingLoss(None, hardness_mode="hard_negatives", hardness_strength=5.0)
    with pytest.raises(ValueError, match="per_direction"):
        MultipleNegativesRankingLoss(None, directions=ALL, partition_mode="per_direction")


@pytest.mark.parametrize("group", ["none", "of_one"])
def test_drop_in_gather_on_one_process(tmp_path, group):
    """gather_across_devices=True on one process: the local batch's loss and its
    gradients, as theirs (which, without a group, warns and gathers nothing). Over
    gloo processes: tests/test_sentence_transformers_distributed.py."""
    import contextlib

    import test_distributed
    from mmkernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q, docs = _inputs(5, 8, 1)
    columns = [q, docs[:5], docs[5:]]
    results = []
    with (test_distributed.world_of_one(tmp_path) if group == "of_one"
          else contextlib.nullcontext()):
        for cls in (MultipleNegativesRankingLoss, losses.MultipleNegativesRankingLoss):
            leaves = [c.clone().requires_grad_() for c in columns]
            value = cls(None, directions=ALL, gather_across_devices=True
                        ).compute_loss_from_embeddings(leaves, None)
            results.append((value, torch.autograd.grad(value, leaves)))
    (got, got_grads), (expected, expected_grads) = results
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


