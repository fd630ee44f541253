"""Bottleneck adapters (Houlsby et al. 2019): 64-wide adapters after the attention and the
feed-forward sublayers of every layer; the adapters, the LayerNorms and the head train.

Houlsby et al. searched 3e-5..3e-3 and adapter sizes 8..256 on BERT-large; the adapters start as
the identity (their up-projection at zero), so they need a rate well above full fine-tuning's:
1e-3 on the bundled 6-layer MiniLM. Epochs as BitFit's.
"""

from jaxpeft.configs.module_common import for_task


def get_config(task: str) -> dict:
    return for_task(dict(learning_rate=1e-3, weight_decay=0.0, adapter_size=64, adapter_type="houlsby"), task)
