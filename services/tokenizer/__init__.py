"""The tokenizer service: ``python -m services.tokenizer`` (see ``handler`` for the logic)."""
