"""kvpick's per-pod sidecar: the OpenAI-compatible frontend in direct mode, serving exactly
the worker the EPP picked, with the EPP's token ids, and running prefill→decode handoffs
(docs/sidecar.md)."""
