"""Input-level soft prompts: Prompt Tuning (Lester et al. 2021) and P-tuning v1 (Liu et al. 2021).

Both put ``num_virtual_tokens`` trainable vectors into the input sequence of a frozen encoder; the
task head trains too. Where they sit (see :class:`~jaxpeft.models.bert.BertModel`):

* right after ``[CLS]``: ``[CLS] p_1 .. p_P x_1 .. x_n [SEP]``, so the pooler and the head read the
  real ``[CLS]``, at position 0 as in pretraining;
* position ids ``0 .. n+P``: the prompt occupies positions ``1..P`` exactly as ``P`` words of text
  written after ``[CLS]`` would, and the real tokens move up by ``P``. A prompt initialised from
  text is therefore *the same model* as that text typed into the input (a test checks this), and
  ``max_seq_length + P`` must fit ``max_position_embeddings``;
* token type 0 and attention-mask 1 for every virtual token.

``prompt_position=front`` puts the virtual tokens in front of ``[CLS]`` instead, at positions
``0..P-1`` (``p_1 .. p_P [CLS] x_1 .. x_n [SEP]``), where Hugging Face peft puts them: the pooler
and the head then read the first virtual token, and an adapter moves between jaxpeft and peft with
the same predictions (``tests/test_peft_interop.py``).

Prompt tuning holds the ``[P, H]`` prompt directly (``prompt/prompt_embeddings``). P-tuning
computes it with a prompt encoder (bidirectional LSTM + MLP as in the paper, or an MLP) from a
trainable ``[P, H]`` input (``prompt/input_embeddings``). The encoder is needed only for
training: :meth:`PTuning.export_params` evaluates it once and returns the prompt under prompt
tuning's path, and :meth:`PTuning.for_inference` is plain prompt tuning.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import PROMPT_PATTERN, Method
from jaxpeft.models.family import Family
from jaxpeft.models.layers import Prompt
from jaxpeft.options import at_least, option, positive

PROMPT_INITS = ("random", "sample_vocab", "text")
ENCODER_TYPES = ("lstm", "mlp")
PROMPT_POSITIONS = ("after_cls", "front")
#: peft's ``prompt_tuning_init`` values of our ``prompt_init``
PEFT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def virtual_tokens(default: int = 20, what: str = "virtual tokens") -> int:
    return option(default, f"number of {what} (peft's num_virtual_tokens)", positive)


def prompt_position() -> str:
    return option("after_cls", "where the virtual tokens go: after_cls (right after [CLS], which the head "
                  "reads) or front (in front of [CLS], as peft places them; the head reads the first "
                  "virtual token)", choices=PROMPT_POSITIONS)


# ----------------------------------------------------------------------------- prompt modules


class PromptEmbeddings(nn.Module):
    """Prompt tuning's prompt module: a ``[P, H]`` parameter put after ``[CLS]``.

    Attributes:
        num_virtual_tokens: P.
        hidden_size: H, the encoder's hidden size.
        init_std: standard deviation of the random init (replaced by :meth:`PromptTuning.init_params`
            once the pretrained word embeddings are known).
        front: put the prompt in front of ``[CLS]`` (peft's placement) instead of after it.
    """

    num_virtual_tokens: int
    hidden_size: int
    init_std: float = 0.02
    front: bool = False

    @nn.compact
    def prompts(self) -> jax.Array:
        """The ``[P, H]`` virtual-token embeddings."""
        return self.param("prompt_embeddings", nn.initializers.normal(self.init_std),
                          (self.num_virtual_tokens, self.hidden_size), jnp.float32)

    def __call__(self, batch_size: int, deterministic: bool = True) -> Prompt:
        del batch_size, deterministic  # one prompt for every row, broadcast by the model
        return Prompt(embeds=self.prompts()[None], front=self.front)


def bidirectional_lstm(x: jax.Array, forward: Any, backward: Any) -> jax.Array:
    """One bidirectional LSTM layer over ``x`` ``[P, In]`` with the params of two flax
    ``OptimizedLSTMCell``s (``forward``, ``backward``: ``{ii,if,ig,io}/kernel``,
    ``{hi,hf,hg,ho}/{kernel,bias}``): ``nn.Bidirectional(nn.RNN(fwd), nn.RNN(bwd))``'s output
    ``[P, 2E]`` (zero initial state, outputs in input order, forward then backward features).

    The same arithmetic laid out for few kernels (:func:`_lstm_pair`): the two directions run
    side by side as a batch of two, the input projections of all steps are one matmul, and the
    backward pass is written by hand so the weight gradients are one matmul each after the
    recurrence. Only the recurrence itself is P sequential steps, unrolled (no device loop).
    flax's cells do two matmuls per step and direction in a loop per direction, and autodiff adds
    a weight-gradient matmul per step.
    """
    gates = "ifgo"
    cells = (forward, backward)
    wi = jnp.stack([jnp.concatenate([c[f"i{g}"]["kernel"] for g in gates], -1) for c in cells])
    wh = jnp.stack([jnp.concatenate([c[f"h{g}"]["kernel"] for g in gates], -1) for c in cells])
    bh = jnp.stack([jnp.concatenate([c[f"h{g}"]["bias"] for g in gates], -1) for c in cells])
    hs = _lstm_pair(jnp.stack([x, x[::-1]]), wi, wh, bh)             # the backward cell reads x reversed
    return jnp.concatenate([hs[0], hs[1, ::-1]], axis=-1)


def _lstm_pair_fwd(xs, wi, wh, bh):
    """Two independent LSTMs (one per leading index) over ``xs`` ``[2, P, In]``: hidden states
    ``[2, P, E]``, and what the backward pass needs (gate activations, cell states, inputs)."""
    xi = jnp.einsum("dpi,dik->dpk", xs, wi) + bh[:, None, :]          # [2, P, 4E]
    e = wh.shape[1]
    h = c = jnp.zeros((2, e), xs.dtype)
    hs, cs, acts = [], [], []
    for t in range(xs.shape[1]):
        z = xi[:, t] + jnp.einsum("de,dek->dk", h, wh)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        hs.append(h)
        cs.append(c)
        acts.append(jnp.concatenate([i, f, g, o], axis=-1))
    hs, cs, acts = (jnp.stack(v, axis=1) for v in (hs, cs, acts))
    return hs, (xs, wi, wh, hs, cs, acts)


@jax.custom_vjp
def _lstm_pair(xs, wi, wh, bh):
    return _lstm_pair_fwd(xs, wi, wh, bh)[0]


def _lstm_pair_bwd(res, dhs):
    xs, wi, wh, hs, cs, acts = res
    n, e = xs.shape[1], wh.shape[1]
    zero = jnp.zeros((2, e), xs.dtype)
    dh_next = dc_next = zero
    dz = [None] * n
    for t in reversed(range(n)):
        i, f, g, o = jnp.split(acts[:, t], 4, axis=-1)
        c_prev = cs[:, t - 1] if t else zero
        tc = jnp.tanh(cs[:, t])
        dh = dhs[:, t] + dh_next
        dc = dh * o * (1.0 - tc * tc) + dc_next
        dz[t] = jnp.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                                 dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], axis=-1)
        dc_next = dc * f
        dh_next = jnp.einsum("dk,dek->de", dz[t], wh)
    dz = jnp.stack(dz, axis=1)                                         # [2, P, 4E]
    h_prev = jnp.concatenate([zero[:, None], hs[:, :-1]], axis=1)
    return (jnp.einsum("dpk,dik->dpi", dz, wi), jnp.einsum("dpi,dpk->dik", xs, dz),
            jnp.einsum("dpe,dpk->dek", h_prev, dz), dz.sum(axis=1))


_lstm_pair.defvjp(_lstm_pair_fwd, _lstm_pair_bwd)


class PromptEncoder(nn.Module):
    """P-tuning's prompt module: virtual tokens computed by an encoder from trainable inputs.

    ``lstm`` (the paper's): a bidirectional LSTM of ``encoder_num_layers`` layers with
    ``encoder_hidden_size`` units E per direction, then ``Dense(2E) -> ReLU -> Dense(H)``.
    ``mlp``: ``Dense(E) -> ReLU -> Dense(E) -> ReLU -> Dense(H)``. Either reads a ``[P, H]``
    parameter ``input_embeddings`` and returns a ``[P, H]`` prompt; the LSTM lets every virtual
    token depend on the others, which the paper found to stabilise training.

    Attributes:
        num_virtual_tokens: P.
        hidden_size: H, the encoder's hidden size (input and output width).
        encoder_type: ``lstm`` or ``mlp``.
        encoder_hidden_size: E.
        encoder_num_layers: LSTM layers (``lstm`` only).
        front: put the prompt in front of ``[CLS]`` (peft's placement) instead of after it.
    """

    num_virtual_tokens: int
    hidden_size: int
    encoder_type: str = "lstm"
    encoder_hidden_size: int = 384
    encoder_num_layers: int = 2
    front: bool = False

    @nn.compact
    def prompts(self) -> jax.Array:
        """The ``[P, H]`` prompt computed from ``input_embeddings``."""
        e = self.param("input_embeddings", nn.initializers.normal(1.0),
                       (self.num_virtual_tokens, self.hidden_size), jnp.float32)
        width = self.encoder_hidden_size
        if self.encoder_type == "lstm":
            if self.is_initializing():
                # flax's cells create the params (names, shapes, initialisers: the checkpoint format)
                h = e[None]
                for i in range(self.encoder_num_layers):
                    forward = nn.RNN(nn.OptimizedLSTMCell(width, name=f"lstm_{i}_forward"))
                    backward = nn.RNN(nn.OptimizedLSTMCell(width, name=f"lstm_{i}_backward"))
                    h = nn.Bidirectional(forward, backward)(h)
                h = h[0]
            else:
                h = e
                params = self.variables["params"]
                for i in range(self.encoder_num_layers):
                    h = bidirectional_lstm(h, params[f"lstm_{i}_forward"], params[f"lstm_{i}_backward"])
            h = nn.relu(nn.Dense(2 * width, name="mlp_in")(h))
        elif self.encoder_type == "mlp":
            h = nn.relu(nn.Dense(width, name="mlp_in")(e))
            h = nn.relu(nn.Dense(width, name="mlp_hidden")(h))
        else:
            raise UserError(f"unknown encoder_type {self.encoder_type!r}; known: {', '.join(ENCODER_TYPES)}")
        return nn.Dense(self.hidden_size, name="mlp_out")(h)

    def __call__(self, batch_size: int, deterministic: bool = True) -> Prompt:
        del batch_size, deterministic
        return Prompt(embeds=self.prompts()[None], front=self.front)


# ----------------------------------------------------------------------------- initialisation


def ordinary_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids of the vocabulary's ordinary whole-word tokens: no special tokens, no ``[unusedN]``
    placeholders, no ``##`` continuation pieces."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for tok, i in tokenizer.get_vocab().items()
           if i not in special and not tok.startswith("##")
           and not (len(tok) > 2 and tok.startswith("[") and tok.endswith("]"))]
    if not ids:
        raise UserError("prompt_init=sample_vocab: the tokenizer has no ordinary tokens to sample")
    return np.asarray(sorted(ids), np.int32)


def text_token_ids(tokenizer: Any, text: str, length: int) -> np.ndarray:
    """Token ids of ``text`` (no special tokens), repeated or cut to ``length``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"prompt_init_text {text!r} tokenizes to nothing")
    return np.resize(np.asarray(ids, np.int32), length)


def initial_prompt(word_embeddings: jax.Array, num_virtual_tokens: int, prompt_init: str,
                   tokenizer: Any, text: str | None, rng: jax.Array) -> jax.Array:
    """A ``[P, H]`` prompt: ``random`` (normal with the word embeddings' std), ``sample_vocab``
    (rows of uniformly sampled ordinary tokens) or ``text`` (rows of the tokenized text)."""
    if prompt_init == "random":
        std = jnp.std(word_embeddings)
        return std * jax.random.normal(rng, (num_virtual_tokens, word_embeddings.shape[1]), jnp.float32)
    if tokenizer is None:
        raise UserError(f"prompt_init={prompt_init} needs the model's tokenizer")
    if prompt_init == "sample_vocab":
        pool = ordinary_token_ids(tokenizer)
        ids = np.asarray(jax.random.choice(rng, pool, (num_virtual_tokens,), replace=False))
    else:
        ids = text_token_ids(tokenizer, text, num_virtual_tokens)
    return jnp.asarray(word_embeddings)[ids]


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass
class PromptTuning(Method):
    """Prompt tuning: ``num_virtual_tokens`` trainable input embeddings after ``[CLS]``; the encoder
    is frozen; the prompt and the head train.

    Attributes:
        num_virtual_tokens: number of virtual tokens (peft's name; default 20).
        prompt_init: ``random`` | ``sample_vocab`` | ``text``.
        prompt_init_text: the text for ``prompt_init=text`` (peft: ``prompt_tuning_init_text``).
        prompt_position: ``after_cls`` (default) or ``front`` (peft's placement).
    """

    name = "prompt"
    summary = "--num_virtual_tokens input embeddings after [CLS]"
    supports_packing = False
    schedule = "prompt"
    peft_type = "PROMPT_TUNING"
    mix = "prompt"
    mix_same = ("num_virtual_tokens", "prompt_position")
    num_virtual_tokens: int = virtual_tokens()
    prompt_init: str = option("random", "how the prompt starts: random, sample_vocab (rows of sampled "
                              "vocabulary tokens), text (rows of --prompt_init_text's tokens)",
                              choices=PROMPT_INITS)
    prompt_init_text: str | None = option(None, "the text for --prompt_init=text (peft: "
                                          "prompt_tuning_init_text)")
    prompt_position: str = prompt_position()

    def validate(self):
        if self.prompt_init == "text" and not (self.prompt_init_text or "").strip():
            raise UserError("prompt_init=text needs --prompt_init_text")

    def prompt_module(self, family: Family, config: Any) -> nn.Module:
        return PromptEmbeddings(self.num_virtual_tokens, config.hidden_size, config.initializer_range,
                                self.prompt_position == "front", name="prompt")

    def extra_positions(self) -> int:
        return self.num_virtual_tokens

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.match(params, include=PROMPT_PATTERN)

    def init_params(self, params: Any, family: Family, *, tokenizer: Any = None, rng: Any = None) -> Any:
        flat = masks.flatten(params)
        rng = jax.random.key(0) if rng is None else rng
        flat["prompt/prompt_embeddings"] = initial_prompt(
            flat[family.word_embeddings], self.num_virtual_tokens, self.prompt_init, tokenizer,
            self.prompt_init_text, rng)
        return masks.unflatten(flat, params)

    def peft_config(self, family: Family, config: Any) -> dict[str, Any]:
        text = self.prompt_init == "text"
        return dict(prompt_tuning_init=PEFT_INITS.get(self.prompt_init, "RANDOM"),
                    prompt_tuning_init_text=self.prompt_init_text if text else None, tokenizer_kwargs=None)

    def peft_name(self, path, arrays, family):
        return {"prompt_embeddings": np.asarray(arrays[path])} if path == "prompt/prompt_embeddings" else None

    @classmethod
    def from_peft_tensor(cls, name, tensor, config):
        return {"prompt/prompt_embeddings": np.asarray(tensor)} if name == "prompt_embeddings" else None

    @classmethod
    def from_peft(cls, cfg, where):
        """A peft prompt (prompt tuning's or P-tuning's computed one): in front of ``[CLS]``, where
        peft puts it."""
        return cls(num_virtual_tokens=int(cfg["num_virtual_tokens"]), prompt_position="front")


@dataclasses.dataclass
class PTuning(Method):
    """P-tuning v1: virtual tokens after ``[CLS]`` produced by a prompt encoder; the encoder and the
    head train, the BERT encoder is frozen. Export keeps the computed prompt only.

    Attributes:
        num_virtual_tokens: number of virtual tokens (default 20).
        encoder_type: ``lstm`` (bidirectional LSTM + MLP, the paper's) or ``mlp``.
        encoder_hidden_size: width E of the prompt encoder; ``None``: ``H // 2`` per LSTM
            direction (so the two directions together are ``H`` wide, as in the P-tuning code),
            ``H`` for the MLP.
        encoder_num_layers: LSTM layers (default 2, as peft).
        prompt_position: ``after_cls`` (default) or ``front`` (peft's placement).
    """

    name = "ptuning"
    summary = "a prompt encoder (--encoder_type=lstm|mlp) producing those embeddings"
    supports_packing = False
    schedule = "prompt"
    peft_type = "P_TUNING"
    num_virtual_tokens: int = virtual_tokens()
    encoder_type: str = option("lstm", "P-tuning's prompt encoder: lstm (bidirectional LSTM + MLP, the "
                               "paper's) or mlp", choices=ENCODER_TYPES)
    encoder_hidden_size: int | None = option(
        None, "width of the prompt encoder / prefix MLP (default: H/2 per LSTM direction, H for the "
        "MLP; 512 for prefix tuning)", positive)
    encoder_num_layers: int = option(2, "LSTM layers of P-tuning's encoder", at_least(1))
    prompt_position: str = prompt_position()

    def encoder(self, hidden_size: int, name: str | None = None) -> PromptEncoder:
        width = self.encoder_hidden_size or (hidden_size // 2 if self.encoder_type == "lstm" else hidden_size)
        return PromptEncoder(self.num_virtual_tokens, hidden_size, self.encoder_type, width,
                             self.encoder_num_layers, self.prompt_position == "front", name=name)

    def prompt_module(self, family: Family, config: Any) -> nn.Module:
        return self.encoder(config.hidden_size, name="prompt")

    def extra_positions(self) -> int:
        return self.num_virtual_tokens

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.match(params, include=PROMPT_PATTERN)

    def compute_prompt(self, params: Any) -> jax.Array:
        """The ``[P, H]`` prompt the encoder produces from ``params["prompt"]``."""
        hidden = params["prompt"]["input_embeddings"].shape[-1]
        encoder = self.encoder(hidden)
        # one compiled program, not an op-by-op dispatch of the LSTM's steps
        return jax.jit(lambda a: encoder.apply({"params": a}, method=PromptEncoder.prompts))(params["prompt"])

    def export_params(self, params: Any, family: Family, heads=("classifier",), modules_to_save=()) -> dict[str, Any]:
        """The computed prompt (under prompt tuning's path) and the head; no encoder."""
        return {"prompt/prompt_embeddings": self.compute_prompt(params),
                **self.head_params(params, heads, modules_to_save)}

    def peft_config(self, family: Family, config: Any) -> dict[str, Any]:
        return dict(encoder_reparameterization_type=str(self.encoder_type).upper(),
                    encoder_hidden_size=self.encoder(config.hidden_size).encoder_hidden_size,
                    encoder_num_layers=int(self.encoder_num_layers), encoder_dropout=0.0)

    def peft_name(self, path, arrays, family):
        return {"prompt_embeddings": np.asarray(arrays[path])} if path == "prompt/prompt_embeddings" else None

    @classmethod
    def from_peft_tensor(cls, name, tensor, config):
        return PromptTuning.from_peft_tensor(name, tensor, config)

    @classmethod
    def from_peft(cls, cfg, where):
        return PromptTuning.from_peft(cfg, where)

    def for_inference(self) -> Method:
        return PromptTuning(num_virtual_tokens=self.num_virtual_tokens, prompt_position=self.prompt_position)
