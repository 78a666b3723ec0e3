"""Launchers: build and exec the real engines' server commands (vLLM, SGLang, TensorRT-LLM)
with prefix caching, KV events, NIXL transfer settings and data parallelism configured."""
