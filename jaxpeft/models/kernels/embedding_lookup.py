"""Embedding lookups whose gradients are reductions instead of scatter-adds.

The gradient of ``jnp.take(table, ids, axis=0)`` is a scatter-add of every token's gradient into
its row of the table. For the word embeddings that spreads over 30k rows. For the token-type table
(2 rows) every token of the batch adds into the same row or two, and the atomic adds queue up on
the same addresses: on an H200 that one scatter took 0.33 ms of a 38 ms full fine-tuning step
(BERT-base, batch 256, seq 128), the position table's (256 adds per row) another 0.07 ms. Here:

- :func:`take_small`: a table of at most ``SMALL_TABLE_ROWS`` rows is read by a gather as before,
  and its gradient is one masked column sum per row (``sum(where(ids == v, g, 0))``), which XLA
  fuses into one pass over ``g``;
- the default positions ``0..L-1`` of every row are a slice of the table broadcast over the batch
  (``BertEmbeddings``), whose gradient is a sum over the batch.

The values are the same as ``nn.Embed``'s (same gather or the same rows), and the gradients are the
same sums in another order, which also makes them deterministic.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# tables up to this many rows take their gradient as one masked sum per row
SMALL_TABLE_ROWS = 16


class EmbedTable(nn.Module):
    """The param of an ``nn.Embed`` (``embedding``, same shape and initialiser), returned unapplied."""

    num_embeddings: int
    features: int
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self) -> Array:
        return self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), jnp.float32)


@jax.custom_vjp
def take_small(table: Array, ids: Array) -> Array:
    """``jnp.take(table, ids, axis=0)`` for a table of at most ``SMALL_TABLE_ROWS`` rows."""
    return jnp.take(table, ids, axis=0)


def _take_small_fwd(table, ids):
    if table.shape[0] > SMALL_TABLE_ROWS:
        raise ValueError(f"take_small is for tables of at most {SMALL_TABLE_ROWS} rows, got {table.shape[0]}")
    # the table itself is the residual only for its (static) shape and dtype: a few rows
    return jnp.take(table, ids, axis=0), (table, ids)


def _take_small_bwd(res, g):
    table, ids = res
    g = g.astype(jnp.float32)
    lead = tuple(range(ids.ndim))
    dtable = jnp.stack([jnp.sum(jnp.where((ids == v)[..., None], g, 0.0), axis=lead)
                        for v in range(table.shape[0])])
    # integer ids have no gradient (float0 zeros)
    return dtable.astype(table.dtype), np.zeros(ids.shape, dtype=jax.dtypes.float0)


take_small.defvjp(_take_small_fwd, _take_small_bwd)
