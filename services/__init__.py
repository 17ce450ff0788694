"""lmstack's gRPC services: thin transport layers over lmcore (tokenizer, inference, fine-tuning)."""
