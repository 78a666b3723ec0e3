"""kvpick's benchmark harnesses, run as ``kvpick bench <name>``."""
