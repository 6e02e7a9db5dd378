"""Ship a tuned gpt-oss: HF MXFP4 / bf16 folders (vLLM, transformers), GGUF (llama.cpp) and an Ollama Modelfile."""

from gptoss_train.export.api import FORMATS, ExportError, export_model
from gptoss_train.export.validate import validate_vllm_layout

__all__ = ["FORMATS", "ExportError", "export_model", "validate_vllm_layout"]
