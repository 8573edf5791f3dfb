"""Stacked expert tensors of a GGUF file, one tensor per expert.

llama.cpp stores a mixture-of-experts layer's expert projections as one tensor each,
`blk.N.ffn_{gate,up,down}_exps.weight` of numpy shape [n_expert, out, in] (biases, gpt-oss only:
[n_expert, out]). kvserve's MoE models (`models/moe.py`, `models/gpt_oss.py`) build one `Linear`
per expert projection, so each stacked tensor is yielded as `n_expert` tensors named
`...mlp.experts.{e}.{proj}.{weight|bias}`.

In a quantized file an expert's slice is `out` whole rows of GGML blocks, contiguous in the file:
with `keep_quantized` each expert gets a `QuantizedTensor` view of its rows (no copy), which the
expert's linear method (`platform/ggml_linear.py`, as for dense layers) keeps as it is. MXFP4
(gpt-oss) always stays 4-bit: only `platform/mxfp4_linear.py` multiplies it. Otherwise each expert
is dequantized on its own, so peak extra memory is one expert, not the whole stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from kvserve.loader.gguf_reader import GGMLQuantizationType

if TYPE_CHECKING:
    from kvserve.loader.gguf import GGUFFile
    from kvserve.models.linear import QuantizedTensor


def split_experts(
    gf: GGUFFile, name: str, hf_name: str, dtype: torch.dtype, keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """`hf_name` is `...mlp.experts.{proj}.{kind}` (no expert index); yields one tensor per expert."""
    from kvserve.loader.gguf import _raw_blocks
    from kvserve.models.linear import GGML_BLOCK, QuantizedTensor

    t = gf.tensors[name]
    prefix, proj, kind = hf_name.rsplit(".", 2)
    n_expert = int(t.shape[-1])  # GGUF lists the outermost dimension last
    mxfp4 = t.tensor_type == GGMLQuantizationType.MXFP4
    if kind == "weight" and len(t.shape) == 3 and (mxfp4 or (keep_quantized and int(t.tensor_type) in GGML_BLOCK)):
        blocks = _raw_blocks(gf, name)  # uint8 [n_expert * out, row_bytes], a view of the file
        out = blocks.data.shape[0] // n_expert
        for e in range(n_expert):
            yield f"{prefix}.{e}.{proj}.weight", QuantizedTensor(blocks.qtype, blocks.data[e * out : (e + 1) * out], blocks.cols)
        return
    for e in range(n_expert):
        w = torch.from_numpy(gf.dequantize(name, e))  # [out, in] or [out]
        yield f"{prefix}.{e}.{proj}.{kind}", w.to(dtype).contiguous()
