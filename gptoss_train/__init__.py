"""gptoss-train: fine-tune, evaluate and ship gpt-oss-20b / gpt-oss-120b."""
__version__ = "0.1.0"
