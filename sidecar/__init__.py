"""kvpick's per-pod sidecar: the OpenAI-compatible frontend in direct mode, forwarding
token ids to the colocated engine worker the EPP picked (built by a later issue)."""
