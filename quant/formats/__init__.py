"""Number formats of `cce_jax.quant`, by name: see each family's module for its grid and scale rule.

`int8 int4 int3 int2 uint8 uint4 uint3` (formats.int), `fp8_e4m3 fp8_e5m2` (formats.fp8),
`mxfp8 mxfp6 mxfp4` (formats.mx), `nvfp4` (formats.nvfp4), `nf4` (formats.nf4).
"""

from cce_jax.quant.formats import fp8
from cce_jax.quant.formats import int as int_formats
from cce_jax.quant.formats import minifloat
from cce_jax.quant.formats import mx
from cce_jax.quant.formats import nf4
from cce_jax.quant.formats import nvfp4
from cce_jax.quant.formats.base import Encoded, Format, get_format, names
from cce_jax.quant.formats.fp8 import FP8Format
from cce_jax.quant.formats.int import IntFormat
from cce_jax.quant.formats.mx import MXFormat
from cce_jax.quant.formats.nf4 import NF4_TABLE, NF4Format
from cce_jax.quant.formats.nvfp4 import NVFP4Format

__all__ = [
    "Encoded", "FP8Format", "Format", "IntFormat", "MXFormat", "NF4Format", "NF4_TABLE", "NVFP4Format",
    "fp8", "get_format", "int_formats", "minifloat", "mx", "names", "nf4", "nvfp4",
]
