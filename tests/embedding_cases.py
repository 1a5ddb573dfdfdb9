"""What the embedding-loss test files share: the direction configurations and a tiny
randomly initialised BERT to load with sentence-transformers (no download)."""

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
    import torch
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
