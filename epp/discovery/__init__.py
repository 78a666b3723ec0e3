"""Where the model-server endpoints come from: a static file (:mod:`epp.discovery.static`)."""
