"""onegpu: one LLM, one GPU — the challenge server, its quantizer and its trainer."""

__version__ = "0.1.0"
