"""gpt-oss model I/O: checkpoint layouts, the tiny-checkpoint factory, loading (bf16 or MXFP4-resident experts), LoRA targets, merge."""
