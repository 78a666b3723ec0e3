"""The KV event plane: engine event types, wire codecs, ZMQ framing, publisher, subscriber."""
