"""Llama-architecture GGUF checkpoints (llama.cpp's format) into our `Decoder`, dequantized to fp32, cached.

`load_gguf(path)` reads the file with the `gguf` package (the optional extra `cce_jax[gguf]`), dequantizes every
tensor to fp32 with gguf's own block decoders (F32, F16, BF16, Q4_0/Q4_1/Q5_x/Q8_0, K-quants), maps
llama.cpp's names into our parameters, undoes llama.cpp's row permutation of the query and key projections (see
`unpermute_rope_rows`) and builds the `tokenizers` tokenizer from the metadata (`cce_jax.models.gguf_tokenizer`).
The converted parameters are written once to `$CCE_JAX_CACHE` (default `~/.cache/cce_jax`) as an .npz and read from
there afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cce_jax.models.config import Config
from cce_jax.models.gguf_tokenizer import tokenizer_from_gguf_fields
from cce_jax.models.model import Decoder
from cce_jax.models.model import make_model

# Bump when the conversion changes, so stale cache entries are not read.
_CACHE_VERSION = 1


def _require_gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading GGUF files needs the optional extra: pip install 'cce_jax[gguf]'") from e
  return gguf


def unpermute_rope_rows(w_OxI, n_heads):
  """Undoes llama.cpp's permutation of a query/key projection [n_heads·k, in] (numpy, any dtype).

  llama.cpp's converter reorders each head's k output rows from Hugging Face's rotate-half layout (the first k/2
  rows pair with the last k/2) into its interleaved layout (rows 2i and 2i+1 pair): row h·k/2 + i → 2i + h. Our
  `rope` is rotate-half, so the rows go back: interleaved [n_heads, k/2, 2] → [n_heads, 2, k/2].
  """
  rows = w_OxI.shape[0]
  if rows % n_heads or (rows // n_heads) % 2:
    raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
  k = rows // n_heads
  return w_OxI.reshape(n_heads, k // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise KeyError(f"GGUF metadata has no {key!r}")
    return default
  return field.contents()


def config_from_gguf(reader, tensor_names, **overrides) -> Config:
  """Our `Config` from a GGUF reader's llama.* metadata; `overrides` (e.g. T, dtype) replace fields."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
  if f"{arch}.rope.scaling.type" in reader.fields:
    raise NotImplementedError(f"RoPE scaling ({_field(reader, f'{arch}.rope.scaling.type')}) is not supported")
  D = int(_field(reader, f"{arch}.embedding_length"))
  H = int(_field(reader, f"{arch}.attention.head_count"))
  rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", D // H))
  if rope_dims != D // H:
    raise NotImplementedError(f"partial RoPE ({rope_dims} of {D // H} head dims) is not supported")
  n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
  fields = dict(
      V=int(_field(reader, f"{arch}.vocab_size", n_tokens or None)),
      D=D,
      H=H,
      KV=int(_field(reader, f"{arch}.attention.head_count_kv", H)),
      L=int(_field(reader, f"{arch}.block_count")),
      F=int(_field(reader, f"{arch}.feed_forward_length")),
      T=int(_field(reader, f"{arch}.context_length")),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensor_names,
      dtype="float32",
  )
  fields.update(overrides)
  return Config(**fields)


def _dequantized(gguf, tensor):
  """A GGUF tensor as an fp32 numpy array in numpy order ([out, in] for matrices, as in Hugging Face)."""
  qtype = tensor.tensor_type
  if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    out = np.asarray(tensor.data, np.float32)
  else:
    try:
      out = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    except NotImplementedError as e:
      raise NotImplementedError(f"{tensor.name}: GGUF type {qtype.name} cannot be dequantized") from e
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(out, np.float32).reshape(shape)


def _expect(name, array, shape):
  if array.shape != shape:
    raise ValueError(f"GGUF tensor {name} has shape {array.shape}, expected {shape}")
  return array


def params_from_tensors(cfg: Config, tensors) -> dict[str, np.ndarray]:
  """Our parameters {"blocks.3.attn.wq": array, ...} (fp32, our layouts) from llama.cpp-named fp32 tensors."""
  D, H, KV, F, k = cfg.D, cfg.H, cfg.KV, cfg.F, cfg.head_dim

  def get(name, shape):
    if name not in tensors:
      raise KeyError(f"GGUF file has no tensor {name!r}")
    return _expect(name, tensors[name], shape)

  out = {"embed": get("token_embd.weight", (cfg.V, D)), "final_norm.scale": get("output_norm.weight", (D,))}
  if not cfg.tie_embeddings:
    out["head"] = get("output.weight", (cfg.V, D))
  for i in range(cfg.L):
    b, p = f"blk.{i}.", f"blocks.{i}."
    wq = unpermute_rope_rows(get(b + "attn_q.weight", (H * k, D)), H)
    wk = unpermute_rope_rows(get(b + "attn_k.weight", (KV * k, D)), KV)
    out[p + "attn.wq"] = wq.T.reshape(D, H, k)
    out[p + "attn.wk"] = wk.T.reshape(D, KV, k)
    out[p + "attn.wv"] = get(b + "attn_v.weight", (KV * k, D)).T.reshape(D, KV, k)
    out[p + "attn.wo"] = get(b + "attn_output.weight", (D, H * k)).T.reshape(H, k, D)
    out[p + "mlp.w1"] = get(b + "ffn_gate.weight", (F, D)).T
    out[p + "mlp.w3"] = get(b + "ffn_up.weight", (F, D)).T
    out[p + "mlp.w2"] = get(b + "ffn_down.weight", (D, F)).T
    out[p + "attn_norm.scale"] = get(b + "attn_norm.weight", (D,))
    out[p + "mlp_norm.scale"] = get(b + "ffn_norm.weight", (D,))
  return {name: np.ascontiguousarray(a, np.float32) for name, a in out.items()}


def model_from_params(cfg: Config, params) -> Decoder:
  """A `Decoder` for `cfg` holding `params` (names as `params_from_tensors` gives them), without random init."""
  model = nnx.eval_shape(lambda: make_model(cfg))
  for name, array in params.items():
    *path, last = name.split(".")
    obj = model
    for part in path:
      obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    var = getattr(obj, last)
    if tuple(var.shape) != array.shape:
      raise ValueError(f"parameter {name} has shape {array.shape}, the model expects {tuple(var.shape)}")
    value = jnp.asarray(array, cfg.params_dtype)
    if hasattr(var, "set_value"):  # flax >= 0.12 deprecates the .value setter
      var.set_value(value)
    else:
      var.value = value
  return model


def _cache_dir(cache_dir):
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  return pathlib.Path(os.environ.get("CCE_JAX_CACHE", pathlib.Path.home() / ".cache" / "cce_jax")) / "gguf"


def _cache_key(path: pathlib.Path):
  st = path.stat()
  ident = f"{_CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
  return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _convert(path):
  gguf = _require_gguf()
  reader = gguf.GGUFReader(str(path))
  tensors = {t.name: _dequantized(gguf, t) for t in reader.tensors}
  cfg = config_from_gguf(reader, tensors)
  tokenizer = tokenizer_from_gguf_fields(reader)
  return cfg, params_from_tensors(cfg, tensors), tokenizer


def load_gguf(path, *, cache=True, cache_dir=None, **config_overrides):
  """(config, model, tokenizer) from a llama-architecture GGUF file.

  The model is our `Decoder` with fp32 parameters and, unless overridden, fp32 compute (`dtype="float32"`) and
  `T` = the file's context length; `config_overrides` replace Config fields (e.g. `T=512, dtype="bfloat16"`).
  The tokenizer is a `tokenizers.Tokenizer` (byte-level BPE from the file's vocabulary and merges). With
  `cache`, the converted parameters, config and tokenizer are stored under `cache_dir` (default
  `$CCE_JAX_CACHE/gguf` or `~/.cache/cce_jax/gguf`), keyed by the file's path, size and mtime, and read from there
  on later calls.
  """
  import tokenizers  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}")
  entry = _cache_dir(cache_dir) / _cache_key(path)
  if cache and (entry / "params.npz").is_file():
    cfg = Config(**json.loads((entry / "config.json").read_text()))
    with np.load(entry / "params.npz") as data:
      params = {name: data[name] for name in data.files}
    tokenizer = tokenizers.Tokenizer.from_file(str(entry / "tokenizer.json"))
  else:
    cfg, params, tokenizer = _convert(path)
    if cache:
      entry.mkdir(parents=True, exist_ok=True)
      np.savez(entry / "params.tmp.npz", **params)
      tokenizer.save(str(entry / "tokenizer.json"))
      (entry / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
      os.replace(entry / "params.tmp.npz", entry / "params.npz")  # last: its presence marks a complete entry
  if config_overrides:
    cfg = dataclasses.replace(cfg, **config_overrides)
  return cfg, model_from_params(cfg, params), tokenizer
