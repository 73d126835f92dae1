"""Library-only bridges to other tools (PEFT, the Hugging Face Hub, lm-evaluation-harness).

Nothing here is part of the Hub payload: these modules may import hf_memlm and optional packages, and
each imports its tool only when called.
"""
