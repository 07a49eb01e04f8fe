"""timecma: deploy TimeCMA forecasters for low-latency batch-1 inference.

This package root must stay torch-free: the runtime (``timecma.runtime``) imports the
shared modules below it (prompts, tokens, store, manifest) on boxes without torch.
"""

__version__ = "0.1.0"
