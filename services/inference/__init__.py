"""The inference service: ``python -m services.inference`` (see ``handler`` for the logic)."""
