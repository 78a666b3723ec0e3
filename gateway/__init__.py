"""Envoy configured as an Inference Gateway in front of kvpick: the config generator and a
process wrapper, used by the local stack, the integration tests and the benchmarks."""
