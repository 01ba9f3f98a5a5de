"""Weight-only block quantisation of frozen kernels (nf4, fp4, int8), as pure functions on arrays.

The QLoRA base: a frozen kernel is stored as 4- or 8-bit codes with one scale per block of
`blocksize` (64) consecutive elements of its last axis, and `dequantize` gives the kernel back for
the matmul (`quantized_matmul`, whose backward dequantises it again). The 4-bit types are bitsandbytes' (`quantize_4bit` / `dequantize_4bit`): a block's
elements are divided by the block's absolute maximum (multiplied by its reciprocal) and each is
given the code of the nearest value of a 16-entry codebook, a value on a midpoint the lower code;
codes go two to a byte, the first in the high four bits. Double quantisation (bitsandbytes'
`compress_statistics`, the release's default) stores the block scales less their mean as 8-bit
codes of bitsandbytes' signed dynamic map, in blocks of 256 scales with one float absmax each.

  nf4   the NormalFloat codebook of the QLoRA paper (Dettmers et al. 2023, appendix E): quantiles of
        a standard normal, normalised to [-1, 1], with an exact zero.
  fp4   bitsandbytes' 4-bit float: a sign bit, two exponent bits and one mantissa bit, normalised by
        its largest magnitude (12).
  int8  symmetric 8-bit integers, one scale per block: qwix's `quantize` / `dequantize` (scale =
        absmax / 127.5, round half to even, saturating), not bitsandbytes' LLM.int8 (a row-wise
        format with outlier columns kept in 16 bits, which a weight-only matmul cannot use).

Every number is the one bitsandbytes' CPU functions give for the same tensor (tests/test_model_quant.py
checks codes, scales and dequantised values bit for bit), which fixes four details: the nested 8-bit
codes are the ones of its 65536-entry lookup table (a value's code is that of its table bin, for a
small fraction of values the second-nearest code), not its CUDA kernel's binary search;
the dynamic map is built with its fused multiply-adds; an fp4 value that rounds to zero from above
gets code 8 (sign bit set) and one from below code 0 (the order its quantiser sorts the two zero
codes in); an all-zero block keeps absmax 0. Subnormal floats are the exception: XLA flushes them
to zero, bitsandbytes does not. docs/models.md ("Quantized base (QLoRA)") says why this is not qwix's nf4.

Shapes: a tensor float[*B, *R, C], B the `batch_dims` leading axes (a stacked kernel's layers: each
index is one tensor, quantised on its own as bitsandbytes quantises each layer's weight), C divisible
by the block size. Blocks never cross rows, so codes and scales keep the tensor's leading axes (and
can carry its logical axis names); the nested blocks of 256 run over a tensor's scales flattened in
row-major order, bitsandbytes' order.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

QTYPES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # elements per scale: bitsandbytes' default, the QLoRA recipe's
NESTED_BLOCKSIZE = 256  # scales per nested absmax under double quantisation, as bitsandbytes fixes it

# NormalFloat4: the 16 values of the QLoRA paper's appendix E, in code order (code i is NF4[i]).
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
# FP4 magnitudes by the code's three low bits (exponent bias 2; 0b001 the one subnormal, 2^-4);
# bit 3 is the sign. The codebook is these over the largest, 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


class QuantizedWeight(nnx.Variable):
  """A part of a quantised frozen kernel (codes, scales, nested scales, offset): never a `Param`,
  so no optimizer, trainable filter or `BASE_PARAMS` selects it, and model directories do not store it."""


@flax.struct.dataclass
class QuantizedArray:
  """A tensor quantised in blocks of its last axis; `dequantize` gives it back.

  For a tensor float[*B, *R, C], N = prod(R) * C / blocksize blocks per tensor:
    codes    uint8[*B, *R, C / 2] (nf4, fp4: two codes a byte, the first in the high bits) or
             int8[*B, *R, C] (int8)
    scales   float32[*B, *R, C / blocksize]: each block's absmax (nf4, fp4) or qwix's scale (int8);
             under double quantisation uint8 codes of (scale - offset) in the dynamic 8-bit map
    scales2  float32[*B, ceil(N / 256)] (double quantisation only): each nested block's absmax
    offset   float32[*B] (double quantisation only): the mean of the tensor's scales
  """

  codes: jax.Array
  scales: jax.Array
  scales2: jax.Array | None = None
  offset: jax.Array | None = None
  qtype: str = flax.struct.field(pytree_node=False, default="nf4")
  blocksize: int = flax.struct.field(pytree_node=False, default=BLOCKSIZE)
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)  # of the dequantised tensor

  @property
  def double_quantized(self) -> bool:
    return self.scales2 is not None

  @property
  def shape(self) -> tuple[int, ...]:
    """The dequantised tensor's shape."""
    width = self.codes.shape[-1] * (2 if self.qtype in ("nf4", "fp4") else 1)
    return (*self.codes.shape[:-1], width)

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes, scales and, under double quantisation, the nested scales and offsets."""
    return sum(x.size * x.dtype.itemsize for x in (self.codes, self.scales, self.scales2, self.offset)
               if x is not None)


def codebook(qtype: str) -> np.ndarray:
  """Returns the 16 values (float32, code order) a 4-bit code stands for, before scaling."""
  if qtype == "nf4":
    return np.asarray(NF4, np.float32)
  if qtype == "fp4":
    magnitudes = np.asarray(_FP4_MAGNITUDES, np.float32) / np.float32(max(_FP4_MAGNITUDES))
    # Code 8 stands for +0, as in bitsandbytes' table (and its AVX-512 dequantiser; its scalar one gives -0).
    return np.concatenate([magnitudes, -magnitudes]) + np.float32(0)
  raise ValueError(f"no 4-bit codebook for {qtype!r}; 4-bit types: nf4, fp4")


def _fma32(a, b, c) -> np.float32:
  # a * b + c rounded once to float32 (float32 operands: float64 holds the product and sum exactly).
  return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@functools.cache
def dynamic_map() -> np.ndarray:
  """Returns bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`): 256 sorted float32 values.

  For exponent e = 0..6, 2^e values 10^(e - 6) * m, m the midpoints of 2^e + 1 points spaced evenly
  over [0.1, 1], and their negatives; then 0 and 1. The points are computed as torch's `linspace`
  computes them on the CPU (start + step * i for the first half, end - step * (n - 1 - i) for the
  rest, each a fused multiply-add), the products in float32, so the values equal its bit for bit.
  """
  values = [0.0, 1.0]
  for e in range(7):
    n = 2**e + 1
    start, end = np.float32(0.1), np.float32(1.0)
    step = np.float32((end - start) / np.float32(n - 1))
    points = np.array([_fma32(step, i, start) if i < n // 2 else _fma32(-step, n - 1 - i, end) for i in range(n)],
                      np.float32)
    means = (points[:-1] + points[1:]) / np.float32(2)
    scaled = np.float32(10.0 ** (e - 6)) * means
    values += [*scaled, *-scaled]
  return np.sort(np.asarray(values, np.float32))


def _float_order(keys: np.ndarray) -> np.ndarray:
  # The float32 values of monotone integer keys (the inverse of _float_key).
  bits = np.where(keys >= 0, keys, (-keys) | 0x80000000).astype(np.uint32)
  return bits.view(np.float32)


def _float_key(x: np.ndarray) -> np.ndarray:
  # Integer keys ordered as the float32 values are (-0 and +0 both 0).
  bits = np.asarray(x, np.float32).view(np.uint32).astype(np.int64)
  return np.where(bits & 0x80000000, -(bits & 0x7FFFFFFF), bits)


@functools.cache
def _dynamic_bounds() -> np.ndarray:
  """Returns float32[255]: bound c - 1 is the smallest value bitsandbytes' CPU quantiser codes >= c.

  Its CPU `quantize_blockwise` codes a scaled value v in [-1, 1] by a table of 65536 bins over
  [-1, 1]: bin(v) = int((v + 1) * 0.5 * 65535 + 0.5), and a bin's code is the number of midpoints
  between neighbouring map values below the bin's left edge -1 + 2 * bin / 65535. Both steps are
  monotone in v, so the code of v is the number of these bounds at or below v; each bound is found by
  bisection over the float32 values of [-1, 1].
  """
  code = dynamic_map()
  midpoints = np.float32(0.5) * (code[:-1] + code[1:])
  edges = np.float32(-1.0) + np.float32(2.0) * np.arange(65536, dtype=np.float32) / np.float32(65535)
  table = np.searchsorted(midpoints, edges, side="left")  # the code of each bin

  def code_of(keys):
    v = np.clip(_float_order(keys), np.float32(-1), np.float32(1))
    bins = ((v + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.int64)
    return table[bins]

  wanted = np.arange(1, 256)
  lo = np.full(255, _float_key(np.float32(-1.0)))  # code_of(lo) < wanted: code_of(-1) is 0
  hi = np.full(255, _float_key(np.float32(1.0)))  # code_of(hi) >= wanted: code_of(1) is 255
  while np.any(hi - lo > 1):
    mid = (lo + hi) // 2
    reached = code_of(mid) >= wanted
    hi, lo = np.where(reached, mid, hi), np.where(reached, lo, mid)
  return _float_order(hi)


@functools.cache
def _fourbit_bounds(qtype: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (midpoints float32[15], codes uint8[16]) of a 4-bit type: a scaled value v's code is
  codes[number of midpoints below v], so a value on a midpoint takes the lower code.

  The midpoints are those of the codebook sorted by value, fp4's two zero codes in the order
  bitsandbytes' quantiser sorts them, 0 before 8: the midpoint between them is 0, so a value
  rounding to zero from above gets code 8 (sign bit set) and one from below code 0.
  """
  book = codebook(qtype)
  order = np.argsort(book, kind="stable")
  ordered = book[order]
  return (ordered[:-1] + ordered[1:]) / np.float32(2), order.astype(np.uint8)


def _count_bounds(bounds: np.ndarray, v: jax.Array, *, at_or_below: bool) -> jax.Array:
  """Returns int32[v.shape]: how many of the sorted `bounds` are below v (or at or below it)."""
  # 15 bounds: one fused pass of compares; 255: a binary search (scales only, 1/64 of the elements).
  method = "compare_all" if bounds.size < 32 else "scan"
  side = "right" if at_or_below else "left"
  return jnp.searchsorted(jnp.asarray(bounds), v, side=side, method=method).astype(jnp.int32)


def _blocks(x: jax.Array, blocksize: int) -> jax.Array:
  """x float[..., C] as float[..., C / blocksize, blocksize]."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // blocksize, blocksize)


def _quantize_4bit(x: jax.Array, qtype: str, blocksize: int) -> tuple[jax.Array, jax.Array]:
  """Returns (codes uint8[..., C / 2], absmax float32[..., C / blocksize]) of x float32[..., C]."""
  blocks = _blocks(x, blocksize)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  # bitsandbytes multiplies by the reciprocal, of at least 1e-38: an all-zero block codes zero. That
  # bound is subnormal, which XLA flushes to zero; the smallest normal float serves the same purpose.
  inverse = 1.0 / jnp.maximum(absmax, jnp.finfo(jnp.float32).tiny)
  scaled = jnp.clip(blocks * inverse[..., None], -1.0, 1.0).reshape(x.shape)
  midpoints, codes = _fourbit_bounds(qtype)
  q = jnp.asarray(codes)[_count_bounds(midpoints, scaled, at_or_below=False)]
  pairs = q.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  return (pairs[..., 0] << 4) | pairs[..., 1], absmax


def _dequantize_4bit(codes: jax.Array, absmax: jax.Array, qtype: str, blocksize: int) -> jax.Array:
  """Returns float32[..., C]: each code's codebook value times its block's absmax."""
  q = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
  values = jnp.asarray(codebook(qtype))[q]
  return (_blocks(values, blocksize) * absmax[..., None]).reshape(values.shape)


def dynamic_quantize(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> tuple[jax.Array, jax.Array]:
  """Returns (codes uint8[..., N], absmax float32[..., ceil(N / blocksize)]) of x float[..., N].

  bitsandbytes' `quantize_blockwise` with its dynamic map, over the last axis (a last block may be
  shorter): each block is scaled by the reciprocal of its absmax and coded as its CPU path codes
  (`_dynamic_bounds`); an all-zero block gets code 0 and absmax 0.
  """
  x = x.astype(jnp.float32)
  n = x.shape[-1]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -n % blocksize)])
  absmax = jnp.max(jnp.abs(_blocks(padded, blocksize)), axis=-1)
  scale = jnp.repeat(absmax, blocksize, axis=-1)[..., :n]
  codes = _count_bounds(_dynamic_bounds(), x * (1.0 / scale), at_or_below=True)
  return jnp.where(scale == 0, 0, codes).astype(jnp.uint8), absmax


def dynamic_dequantize(codes: jax.Array, absmax: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> jax.Array:
  """Returns float32[..., N]: the dynamic map's value of each code times its block's absmax."""
  block = jnp.arange(codes.shape[-1]) // blocksize
  return jnp.asarray(dynamic_map())[codes] * jnp.take(absmax, block, axis=-1)


def _check(shape: tuple[int, ...], qtype: str, blocksize: int, batch_dims: int) -> None:
  if qtype not in QTYPES:
    raise ValueError(f"unknown quantization type {qtype!r}; choose from {QTYPES}")
  if len(shape) <= batch_dims:
    raise ValueError(f"a tensor of shape {shape} has no axes after its {batch_dims} batch axes")
  if blocksize <= 0 or shape[-1] % blocksize:
    raise ValueError(f"the last axis ({shape[-1]}) must be a multiple of the block size {blocksize}")
  if qtype != "int8" and blocksize % 2:
    raise ValueError(f"4-bit blocks hold whole bytes: block size {blocksize} must be even")


def quantize(x: jax.Array, qtype: str, *, blocksize: int = BLOCKSIZE, double_quant: bool = True,
             batch_dims: int = 0) -> QuantizedArray:
  """Returns x float[*B, *R, C] quantised to `qtype` in blocks of its last axis (module docstring).

  The `batch_dims` leading axes index independent tensors (a stacked kernel's layers): each has its
  own offset and nested blocks, and they are quantised one at a time, so the float32 temporaries
  are one tensor's.
  """
  _check(x.shape, qtype, blocksize, batch_dims)
  dtype = x.dtype

  def one(t):
    t = t.astype(jnp.float32)
    if qtype == "int8":
      rows = tuple(range(t.ndim - 1))
      q = qwix.quantize(t, jnp.int8, channelwise_axes=rows, tiled_axes={t.ndim - 1: blocksize})
      codes, scales = q.qvalue, q.scale
    else:
      codes, scales = _quantize_4bit(t, qtype, blocksize)
    if not double_quant:
      return codes, scales, None, None
    # A true division: XLA multiplies by the reciprocal of a constant divisor, which can differ in the last bit.
    offset = jnp.sum(scales) / jax.lax.optimization_barrier(jnp.float32(scales.size))
    scale_codes, scales2 = dynamic_quantize((scales - offset).reshape(-1))
    return codes, scale_codes.reshape(scales.shape), scales2, offset

  one = _over_batch(one, batch_dims, x.shape[:batch_dims])
  codes, scales, scales2, offset = one(x)
  return QuantizedArray(codes, scales, scales2, offset, qtype=qtype, blocksize=blocksize, dtype=dtype)


def quantize_kernel(kernel: jax.Array, qtype: str, *, double_quant: bool = True) -> QuantizedArray:
  """Returns a kernel float[*L, in, out] (this project's orientation) quantised as bitsandbytes
  quantises the torch weight [out, in]: a QuantizedArray of float[*L, out, in], each layer its own tensor.

  Blocks are of `BLOCKSIZE` elements when that divides `in` (every real model's projections), else
  of gcd(in, BLOCKSIZE) (tiny test models), so that blocks never cross rows.
  """
  blocksize = math.gcd(kernel.shape[-2], BLOCKSIZE)
  return quantize(jnp.swapaxes(kernel, -1, -2), qtype, blocksize=blocksize, double_quant=double_quant,
                  batch_dims=kernel.ndim - 2)


def block_scales(q: QuantizedArray) -> jax.Array:
  """Returns float32[*B, *R, C / blocksize]: the block scales, decoded under double quantisation."""
  if not q.double_quantized:
    return q.scales
  batch = q.offset.ndim
  rows = q.scales.shape[batch:]
  # Each scale's nested block from its row-major index within its tensor, computed rather than read
  # off a flattened copy, so a sharded `scales` is decoded where it lies.
  index = sum(jax.lax.broadcasted_iota(jnp.int32, rows, axis) * math.prod(rows[axis + 1:])
              for axis in range(len(rows)))
  nested = jnp.take(q.scales2, index // NESTED_BLOCKSIZE, axis=-1)
  products = jnp.asarray(dynamic_map())[q.scales] * nested
  # max(product, -nested absmax) is the product itself (map values lie in [-1, 1]). Between the
  # multiply and the add it keeps XLA (its CPU backend, at least) from fusing them into one
  # multiply-add, which rounds once where bitsandbytes rounds the product and then the sum.
  offset = q.offset.reshape(*q.offset.shape, *(1,) * len(rows))
  return jnp.maximum(products, -nested) + offset


def dequantize(q: QuantizedArray, dtype=None) -> jax.Array:
  """Returns the tensor float[*B, *R, C] in `dtype` (default: the dtype it was quantised from)."""
  scales = block_scales(q)
  if q.qtype == "int8":
    values = qwix.dequantize(qwix.QArray(q.codes, scales, qtype=jnp.int8))
  else:
    values = _dequantize_4bit(q.codes, scales, q.qtype, q.blocksize)
  return values.astype(dtype or q.dtype)


def _over_batch(fn, batch_dims: int, batch_shape: tuple[int, ...]):
  """fn on one tensor, mapped one tensor at a time over `batch_dims` leading axes."""
  if not batch_dims:
    return fn
  count = math.prod(batch_shape)

  def mapped(x):
    out = jax.lax.map(fn, x.reshape(count, *x.shape[batch_dims:]))
    return jax.tree.map(lambda a: a.reshape(*batch_shape, *a.shape[1:]), out)

  return mapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def quantized_matmul(x: jax.Array, q: QuantizedArray, dtype) -> jax.Array:
  """Returns float[..., out] = x float[..., in] @ W.T in `dtype`, W float[out, in] the kernel `q` holds.

  The kernel is in bitsandbytes' orientation (a torch weight: blocks run along the input axis) and
  frozen: the backward gives x's gradient only, dequantising W again from `q` rather than keeping
  the dequantised kernel from the forward pass (automatic differentiation would keep it, a float
  copy of every quantised kernel until the backward pass), as bitsandbytes' 4-bit matmul does.
  """
  return _quantized_matmul_fwd(x, q, dtype)[0]


def _contract_last(a: jax.Array, b: jax.Array, b_axis: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b_axis,)), ((), ())))


def _quantized_matmul_fwd(x, q, dtype):
  if math.prod(x.shape[:-1]) == 1:
    # One row (a decode step at batch 1): a product and a sum, which XLA fuses with the dequantisation
    # into one pass over the codes. As a dot, XLA's GPU backend writes the dequantised kernel to
    # memory for its GEMM and reads it back, more bytes than the float kernel alone.
    w = dequantize(q, jnp.float32)
    y = jnp.sum(x.astype(dtype).astype(jnp.float32)[..., None, :] * w, axis=-1)
    return y.astype(dtype), (q,)
  return _contract_last(x.astype(dtype), dequantize(q, dtype), 1), (q,)


def _quantized_matmul_bwd(dtype, residuals, g):
  (q,) = residuals
  return _contract_last(g, dequantize(q, g.dtype), 0), None


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)
