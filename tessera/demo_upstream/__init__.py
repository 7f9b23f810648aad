"""Demo upstream: a stand-in for vLLM's OpenAI server, for tests and `make run`. Not a model."""
