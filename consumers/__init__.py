"""Alert delivery to on-call, and dead-letter inspection and replay."""
