"""hf_memlm: external memory for any 🤗 Transformers causal LM.

Importing the package registers `model_type="memlm"` with `AutoConfig` and `AutoModelForCausalLM`.
"""

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

__all__ = [
    "MemLMCache",
    "MemLMCausalLMOutput",
    "MemLMConfig",
    "MemLMForCausalLM",
    "MemoryState",
    "__version__",
    "lora_target_modules",
]
