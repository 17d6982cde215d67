"""edgepack: turn a Hugging Face transformer into verified on-device artifacts."""

__version__ = "0.1.0"
