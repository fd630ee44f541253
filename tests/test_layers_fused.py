"""``layers.fused_linear``: several dense layers of one input as one matmul, against the layers one
by one, and what its backward pass keeps from the forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from jaxpeft.models import layers


def _kernels(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (24, d), jnp.float32).astype(dtype) for k, d in zip(keys, (16, 16, 8))]


def test_values_and_gradients_equal_the_layers_one_by_one():
    ks = _kernels(jnp.float32)
    bs = [jnp.arange(k.shape[1], dtype=jnp.float32) / 10 for k in ks]
    x = jax.random.normal(jax.random.key(1), (3, 5, 24))

    def fused(x, ks):
        y, biases = layers.fused_linear(x, [(k, b, None) for k, b in zip(ks, bs)], jnp.float32)
        return y, biases

    def apart(x, ks):
        return jnp.concatenate([x @ k for k in ks], axis=-1)

    y, biases = fused(x, ks)
    np.testing.assert_allclose(y, apart(x, ks), rtol=1e-5, atol=1e-5)
    assert all(b is bb for b, bb in zip(biases, bs))   # the biases come back to be added later
    w = jax.random.normal(jax.random.key(2), y.shape)
    gf = jax.grad(lambda x, ks: (fused(x, ks)[0] * w).sum(), argnums=(0, 1))(x, ks)
    ga = jax.grad(lambda x, ks: (apart(x, ks) * w).sum(), argnums=(0, 1))(x, ks)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(ga)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_backward_keeps_the_kernels_not_their_concatenation(capsys):
    """With the layers unrolled, a concatenated kernel kept per layer for the backward pass is a
    second copy of the frozen q/k/v weights (1.3 GiB at 3.5B); the kernels themselves are live."""
    ks = _kernels(jnp.bfloat16)

    def loss(x):
        h = x
        for _ in range(3):
            y, _ = layers.fused_linear(h, [(k, None, None) for k in ks], jnp.bfloat16)
            h = jnp.tanh(y[..., :24])
        return h.astype(jnp.float32).sum()

    print_saved_residuals(loss, jnp.ones((4, 24), jnp.bfloat16))
    saved = capsys.readouterr().out
    assert "tanh" in saved                        # the check sees the residuals at all
    assert "[24,40]" not in saved, saved         # no [in, q+k+v] concatenation is kept
