"""tunesmith: fine-tune an open chat model into your own assistant."""

__version__ = "0.1.0"
