"""kvpick's Endpoint Picker: KV-cache-aware, load-aware scheduling for the Gateway API
Inference Extension. Depends on nothing else of kvpick's."""

__version__ = "0.1.0.dev0"
