"""Engine workers: launchers for vLLM, SGLang and TensorRT-LLM, and ``sim``, the CPU
simulated engine that speaks their wire protocols (built by a later issue)."""
