"""The Segment-compatible collector: message validation and mapping (``segment``), context enrichment (``enrich``)."""
