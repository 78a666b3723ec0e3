"""The tests' tiny tokenizer builder lives in :mod:`bench.tiny_tokenizer` (the benchmarks
use it too); this module keeps the tests' imports short."""

from bench.tiny_tokenizer import *  # noqa: F403
from bench.tiny_tokenizer import build_tiny_model, copy_model, install_in_hf_cache  # noqa: F401
