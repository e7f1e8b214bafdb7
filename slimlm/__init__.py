"""slimlm: fine-tune, compress, export and serve Llama-family language models, CPU first."""

from slimlm.config import ModelConfig
from slimlm.engine.sampling import SamplingParams
from slimlm.llm import LLM, Completion, load
from slimlm.model import Transformer

__all__ = ["LLM", "Completion", "ModelConfig", "SamplingParams", "Transformer", "load"]
__version__ = "0.1.0"
