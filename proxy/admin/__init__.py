"""The admin listener: metrics, health, readiness, reload, the queue page."""
