"""``kvpick worker sim``: a CPU simulated engine that behaves like one vLLM server on the
wire (HTTP API, metrics, KV events, NIXL handoff)."""
