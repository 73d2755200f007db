"""DeepSeek-V4.1's Engram flavour: its config names, compression, hashing, fp8 tables and layer.

The demo flavour (`engram.model`) follows DeepSeek's public Engram demo; this package follows
the released V4.1 checkpoint, so its tables and config load as they are. See docs/V41.md.
"""

from .compression import compressed_token_map
from .config import V41Config
from .fp8 import dequantize_fp8_rows, quantize_fp8_rows
from .hashing import V41Hasher, V41HashState, bucket_primes, hash_multipliers
from .module import V41Engram, V41EngramTable, v41_increment

__all__ = [
    "V41Config", "V41Engram", "V41EngramTable", "V41HashState", "V41Hasher", "bucket_primes",
    "compressed_token_map", "dequantize_fp8_rows", "hash_multipliers", "quantize_fp8_rows", "v41_increment",
]
