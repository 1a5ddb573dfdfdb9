"""What the embedding-loss test files share: the direction configurations, a tiny
randomly initialised BERT to load with sentence-transformers (no download), texts
for it, and the run and comparison of a loss on a model."""

import torch

ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# (directions, partition_mode): every pairing sentence-transformers accepts that
# exercises a distinct statistic, and the full GTE set.
CONFIGS = [
    (("query_to_doc",), "joint"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (ALL, "joint"),
    (("query_to_doc",), "per_direction"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
]

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a cat dog sat on mat ran far big small red blue green".split())


def save_tiny_bert(path, dropout: float = 0.0) -> str:
    """A randomly initialised 1-layer BERT with a word-level vocab, saved to ``path``
    (a pathlib.Path); returns it as a string for sentence_transformers.SentenceTransformer."""
    import transformers

    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)
    transformers.BertModel(config).save_pretrained(path)
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return str(path)


# anchors, positives, hard negatives: 6 rows of different lengths (the mini-batches
# trim their own padding, so each sees another sequence width)
TEXTS = [["the cat sat", "a dog ran far", "big red mat", "green", "the small dog", "on a mat"],
         ["the mat", "dog far", "red blue", "a green cat", "small", "the mat sat on"],
         ["small cat", "the big dog sat", "on the mat", "blue", "far far", "red"]]


def run_loss(model, loss, features, seed=0):
    """The loss value and every parameter's gradient after one forward + backward."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    value = loss([dict(f) for f in features], None)  # a model may add keys to its features
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(got, expected):
    """Values to fp32 round-off; gradients elementwise to 1e-4, with an absolute floor
    of 1e-5 of the largest gradient entry of the model (an entry summed over the batch
    can cancel to far below the terms whose round-off it carries; the attention key
    bias's gradient is 0 but for round-off)."""
    (value, grads), (expected_value, expected_grads) = got, expected
    torch.testing.assert_close(value, expected_value, rtol=2e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    floor = 1e-5 * max(float(g.abs().max()) for g in expected_grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=floor,
                                   msg=lambda m: f"{name}: {m}")
