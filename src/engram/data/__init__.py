"""Data pipeline: corpus -> tokenizer -> cached token streams -> training and validation batches.

One call does it all::

    from engram.data import prepare_data, BatchSampler, val_batches
    data = prepare_data()  # stdlib source + byte-level BPE 8192, cached after the first run
    sampler = BatchSampler(data.train, batch_size=16, seq_len=256, seed=0)
    x_BT, y_BT = sampler.next()
"""

from .bpe import (
    EOS_ID,
    EOS_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    TokenCodec,
    cache_root,
    get_bpe,
    get_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
)
from .corpus import Corpus, Document, load_corpus, split_documents, stdlib_files, stdlib_root
from .tokens import (
    BatchSampler,
    DataBundle,
    encode_documents,
    load_tokens,
    prepare_data,
    token_dtype,
    val_batches,
)

__all__ = [
    "EOS_ID", "EOS_TOKEN", "PAD_ID", "PAD_TOKEN", "BatchSampler", "Corpus", "DataBundle", "Document", "TokenCodec",
    "cache_root", "encode_documents", "get_bpe", "get_tokenizer", "load_corpus", "load_tokens", "prepare_data",
    "split_documents", "stdlib_files", "stdlib_root", "token_dtype", "tokenizer_fingerprint", "train_bpe",
    "val_batches",
]
