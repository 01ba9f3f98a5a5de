"""Block quantisation (models/quant.py) against bitsandbytes' own CPU functions, bit for bit.

bitsandbytes is the reference the release quantises with (`--bits 4 --quant_type nf4|fp4
--double_quant`); its CPU path has `quantize_4bit` / `dequantize_4bit` for nf4 and fp4, with and
without `compress_statistics`, and `quantize_blockwise` for the nested 8-bit codes, so every number is
compared with its own: codes, scales, offsets and dequantised values, as bit patterns, but for the
sign of zero, on which bitsandbytes' own kernels disagree (fp4's code 8 dequantises to +0 in its
AVX-512 kernel and to -0 in its scalar one). Tensors are in bitsandbytes' orientation (a torch weight
[out, in]): blocks run along the last axis in both.

Under double quantisation the offset is the mean of the block scales, a sum whose rounding depends
on the order of its terms (torch and XLA add in different orders); those tests quantise values of
a bfloat16 grid, as checkpoint weights are, whose block maxima sum exactly in float32 in any order.
"""

import contextlib
import functools
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vtimellm_jax.models import quant

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bnb():
  """bitsandbytes.functional, imported by the tests that compare with it (not at collection: it is slow)."""
  # Its CPU backend warns at import that it cannot fetch an optional fused 4-bit gemm from the
  # Hugging Face hub; nothing here uses that kernel.
  logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
  return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (the test extra, x86_64)")


FOURBIT = ("nf4", "fp4")
_quantize = jax.jit(quant.quantize, static_argnames=("qtype", "blocksize", "double_quant", "batch_dims"))
_dequantize = jax.jit(quant.dequantize, static_argnames=("dtype",))


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16:
    x = x + x.dtype.type(0)  # -0 becomes +0 (module docstring)
  return x.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize])


def _assert_bits_equal(ours, theirs, what: str):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
  differ = _bits(ours) != _bits(theirs)
  assert not differ.any(), f"{what}: {differ.sum()} of {differ.size} differ, first at {np.argwhere(differ)[0]}"


def _tensor(shape, seed: int, grid: bool) -> np.ndarray:
  """Kernel-like float32 values (std 0.02); on the bfloat16 grid when `grid`."""
  x = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)) if grid else x


def _torch(x: np.ndarray, dtype: str):
  t = torch.from_numpy(np.array(x))
  return t.to(torch.bfloat16) if dtype == "bfloat16" else t


def _torch_dtype_array(t):
  """A torch tensor as a numpy array of the same bits (bfloat16 through ml_dtypes)."""
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def test_dynamic_map_is_bitsandbytes(bnb):
  _assert_bits_equal(quant.dynamic_map(), bnb.create_dynamic_map().numpy(), "dynamic map")


@pytest.mark.parametrize("qtype", FOURBIT)
def test_codebook_is_what_bitsandbytes_dequantises(qtype, bnb):
  # Codes 0..15 four times over, in one block of absmax 1 (fp4's code 8 is -0 here; bitsandbytes'
  # Python table holds +0 for it, but only its quantiser reads that table).
  codes = np.tile(np.arange(16, dtype=np.uint8), 4)
  packed = torch.from_numpy((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
  state = bnb.QuantState(absmax=torch.ones(1), shape=torch.Size([1, 64]), dtype=torch.float32,
                                    blocksize=64, quant_type=qtype)
  values = bnb.dequantize_4bit(packed, state).numpy().reshape(-1)
  _assert_bits_equal(quant.codebook(qtype)[codes], values, qtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("qtype", FOURBIT)
def test_4bit_equals_bitsandbytes(qtype, double_quant, dtype, bnb):
  # 48 rows of 640: 480 blocks of 64, so the nested blocks are one of 256 and a short one of 224.
  rows, width = 48, 640
  x = _tensor((rows, width), seed=1, grid=double_quant or dtype == "bfloat16")
  packed, state = bnb.quantize_4bit(_torch(x, dtype), blocksize=64, quant_type=qtype,
                                               compress_statistics=double_quant)
  q = _quantize(jnp.asarray(x, dtype), qtype=qtype, double_quant=double_quant)

  _assert_bits_equal(q.codes, packed.numpy().reshape(rows, width // 2), "codes")
  assert q.double_quantized == double_quant
  if double_quant:
    _assert_bits_equal(q.scales, state.absmax.numpy().reshape(rows, width // 64), "scale codes")
    _assert_bits_equal(q.scales2, state.state2.absmax.numpy(), "nested absmax")
    _assert_bits_equal(q.offset, state.offset.numpy(), "offset")
  else:
    _assert_bits_equal(q.scales, state.absmax.numpy().reshape(rows, width // 64), "absmax")
  ours = _dequantize(q)
  assert ours.dtype == jnp.dtype(dtype)
  _assert_bits_equal(ours, _torch_dtype_array(bnb.dequantize_4bit(packed, state)), "dequantised")


def _tie_blocks(qtype: str) -> np.ndarray:
  """Blocks of absmax 1 (scaled values are the values) holding the codebook's midpoints, the floats
  either side of each, both zeros, tiny values of both signs, and an all-zero block."""
  book = np.sort(quant.codebook(qtype))
  midpoints = (book[:-1] + book[1:]) / np.float32(2)
  specials = np.concatenate([midpoints, np.nextafter(midpoints, np.float32(-2)), np.nextafter(midpoints, np.float32(2)),
                             np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 1.0, -1.0])])
  # XLA flushes subnormal floats to zero (fp4's midpoint 0 has subnormal neighbours); bitsandbytes does not.
  specials = specials[(specials == 0) | (np.abs(specials) >= np.finfo(np.float32).tiny)]
  return np.concatenate([_blocks_of_absmax_one(specials, 64), np.zeros((1, 64), np.float32)])


def _blocks_of_absmax_one(values: np.ndarray, width: int) -> np.ndarray:
  """float32[n, width]: each row 1.0 and then `width - 1` of `values` (zeros after the last)."""
  rows = np.zeros((-(-values.size // (width - 1))) * (width - 1), np.float32)
  rows[:values.size] = values
  return np.concatenate([np.ones((rows.size // (width - 1), 1), np.float32), rows.reshape(-1, width - 1)], axis=1)


@pytest.mark.parametrize("qtype", FOURBIT)
def test_4bit_ties_and_zeros_equal_bitsandbytes(qtype, bnb):
  x = _tie_blocks(qtype)
  packed, state = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=qtype)
  q = _quantize(jnp.asarray(x), qtype=qtype, double_quant=False)
  _assert_bits_equal(q.codes, packed.numpy().reshape(x.shape[0], -1), "codes")
  _assert_bits_equal(q.scales, state.absmax.numpy().reshape(x.shape[0], 1), "absmax")
  _assert_bits_equal(_dequantize(q), bnb.dequantize_4bit(packed, state).numpy(), "dequantised")


def test_dynamic_quantize_equals_bitsandbytes(bnb):
  # Random values in blocks of 256 (the last one short), then blocks of absmax 1 holding the bounds
  # where bitsandbytes' lookup table changes code and the floats just below them.
  random = np.random.default_rng(2).standard_normal(256 * 20 + 100).astype(np.float32)
  bounds = quant._dynamic_bounds()
  edges = np.concatenate([bounds, np.nextafter(bounds, np.float32(-2))])
  for x in (random, _blocks_of_absmax_one(edges, 256).reshape(-1)):
    codes, state = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    ours, absmax = jax.jit(quant.dynamic_quantize)(jnp.asarray(x))
    _assert_bits_equal(ours, codes.numpy(), "codes")
    _assert_bits_equal(absmax, state.absmax.numpy(), "absmax")
    _assert_bits_equal(jax.jit(quant.dynamic_dequantize)(ours, absmax),
                       bnb.dequantize_blockwise(codes, state).numpy(), "dequantised")


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_stacked_tensors_are_quantised_each_on_its_own(qtype, double_quant):
  x = jnp.asarray(_tensor((3, 16, 640), seed=3, grid=True))
  stacked = _quantize(x, qtype=qtype, double_quant=double_quant, batch_dims=1)
  for i in range(x.shape[0]):
    alone = _quantize(x[i], qtype=qtype, double_quant=double_quant)
    for name, a, b in zip(("codes", "scales", "scales2", "offset"), jax.tree.leaves(stacked), jax.tree.leaves(alone)):
      _assert_bits_equal(a[i], b, f"layer {i} {name}")
  _assert_bits_equal(_dequantize(stacked)[1], _dequantize(_quantize(x[1], qtype=qtype, double_quant=double_quant)),
                     "dequantised layer 1")


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_int8_round_trip_error_is_bounded(double_quant):
  # Scaled values run to +-127.5 (qwix's scale is absmax / 127.5): the largest element of each block
  # must saturate to +-127, and every element come back within half a step plus the scale's own error.
  x = _tensor((32, 512), seed=4, grid=True) * np.float32(1 + np.arange(32)[:, None])
  q = _quantize(jnp.asarray(x), qtype="int8", double_quant=double_quant)
  codes = np.asarray(q.codes).astype(np.int32).reshape(32, -1, 64)
  blocks = x.reshape(32, -1, 64)
  absmax = np.abs(blocks).max(-1)
  scale = absmax / np.float32(127.5)
  # qwix's scheme: round half to even of x / scale, saturating; XLA's division may differ from the
  # exact quotient in the last bit, which can move a value lying on a half-integer by one code.
  exact = blocks.astype(np.float64) / scale[..., None].astype(np.float64)
  on_half = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-4
  reference = np.clip(np.rint(exact), -128, 127)
  np.testing.assert_array_equal(codes[~on_half], reference[~on_half])
  assert np.all(np.abs(codes - reference) <= 1)
  np.testing.assert_array_equal(np.isin(np.abs(codes).max(-1), (127, 128)), True)

  decoded = np.asarray(quant.block_scales(q))
  assert decoded.dtype == np.float32
  if double_quant:
    # Each nested block's scales are coded to within half the dynamic map's widest gap (0.9 / 64)
    # of its absmax, the largest distance of one of them from the offset.
    nested = np.repeat(np.asarray(q.scales2), 256)[:scale.size].reshape(scale.shape)
    assert np.all(np.abs(decoded - scale) <= 0.0071 * nested)
    assert not np.array_equal(decoded, scale)
  else:
    np.testing.assert_allclose(decoded, scale, rtol=1e-6)
  error = np.abs(np.asarray(_dequantize(q)).reshape(blocks.shape) - blocks)
  bound = scale / 2 + 128 * np.abs(decoded - scale) + absmax * 2e-6
  assert np.all(error <= bound[..., None])
  assert error.max() > 0.3 * (scale / 2).max()  # the bound is not loose by orders of magnitude


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_a_7b_kernel_is_quantised_in_blocks(qtype):
  # The MLP kernels of a 7B layer in bitsandbytes' orientation, alone and stacked over 32 layers: shapes
  # only (jax.eval_shape), with the stored bytes against bfloat16.
  for shape, batch_dims in (((4096, 11008), 0), ((32, 11008, 4096), 1)):
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    q = jax.eval_shape(functools.partial(quant.quantize, qtype=qtype, batch_dims=batch_dims), x)
    *lead, width = shape
    blocks = width // 64
    per_tensor = np.prod(shape[batch_dims:]) // 64
    batch = tuple(shape[:batch_dims])
    assert q.codes.shape == (*lead, width // 2 if qtype != "int8" else width)
    assert q.codes.dtype == (jnp.int8 if qtype == "int8" else jnp.uint8)
    assert (q.scales.shape, q.scales.dtype) == ((*lead, blocks), jnp.uint8)
    assert (q.scales2.shape, q.scales2.dtype) == ((*batch, -(-per_tensor // 256)), jnp.float32)
    assert (q.offset.shape, q.offset.dtype) == (batch, jnp.float32)
    back = jax.eval_shape(quant.dequantize, q)
    assert (back.shape, back.dtype) == (shape, jnp.bfloat16)
    assert q.shape == shape
    bits_per_weight = 8 * q.nbytes / np.prod(shape)
    assert bits_per_weight < {"nf4": 4.14, "fp4": 4.14, "int8": 8.14}[qtype]


def test_sharded_quantisation_equals_unsharded():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("rows",))
  x = jnp.asarray(_tensor((64, 640), seed=5, grid=True))
  sharded = jax.device_put(x, NamedSharding(mesh, P("rows", None)))
  whole = _quantize(x, qtype="nf4")
  parts = _quantize(sharded, qtype="nf4")
  for a, b in zip(jax.tree.leaves(parts), jax.tree.leaves(whole)):
    _assert_bits_equal(a, b, "sharded")
  assert parts.codes.sharding.spec == P("rows", None)
  _assert_bits_equal(_dequantize(parts), _dequantize(whole), "dequantised")


@pytest.mark.parametrize("kwargs, message", [
    ({"qtype": "int4"}, "unknown quantization type"),
    ({"qtype": "nf4", "blocksize": 48}, "multiple of the block size"),
    ({"qtype": "nf4", "batch_dims": 2}, "no axes after"),
    ({"qtype": "int8", "blocksize": 0}, "multiple of the block size"),
])
def test_refusals(kwargs, message):
  with pytest.raises(ValueError, match=message):
    quant.quantize(jnp.zeros((4, 64)), **kwargs)


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_quantized_matmul_keeps_no_float_kernel_for_the_backward(qtype):
  # A frozen kernel [out 96, in 640] in bitsandbytes' orientation, x [2, 3, in].
  w = jnp.asarray(_tensor((96, 640), seed=6, grid=True))
  x = jnp.asarray(_tensor((2, 3, 640), seed=7, grid=False)) * 50
  q = _quantize(w, qtype=qtype)
  ref_w = _dequantize(q)

  def loss(x, matmul):
    return jnp.sum(jnp.sin(matmul(x)))

  ours = jax.jit(jax.value_and_grad(lambda x: loss(x, lambda x: quant.quantized_matmul(x, q, jnp.float32))))(x)
  plain = jax.jit(jax.value_and_grad(lambda x: loss(x, lambda x: x @ ref_w.T)))(x)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1], plain[1], rtol=1e-5, atol=1e-6)

  # What the backward keeps: the quantised arrays, not a float [96, 640] kernel.
  def saved(f):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda x: loss(x, f), x)
    return out.getvalue()

  def keeps_kernel(residuals: str) -> bool:
    return "f32[96,640]" in residuals or "f32[640,96]" in residuals

  ours = saved(lambda x: quant.quantized_matmul(x, q, jnp.float32))
  assert not keeps_kernel(ours), ours
  assert keeps_kernel(saved(lambda x: x @ quant.dequantize(q).T))  # the check sees a kept kernel where there is one
