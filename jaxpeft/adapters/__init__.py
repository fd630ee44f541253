"""Adapters: the trained part of a model as a small portable folder (peft's two files), moved to and
from peft, predicted with, and many of them on one base model in one batch.

``folder`` writes and reads adapter folders; ``peft_format`` is peft's schema and tensor names;
``predict`` reads inputs and prints predictions; ``mixed`` stacks several adapters for one batch.
"""

from jaxpeft.adapters.folder import load_adapter, read_adapter, read_adapter_config, save_adapter

__all__ = ["load_adapter", "read_adapter", "read_adapter_config", "save_adapter"]
