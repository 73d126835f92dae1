"""hf_memlm: external memory for any 🤗 Transformers causal LM.

Importing the package registers `model_type="memlm"` with `AutoConfig` and `AutoModelForCausalLM`.
"""

import importlib
import sys

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_memlm import MemLMConfig
from .integrations.lora import lora_target_modules
from .memory_state import MemoryState
from .modeling_memlm import MemLMCache, MemLMCausalLMOutput, MemLMForCausalLM

__version__ = "0.1.0"

AutoConfig.register("memlm", MemLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MemLMConfig, MemLMForCausalLM, exist_ok=True)
# save_pretrained then copies the modeling files and writes `auto_map`, so the folder also loads with
# trust_remote_code=True where hf_memlm is not installed.
MemLMConfig.register_for_auto_class()
MemLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# Tools that resolve a saved model's class as `getattr(transformers, config.architectures[0])` (TRL before 1.0 when
# given a folder; others) find it there, as they find a built-in architecture. `transformers.processing_utils`
# replaces the `transformers` module with a fresh one the first time it is imported: import it first, so that
# the names are set on the module that stays.
importlib.import_module("transformers.processing_utils")
for _cls in (MemLMConfig, MemLMForCausalLM):
    if not hasattr(sys.modules["transformers"], _cls.__name__):
        setattr(sys.modules["transformers"], _cls.__name__, _cls)

__all__ = [
    "MemLMCache",
    "MemLMCausalLMOutput",
    "MemLMConfig",
    "MemLMForCausalLM",
    "MemoryState",
    "__version__",
    "lora_target_modules",
]
