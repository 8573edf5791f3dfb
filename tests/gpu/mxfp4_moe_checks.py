"""The Triton MXFP4 MoE kernel (`kvserve/kernels/triton_mxfp4_moe.py`) against gpt-oss's
expert loop on the dequantized weights: several token counts (one pair per expert up to many),
an inner width that is not a multiple of the K-chunk, unselected experts. Shared by the GPU test
(`tests/gpu/test_gpt_oss_gpu.py`) and the CPU test that runs it under TRITON_INTERPRET=1
(`tests/models/test_gpt_oss.py`; `python -m tests.gpu.mxfp4_moe_checks`)."""

from __future__ import annotations

import torch

from kvserve.kernels import mxfp4
from kvserve.kernels.triton_mxfp4_moe import moe_mxfp4


def reference(x, ids, weights, wgu, bgu, wdn, bdn, act):
    """The expert loop in float64 on the CPU, each selected expert dequantized once."""
    k_in, inter = x.shape[1], wdn.shape[2] // 17 * 32
    dense: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out = torch.zeros(x.shape[0], wdn.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in dense:
                dense[e] = (mxfp4.dequantize(wgu[e].cpu(), k_in).double(), mxfp4.dequantize(wdn[e].cpu(), inter).double())
            gu = x[t].double() @ dense[e][0].t() + bgu[e].double().cpu()
            h = act(gu[None])[0]
            y = h @ dense[e][1].t() + bdn[e].double().cpu()
            out[t] += float(weights[t, j]) * y
    return out


def check(t: int, device: str, dtype=torch.float32, hidden=96, inter=64, experts=6, k=2, seed=0) -> float:
    g = torch.Generator().manual_seed(seed)
    wgu = torch.stack([mxfp4.quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1) for _ in range(experts)])
    wdn = torch.stack([mxfp4.quantize(torch.randn(hidden, inter, generator=g) * 0.1) for _ in range(experts)])
    bgu, bdn = torch.randn(experts, 2 * inter, generator=g) * 0.1, torch.randn(experts, hidden, generator=g) * 0.1
    x = torch.randn(t, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(t)])  # expert 5 never chosen
    weights = torch.softmax(torch.randn(t, k, generator=g), dim=-1)

    def act(gu):
        gate, up = gu[:, :inter].clamp(max=0.6), gu[:, inter:].clamp(-0.6, 0.6)
        return (up + 1) * gate * torch.sigmoid(gate * 1.702)

    ref = reference(x, ids, weights, wgu, bgu, wdn, bdn, act)
    dev = lambda a: a.to(device)  # noqa: E731
    got = moe_mxfp4(dev(x).to(dtype), dev(ids), dev(weights), dev(wgu), dev(bgu).to(dtype), dev(wdn),
                    dev(bdn).to(dtype), act)
    rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), f"T={t} {dtype}: relative error {rel:.3e}"
    return rel


def check_model_layer() -> None:
    """A tiny MXFP4 gpt-oss's MoE layer: the CUDA path's pieces (experts stacked as views, the
    kernel, the clamped SwiGLU) against the CPU expert loop of the same layer."""
    import tempfile
    from pathlib import Path

    from kvserve import LLM
    from tests.conftest import _save_tokenizer
    from tests.models.test_gpt_oss import _hf_model, _write_mxfp4_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        _write_mxfp4_checkpoint(_hf_model(inter=64), Path(tmp))
        _save_tokenizer(Path(tmp))
        model = LLM(tmp, dtype="float32", device="cpu", num_kv_blocks=16).engine.runner.model
    for layer in model.layers:
        moe = layer.mlp
        x = torch.randn(9, moe.router.in_features, generator=torch.Generator().manual_seed(3))
        want = moe(x)  # the loop (CPU)
        top, ids = torch.topk(moe.router(x), moe.top_k, dim=-1)
        assert moe.all_mxfp4() and model.supports_cuda_graphs
        got = moe_mxfp4(x, ids, torch.softmax(top, dim=-1), *moe._stack(), moe.experts[0].act)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
        assert torch.equal(moe(x), want)  # the per-expert layers read views of the stacked blocks


def run(device: str) -> None:
    if device == "cpu":
        check_model_layer()
    for t in (1, 3, 40):
        check(t, device, seed=t)
    check(5, device, torch.float16, seed=2)  # (bf16 only on the GPU: the interpreter mishandles its dot)
    if device == "cuda":
        for t in (1, 64):
            check(t, device, torch.bfloat16, hidden=2880, inter=2880, experts=8, k=4, seed=t)


if __name__ == "__main__":
    run("cuda" if torch.cuda.is_available() else "cpu")
    print("mxfp4 moe checks passed")
