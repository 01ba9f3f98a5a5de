"""LLaMA / Vicuna decoder in Flax NNX, numerically the HF `LlamaForCausalLM`.

Parameter names mirror HF (`input_layernorm`, `self_attn.q_proj`, `lm_head`) so conversion is a
table (see `vtimellm_jax/convert/llama.py`). Kernels are stored [in, out]. RoPE uses HF's
rotate-half layout, so HF q/k weights load without permutation.

A few architecture options (bias on q/k/v, rope on part of each head in the interleaved layout,
fused q/k/v and gate/up projections) make the same modules the ChatGLM3 family
(`models/chatglm.py`); everything else (scan, cache, kernels, sharding, generation) is shared.

The decoder layers are one module whose variables are stacked along a leading `layers` axis
(`model/layers/self_attn/q_proj/kernel` is [L, D, N*H]), created by `nnx.vmap` over the layer
constructor and run as one `lax.scan`: XLA compiles one layer body, and nothing restacks weights
inside a step. Answering converts them to one module per layer, run unrolled
(`models/answering.py`). The KV cache (`models/kv_cache.py`) is carried through the layers and
written in place. HF's per-layer names (`model.layers.N.`) live only in the conversion tables.

Shapes: L layers, B batch, T query length, S key length, D model width, N query heads, K kv heads,
H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vtimellm_jax import cli_types, sharding
from vtimellm_jax.sharding import target_platform
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import kv_cache, per_head_attention, quant
from vtimellm_jax.models.kv_cache import CacheStep, KVCache
from vtimellm_jax.models.lora import ALL_TARGETS, Linear

_DTYPES = {name: jnp.dtype(name) for name in cli_types.DTYPES}
ACTIVATION_AXES = ("batch", None, None)  # [B, T, D] between layers
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "per_head")
REMAT_MODES = ("none", "full", "save_dots", "lora")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a LLaMA-2-style decoder, and the run settings a module is built with.

  The architecture (sizes, vocabulary, norms, rope, time code) is what a checkpoint needs and what
  model.json stores (`architecture()`). The `RUN_SETTINGS` (compute and storage dtype, attention
  kernel, rematerialisation) are how one run executes it: the caller chooses them (a stage config,
  `chat --dtype`); a model directory loads by default in the dtype its arrays are stored in.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"  # storage of the (frozen) base weights
  attention_impl: str = "auto"  # auto | xla | cudnn | splash (TPU Pallas kernel) | per_head (CPU)
  remat: str = "none"  # none | full | save_dots | lora (`remat_policy`; applied to the scanned layer body)
  # The frozen decoder projections held quantised ("" none | nf4 | fp4 | int8; models/quant.py), their
  # block scales doubly quantised or not: the QLoRA base. lm_head and the embeddings stay in param_dtype.
  quant: str = ""
  double_quant: bool = True
  # VTimeLLM only: > 0 adds a frame-time code of this relative size to video tokens (models/time_code.py;
  # an option for tiny models). 0 for Vicuna and the release.
  time_code: float = 0.0
  # Options of other members of the family (models/chatglm.py); the defaults are LLaMA's.
  qkv_bias: bool = False  # bias on the query/key/value projection (not on o_proj or the MLP)
  partial_rotary_factor: float = 1.0  # rope rotates the first fraction of each head's dims, the rest pass
  rope_interleaved: bool = False  # rotate pairs (2i, 2i+1) (GLM) instead of halves (i, i + H/2) (LLaMA)
  # One `qkv_proj` [D, (N + 2K) * H] and one `gate_up_proj` [D, 2 * I] whose outputs are split, as
  # ChatGLM's checkpoints (and the LoRA the release puts on each fused Linear) have them.
  fused_projections: bool = False

  RUN_SETTINGS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_impl", "remat", "quant", "double_quant")

  def __post_init__(self):
    if self.hidden_size % self.num_heads and self.head_dim is None:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
    if self.quant and self.quant not in quant.QTYPES:
      raise ValueError(f"quant must be one of {quant.QTYPES} (or empty for none), got {self.quant!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
      raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and rotate an even "
                       f"number of the {self.head_size} head dims")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def rotary_dim(self) -> int:
    """The leading dims of each head that rope rotates (HF: int(head_dim * partial_rotary_factor))."""
    return int(self.head_size * self.partial_rotary_factor)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
    """Returns the config of an HF `config.json` dict; non-LLaMA architectures are refused."""
    problems = []
    if hf.get("model_type") not in ("llama", None):
      problems.append(f"model_type is {hf.get('model_type')!r}, expected 'llama'")
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if not any(a.startswith("Llama") for a in arch):
      problems.append(f"architectures {arch} is not a LLaMA causal LM")
    if hf.get("tie_word_embeddings"):
      problems.append("tie_word_embeddings=true is not LLaMA-2/Vicuna (untied lm_head expected)")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
      problems.append(f"rope_scaling {rope_scaling} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      problems.append(f"hidden_act {hf.get('hidden_act')!r}, expected 'silu'")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    problems += [f"missing key {k!r}" for k in required if k not in hf]
    if problems:
      raise UserError(f"{source}: not a supported LLaMA config:\n" + "\n".join(f"  - {p}" for p in problems))
    rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        **overrides,
    )

  @classmethod
  def from_hf_file(cls, path: str | pathlib.Path, **overrides) -> LlamaConfig:
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "config.json"
    if not path.is_file():
      raise UserError(f"{path}: config.json not found")
    try:
      hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise UserError(f"{path}: invalid JSON ({e})") from e
    return cls.from_hf_dict(hf, source=str(path), **overrides)

  def architecture(self) -> dict[str, Any]:
    """Returns the fields a model directory stores: every field but the run settings."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_SETTINGS}

  @classmethod
  def from_architecture(cls, stored: dict[str, Any], **settings) -> LlamaConfig:
    """Returns the config of model.json's "config" with run `settings` (run settings stored by older
    versions are ignored: they belong to the run that wrote them)."""
    return cls(**{k: v for k, v in stored.items() if k not in cls.RUN_SETTINGS}, **settings)

  def to_hf_dict(self) -> dict[str, Any]:
    """Returns an HF LLaMA `config.json` dict describing this architecture (LLaMA options only)."""
    if self.qkv_bias or self.partial_rotary_factor != 1 or self.rope_interleaved or self.fused_projections:
      raise ValueError("not a LLaMA architecture (ChatGLM options set); see models/chatglm.py")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_size, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "attention_bias": False, "mlp_bias": False,
    }


# The Vicuna family's presets (models/families.py names them): LLaMA-2 architectures.
LORA_TARGETS = ALL_TARGETS  # the release's `find_all_linear_names`: every projection but lm_head


def vicuna_7b(**overrides) -> LlamaConfig:
  """Returns Vicuna-7B v1.5 (LLaMA-2 7B): LlamaConfig's defaults."""
  return LlamaConfig(**overrides)


def vicuna_13b(**overrides) -> LlamaConfig:
  """Returns Vicuna-13B v1.5 (LLaMA-2 13B): 40 layers, width 5120, 40 heads, FFN 13824."""
  base = dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
  return LlamaConfig(**{**base, **overrides})


def tiny(**overrides) -> LlamaConfig:
  """Returns a tiny LLaMA for tests and the quickstart: 2 layers, width 64, 4 heads, vocabulary 512."""
  base = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=4,
              max_position_embeddings=2048)
  return LlamaConfig(**{**base, **overrides})


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""

  def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(dtype) * h.astype(dtype)


def rope_tables(positions: jax.Array, rotary_dim: int, theta: float, interleaved: bool = False):
  """Returns (cos, sin) float32[B, T, rotary_dim] for integer positions[B, T].

  Frequency i of the rotary_dim / 2 serves dims (i, i + rotary_dim / 2) in HF LLaMA's layout (halves
  repeated) and dims (2i, 2i + 1) in the interleaved one (HF Glm, ChatGLM: each repeated in place).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.repeat(freqs, 2, axis=-1) if interleaved else jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_btnh: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
  """Rotates the first cos.shape[-1] dims of x[B, T, heads, H] by position; the other dims pass.

  LLaMA's rotate_half pairs dim i with i + half; the interleaved layout pairs 2i with 2i + 1.
  """
  rot, rest = x_btnh[..., :cos.shape[-1]], x_btnh[..., cos.shape[-1]:]
  if interleaved:
    pairs = rot.reshape(*rot.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
  else:
    half = rot.shape[-1] // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x_btnh.dtype), sin[:, :, None, :].astype(x_btnh.dtype)
  out = rot * cos + rotated * sin
  return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def attention_impl(config: LlamaConfig) -> str:
  """Returns the kernel `config.attention_impl` means on the platform being compiled for ("auto" resolved)."""
  if config.attention_impl != "auto":
    return config.attention_impl
  # The XLA path materialises [B, N, T, S] scores: on a CPU one head at a time is about twice as
  # fast (models/per_head_attention.py); on GPU/TPU fused kernels for 16-bit compute (cuDNN flash
  # attention, Pallas splash), and fp32 takes the exact XLA path.
  platform = target_platform()
  if platform == "cpu":
    return "per_head"
  if config.dtype not in ("bfloat16", "float16"):
    return "xla"
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


_SPLASH_PAD = 128  # the kernel's blocks are multiples of the 128-wide lane dimension


@functools.lru_cache(maxsize=16)
def _splash_kernel(seq_len: int, num_heads: int, interpret: bool):
  """Returns the causal splash-attention kernel for one row: (q [N, T, H], k, v [K, T, H], segment_ids)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top

  block = next(b for b in (512, 256, 128) if seq_len % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
  # The mask tables become arrays; built at compile time they are constants, not tracers of one trace.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  residual_checkpoint_name=_SPLASH_RESIDUALS)


def splash_attention(q_btnh, k_btkh, v_btkh, lengths_b):
  """Returns float[B, T, N, H]: causal attention, keys at or past each row's length masked (TPU splash kernel).

  Real queries see exactly what the XLA path with `key_value_seq_lengths` shows them; a padding
  query sees the padding keys up to itself, so its output is finite but differs. Off TPU the
  kernel runs in Pallas interpret mode (slow; for tests). Under a mesh it runs per shard of the
  batch (and heads) via shard_map, as a Pallas call cannot be partitioned by XLA.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top

  t, h = q_btnh.shape[1], q_btnh.shape[3]
  pad = -t % _SPLASH_PAD
  interpret = target_platform() != "tpu"

  def per_shard(q, k, v, lengths):
    kernel = _splash_kernel(t + pad, q.shape[2], interpret)
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    # Splash does not scale the scores itself.
    q = heads_first(q * jnp.asarray(h**-0.5, q.dtype))
    # Segment 1 = real tokens, 0 = padding; a query attends only within its own segment.
    segments = (jnp.arange(t + pad)[None, :] < lengths[:, None]).astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q, heads_first(k), heads_first(v), segments)
    return out.transpose(0, 2, 1, 3)[:, :t]

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return per_shard(q_btnh, k_btkh, v_btkh, lengths_b)
  q_spec = sharding.spec_for(("batch", None, "q_heads", None), q_btnh.shape, mesh)
  kv_spec = sharding.spec_for(("batch", None, "kv_heads", None), k_btkh.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # split heads only where query and kv heads split alike
    q_spec, kv_spec = (jax.sharding.PartitionSpec(s[0], None, None, None) for s in (q_spec, kv_spec))
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, jax.sharding.PartitionSpec(q_spec[0])),
                       out_specs=q_spec, check_vma=False)(q_btnh, k_btkh, v_btkh, lengths_b)


class LlamaAttention(nnx.Module):
  """Causal self-attention with grouped KV heads and an optional (stacked) KV cache."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_size
    kw = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype, quant=config.quant,
              double_quant=config.double_quant, rngs=rngs)
    if config.fused_projections:
      # Columns [q | k | v], as ChatGLM's query_key_value (split after the matmul).
      self.qkv_proj = Linear(d, (n + 2 * k) * h, axes=("embed", "q_heads"), use_bias=config.qkv_bias, **kw)
    else:
      self.q_proj = Linear(d, n * h, axes=("embed", "q_heads"), use_bias=config.qkv_bias, **kw)
      self.k_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **kw)
      self.v_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **kw)
    self.o_proj = Linear(n * h, d, axes=("q_heads", "embed"), **kw)

  def _qkv(self, x_btd):
    """Returns q [B, T, N, H], k and v [B, T, K, H], before rope."""
    cfg = self.config
    b, t, _ = x_btd.shape
    if cfg.fused_projections:
      q_width, kv_width = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
      q, k, v = jnp.split(self.qkv_proj(x_btd), [q_width, q_width + kv_width], axis=-1)
    else:
      q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
    return (q.reshape(b, t, cfg.num_heads, cfg.head_size), k.reshape(b, t, cfg.num_kv_heads, cfg.head_size),
            v.reshape(b, t, cfg.num_kv_heads, cfg.head_size))

  def __call__(self, x_btd, cos, sin, lengths_b, cache: KVCache | None = None, layer=None,
               cache_step: CacheStep | None = None):
    """Returns (out float[B, T, D], updated cache or None).

    Without a cache: causal attention over the T tokens, keys past each row's length masked
    (right padding). With the stacked cache, this layer's index `layer` and `cache_step`: a prefill
    (window 0) attends as without a cache and writes the T tokens at positions 0 .. T - 1 of rows
    row0 onward; a decode step writes the new tokens where `cache_step` says and attends to the
    slots written at or before them (`kv_cache.decode_attention`).
    """
    cfg = self.config
    b, t, _ = x_btd.shape
    q, k, v = self._qkv(x_btd)
    q, k = apply_rope(q, cos, sin, cfg.rope_interleaved), apply_rope(k, cos, sin, cfg.rope_interleaved)
    # Named for the "lora" remat policy, which keeps them instead of recomputing their matmuls.
    q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
    new_cache = None
    if cache is not None and cache_step.window:
      out = kv_cache.decode_attention(q, k, v, cache, layer, cache_step)
      new_cache = kv_cache.write_decode(cache, layer, cache_step, k, v, after=out)
    else:
      impl = attention_impl(cfg)
      if impl == "splash":
        out = splash_attention(q, k, v, lengths_b)
      elif impl == "per_head":
        out = per_head_attention.per_head_attention(q, k, v, lengths_b)
      else:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths_b,
                                           implementation=impl)
      if cache is not None:
        new_cache = kv_cache.write_prefill(cache, layer, cache_step.row0, k, v)
    out = checkpoint_name(out.reshape(b, t, cfg.num_heads * cfg.head_size), "attention_out")
    return self.o_proj(out), new_cache


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); gate and up as one `gate_up_proj` [gate | up] when fused."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    d, m = config.hidden_size, config.intermediate_size
    kw = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype, quant=config.quant,
              double_quant=config.double_quant, rngs=rngs)
    self.fused = config.fused_projections
    if self.fused:
      self.gate_up_proj = Linear(d, 2 * m, axes=("embed", "mlp"), **kw)
    else:
      self.gate_proj = Linear(d, m, axes=("embed", "mlp"), **kw)
      self.up_proj = Linear(d, m, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(m, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x_btd):
    if self.fused:
      gate, up = jnp.split(self.gate_up_proj(x_btd), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x_btd), self.up_proj(x_btd)
    gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
    return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.storage_dtype)
    self.self_attn = LlamaAttention(config, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.storage_dtype)
    self.mlp = LlamaMLP(config, rngs)

  def __call__(self, x_btd, cos, sin, lengths_b, cache=None, layer=None, cache_step=None):
    h, new_cache = self.self_attn(self.input_layernorm(x_btd), cos, sin, lengths_b, cache, layer, cache_step)
    # Named for the "lora" remat policy: the norm's backward needs it, and rebuilding it would redo o_proj.
    x_btd = checkpoint_name(x_btd + h, "post_attention_hidden")
    x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
    return x_btd, new_cache


# What the "lora" policy keeps of each layer, besides the attention kernel's residuals: the values
# named with checkpoint_name in the layer's modules (the residual stream after attention, the norm's
# input, as well, since rebuilding it would redo o_proj).
_LORA_SAVED = ("query", "key", "value", "post_attention_hidden", "mlp_gate", "mlp_up")
# The cuDNN attention's forward primitive (jax/_src/cudnn/fused_attention_stablehlo.py): its outputs,
# the attention output and the softmax statistics, are its custom backward's residuals.
_CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"
# The name splash attention gives its residuals (its output and the scores' log-sum-exp).
_SPLASH_RESIDUALS = "splash_residuals"


def remat_policy(config: LlamaConfig):
  """Returns the jax.checkpoint policy of `config.remat` for the attention kernel being compiled (None: save nothing).

  "lora" keeps what the backward pass would otherwise recompute with a frozen matmul: q and k after
  rope, v, the attention output (o_proj's input), the hidden state after attention, and the MLP's
  gate and up outputs; the backward pass recomputes the norms, rope, LoRA's x @ A (with its dropout
  mask) and silu(gate) * up. A fused attention kernel keeps its own residuals instead of the
  attention output: its forward is one primitive whose outputs are not named values, so a policy of
  names alone would run it again in the backward pass (cuDNN: the policy saves the primitive's
  outputs; splash: the kernel names them). The XLA and per-head kernels recompute their forward
  from the saved q, k and v: the XLA kernel's [B, N, T, S] probabilities are not worth keeping.
  """
  if config.remat == "none":
    return jax.checkpoint_policies.everything_saveable
  if config.remat == "full":
    return None
  if config.remat == "save_dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  names = jax.checkpoint_policies.save_only_these_names
  impl = attention_impl(config)
  if impl == "cudnn":
    return jax.checkpoint_policies.save_from_both_policies(
        names(*_LORA_SAVED), lambda prim, *_, **__: prim.name == _CUDNN_ATTENTION_FORWARD)
  if impl == "splash":
    return names(*_LORA_SAVED, _SPLASH_RESIDUALS)
  return names(*_LORA_SAVED, "attention_out")


class LlamaModel(nnx.Module):
  """Embeddings, the stacked decoder layers and the final norm (HF `LlamaModel`)."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    embed = nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.hidden_size), config.storage_dtype)
    self.embed_tokens = nnx.Param(embed, out_sharding=("vocab", "embed"), eager_sharding=False)
    self.layers = stacked_layers(config, rngs)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.storage_dtype)

  def embed(self, input_ids_bt: jax.Array) -> jax.Array:
    """Returns float[B, T, D] token embeddings (ids < 0 map to row 0; callers replace them)."""
    ids = jnp.where(input_ids_bt < 0, 0, input_ids_bt)
    return jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.config.compute_dtype)

  def __call__(self, inputs_embeds_btd, positions_bt, lengths_b, cache: KVCache | None = None,
               cache_step: CacheStep | None = None, return_hidden_states=False):
    """Returns (final hidden float[B, T, D], updated KVCache or None, hidden states tuple or None).

    Stacked layers run as one `lax.scan` over their stacked variables; layers held one module per
    layer (`models/answering.py`) run one after another, unrolled. With a cache, the layers carry it
    and each writes its own slot, as `cache_step` says (a prefill by default).
    """
    cfg = self.config
    cos, sin = rope_tables(positions_bt, cfg.rotary_dim, cfg.rope_theta, cfg.rope_interleaved)
    x = sharding.constrain(inputs_embeds_btd.astype(cfg.compute_dtype), ACTIVATION_AXES)
    if cache is not None and cache_step is None:
      cache_step = CacheStep()
    if isinstance(self.layers, nnx.List):
      per_layer = []
      for index, layer in enumerate(self.layers):
        x, cache = layer(x, cos, sin, lengths_b, cache, index, cache_step)
        per_layer.append(x)
      return self._finish(inputs_embeds_btd, x, cache, per_layer if return_hidden_states else None)
    graphdef, lora_state, state = nnx.split(self.layers, nnx.LoRAParam, ...)
    # LoRA factors are stored in fp32 and computed in the layer dtype: cast once, before the scan.
    # The layers see the same values, and the scan's stacked gradients of them stay in the compute
    # dtype (what the matmuls give anyway) until the cast back, not in fp32: less step memory
    # (docs/performance.md, "Step memory").
    lora_state = jax.tree.map(lambda a: a.astype(cfg.compute_dtype), lora_state)

    def body(carry, xs):
      x, cache = carry
      layer_state, index = xs
      layer = nnx.merge(graphdef, *layer_state)
      x, cache = layer(x, cos, sin, lengths_b, cache, index, cache_step)
      # The carry keeps the batch split over the data axes in every iteration.
      x = sharding.constrain(x, ACTIVATION_AXES)
      # The layer's dropout counters advance; they go back to the stack after the scan.
      return (x, cache), (x if return_hidden_states else None, nnx.state(layer, nnx.RngCount))

    if cfg.remat != "none" and cache is None:
      body = jax.checkpoint(body, policy=remat_policy(cfg), prevent_cse=False)
    (x, cache), (per_layer, counts) = jax.lax.scan(body, (x, cache), ((lora_state, state), jnp.arange(cfg.num_layers)))
    nnx.update(self.layers, counts)
    return self._finish(inputs_embeds_btd, x, cache, per_layer if return_hidden_states else None)

  def _finish(self, inputs_embeds_btd, x, cache, per_layer):
    """Returns (final hidden, cache, hidden states or None) from the last layer's output."""
    x = self.norm(x)
    if per_layer is None:
      return x, cache, None
    # HF reports the embeddings, each layer's output, and the last one after the final norm.
    return x, cache, (inputs_embeds_btd.astype(self.config.compute_dtype), *per_layer[:-1], x)


def stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> LlamaDecoderLayer:
  """Returns the decoder layers as one module whose variables lead with a `layers` axis of size L.

  Each layer draws its initial weights from its own split of `rngs`; the axis carries the logical
  name "layers" in every variable's sharding names.
  """

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.num_layers,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return LlamaDecoderLayer(config, rngs)

  return make(rngs)


class LlamaForCausalLM(nnx.Module):
  """LLaMA with its untied `lm_head`."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, rngs)
    self.lm_head = Linear(config.hidden_size, config.vocab_size, axes=("embed", "vocab"),
                          dtype=config.compute_dtype, param_dtype=config.storage_dtype, rngs=rngs)

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, return_hidden_states=False):
    """Returns logits float[B, T, V] (and hidden states when asked) for right-padded token ids."""
    b, t = input_ids_bt.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask_bt is None else attention_mask_bt
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    hidden, _, states = self.model(self.model.embed(input_ids_bt), positions, mask.sum(-1).astype(jnp.int32),
                                   return_hidden_states=return_hidden_states)
    logits = self.lm_head(hidden)
    return (logits, states) if return_hidden_states else logits

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """Returns the zeroed KV cache of every layer: k, v float[L, B, K, max_len, H] (one buffer per
    layer in the answering layout)."""
    cfg = self.config
    return KVCache.zeros(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_size, dtype or cfg.compute_dtype,
                         per_layer=isinstance(self.model.layers, nnx.List))
