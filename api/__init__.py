"""The FastAPI app: the collector endpoints and the query API."""
