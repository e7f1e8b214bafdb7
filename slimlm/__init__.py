"""slimlm: fine-tune, compress, export and serve Llama-family language models, CPU first."""

from slimlm.config import ModelConfig
from slimlm.engine.sampling import SamplingParams
from slimlm.errors import InputError, SlimlmError
from slimlm.llm import LLM, Completion, load
from slimlm.model import Transformer
from slimlm.version import __version__

__all__ = [
    "LLM",
    "Completion",
    "InputError",
    "ModelConfig",
    "SamplingParams",
    "SlimlmError",
    "Transformer",
    "load",
    "__version__",
]
