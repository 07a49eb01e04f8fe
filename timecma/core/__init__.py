"""timecma.core: what training, export and serving share, with no torch.

prompts (the reference template, rendered byte for byte), tokens (fast-tokenizer helpers and
LLM batch planning), store (the LMDB embedding store), manifest (the bundle schema and its
integrity checks), config (the dataclasses serialised into checkpoints and bundles), errors
(what went wrong, and the exit code each kind maps to) and timing (the one timing loop).
The import contracts in pyproject.toml keep it free of torch, export, runtime and training.
"""
