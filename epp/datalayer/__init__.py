"""The EPP's view of model-server load: ``/metrics`` text parsing
(:mod:`epp.datalayer.prom_text`), the per-engine metric names and data-parallel mapping
(:mod:`epp.datalayer.engine_metrics`) and the polling scraper (:mod:`epp.datalayer.scraper`)."""
