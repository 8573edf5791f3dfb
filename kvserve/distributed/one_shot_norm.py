"""All-reduce fused with the residual add and RMSNorm that follow it, in one kernel.

In a tensor-parallel Llama layer every row-parallel projection (o_proj, down_proj, and the
vocabulary-parallel embedding) ends in an all-reduce, and the very next op is the pre-norm
block's `residual += x; h = rmsnorm(residual)`. At batch 1 a decode step of an 8B model makes
65 such pairs. This kernel does each pair in one launch, with one one-way trip over NVLink:

1. each program (one row of the hidden state) writes its row of the local partial sum into
   every rank's symmetric buffer, in the part of the current slot reserved for this rank
   (remote stores, posted: nothing waits for them);
2. it reads the rows of every rank from its own buffer, spinning until none of their elements
   is the "empty" marker, and sums them in rank order in fp32, so every rank computes the same
   bits; then it writes the marker back over what it read;
3. residual add and RMSNorm, exactly as `models/triton_ops._rmsnorm_kernel` does them.

The marker is negative zero (bit pattern 0x8000 in bf16 and fp16; fp32 keeps the unfused
path), and writers send negative zeros as positive zeros, so a value can never look empty and
each element is checked on its own (no flag, no fence, no barrier: the data is its own signal,
as in the "Lamport" one-shot all-reduce of TensorRT-LLM). Buffers rotate over three slots, by a
per-program counter that the kernel itself advances (so CUDA graph replays advance it too).
Slot s is written again three calls later, and a rank writes call e + 3 only after it read
every rank's data of call e + 2, which each rank wrote after its call e (which emptied slot s)
had finished: stream order.

Every program writes before it waits, so the kernel cannot deadlock even when its programs do
not all fit on the GPU at once. Eligibility depends only on shapes and dtypes, which are the
same on every rank for the same call (ranks run the same code in lockstep).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.models import pdl

MAX_ROWS = 1024  # programs (rows) per call
MAX_COLS = 16384  # one program holds a whole row
SLOTS = 3
EMPTY_BITS = -32768  # int16 view of the marker: 0x8000, -0.0 in bf16 and fp16
_EMPTY = tl.constexpr(EMPTY_BITS)


@triton.jit
def _all_reduce_rmsnorm_kernel(
    x_ptr,  # [T, H] this rank's partial sum
    res_ptr,  # [T, H] residual in (unused without HAS_RES)
    w_ptr,  # [H] norm weight
    out_ptr,  # [T, H] norm(sum + residual)
    res_out_ptr,  # [T, H] sum + residual (or the sum)
    data_ptrs,  # int64[WORLD]: each rank's buffer, mapped into this process
    counter_ptr,  # int32[MAX_ROWS]: this rank's slot per program
    rank,
    n_cols,
    src_stride,  # elements between two ranks' parts of a slot
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    WORLD: tl.constexpr,
    HAS_RES: tl.constexpr,
    PUSHED: tl.constexpr,  # the GEMV that produced x already wrote it to every buffer
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = x_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: no kernel writes it
    pdl.wait(PDL)  # models/pdl.py: the slot protocol below relies on stream order, which it keeps
    slot = tl.load(counter_ptr + row)
    if not PUSHED:
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
        x = tl.where(x == 0, 0.0, x).to(dt)  # -0.0 would read as "empty"
        # 1. push this rank's row into every rank's buffer
        mine = (slot * WORLD + rank).to(tl.int64) * src_stride + row.to(tl.int64) * n_cols
        for p in tl.static_range(WORLD):
            dst = tl.load(data_ptrs + p).to(tl.pointer_type(dt))
            tl.store(dst + mine + cols, x, mask=mask)
    # Independent of the peers: in flight while we wait for them (without a residual, res_ptr
    # is x_ptr, read and unused).
    r = tl.load(res_ptr + row.to(tl.int64) * stride_r + cols, mask=mask, other=0.0)
    # 2. every rank's row, in rank order, once it has arrived; then empty it again. The next
    #    rank's row is requested before this one is checked, so the first look at every row
    #    costs one round trip, not one per rank (a non-empty element is always this call's
    #    data however early it is read: slots are emptied after every read). (A variant that
    #    loaded all ranks' rows as one 2-D tile, in another thread layout than the stores,
    #    gave wrong sums now and then in tests/gpu/test_one_shot_norm.py at 64 rows; the
    #    cause was not pinned down, and this one keeps the layout of the stores.)
    here = tl.load(data_ptrs + rank).to(tl.pointer_type(tl.int16))
    row_base = here + row.to(tl.int64) * n_cols + cols
    src = row_base + (slot * WORLD).to(tl.int64) * src_stride
    v = tl.load(src, mask=mask, other=0, volatile=True)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for q in tl.static_range(WORLD):
        if q + 1 < WORLD:
            src_next = row_base + (slot * WORLD + q + 1).to(tl.int64) * src_stride
            v_next = tl.load(src_next, mask=mask, other=0, volatile=True)
        while tl.max(((v == _EMPTY) & mask).to(tl.int32), 0) > 0:
            v = tl.load(src, mask=mask, other=0, volatile=True)
        acc += v.to(dt, bitcast=True).to(tl.float32)
        tl.store(src, tl.full([BLOCK], _EMPTY, tl.int16), mask=mask)
        if q + 1 < WORLD:
            src = src_next
            v = v_next
    s = acc.to(dt)  # the all-reduce's result, rounded as the unfused all-reduce returns it
    # 3. residual add and RMSNorm (models/triton_ops._rmsnorm_kernel's arithmetic)
    if HAS_RES:
        s = (s.to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(res_out_ptr + row.to(tl.int64) * stride_ro + cols, s, mask=mask)
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, 0) / n_cols
    normed = (sf * (1.0 / tl.sqrt_rn(var + eps))).to(dt)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, out.to(dt), mask=mask)
    tl.store(counter_ptr + row, (slot + 1) % 3)


class AllReduceRMSNorm:
    """`__call__(x, residual, weight, eps)` -> (norm(sum + residual), sum + residual), where sum
    is `x` summed over the ranks (`residual` None: (norm(sum), sum)); or None when the call is
    not eligible and the caller must all-reduce and normalize separately. `x` is not modified.

    Collective at construction: every rank of the group builds it in the same order."""

    def __init__(self, group_name: str, world: int, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.max_bytes = max_bytes
        self.world = world
        self.buffer = symm_mem.empty(SLOTS * world * max_bytes // 2, dtype=torch.int16, device=device)
        self.buffer.fill_(EMPTY_BITS)
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(self.buffer, group=group_name)  # collective: all emptied by now
        self.rank = handle.rank
        offset = self.buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        self.data_ptrs = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
        self.counters = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self._handle = handle  # keeps the peers' mappings alive
        self._pushed: torch.Tensor | None = None  # output of the last pushing GEMV, not yet reduced

    def linear_push(self, linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`linear(x)` for one row on the Triton GEMV, which also writes its output into every
        rank's buffer, so the `__call__` that reduces it only waits for the peers' rows (the
        transfer overlaps the GEMV's end). None when not eligible: the caller runs `linear(x)`.
        The result must go to this object's `__call__` next, as its `x`."""
        from kvserve.models import fused_ops, triton_ops

        from kvserve.models.linear import DenseLinearMethod

        w = getattr(linear, "weight", None)
        if not (
            isinstance(getattr(linear, "method", None), DenseLinearMethod) and w is not None
            and w.dim() == 2 and w.stride(1) == 1
            and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1 and x.dtype == w.dtype
            and fused_ops.enabled_for(x) and self._fits(1, w.shape[0], x.dtype)
        ):
            return None
        out = triton_ops.gemv(x, w, linear.bias,
                              push=(self.data_ptrs, self.counters, self.rank, self.max_bytes // x.element_size(), self.world))
        self._pushed = out
        return out

    def _fits(self, rows: int, cols: int, dtype: torch.dtype) -> bool:
        return (
            dtype in (torch.bfloat16, torch.float16)
            and 0 < rows <= MAX_ROWS and 0 < cols <= MAX_COLS and rows * cols * 2 <= self.max_bytes
        )

    def eligible(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        # Shapes, dtypes and strides only: the same answer on every rank for the same call.
        if not (x.is_cuda and x.dim() == 2 and self._fits(x.shape[0], x.shape[1], x.dtype) and x.stride(1) == 1):
            return False
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
            return False
        return True

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        pushed, self._pushed = x is self._pushed, None
        if not self.eligible(x, residual):
            if pushed:  # its rows sit in the buffers: this call must take them
                raise RuntimeError("a pushed GEMV output reached an ineligible fused all-reduce")
            return None
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        self._launch(x, residual, weight, eps, out, res_out, compile_only=False, pushed=pushed)
        return out, res_out

    def compile(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
        """Compile the variant for these arguments without running it (start-up: a rank whose
        compile failed would otherwise leave its peers waiting for its rows)."""
        self._launch(x, residual, weight, 1e-6, torch.empty_like(x), torch.empty_like(x), compile_only=True)

    def _launch(self, x, residual, weight, eps, out, res_out, compile_only: bool, pushed: bool = False) -> None:
        rows, cols = x.shape
        block = triton.next_power_of_2(cols)
        args = (
            x, residual if residual is not None else x, weight, out, res_out,
            self.data_ptrs, self.counters,
            self.rank, cols, self.max_bytes // x.element_size(),
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
            eps,
        )
        use_pdl = pdl.enabled(x.device)
        meta = dict(WORLD=self.world, HAS_RES=residual is not None, PUSHED=pushed, BLOCK=block, PDL=use_pdl,
                    num_warps=min(max(block // 256, 1), 16), launch_pdl=use_pdl)
        if compile_only:
            _all_reduce_rmsnorm_kernel.warmup(*args, grid=(rows,), **meta)
        else:
            _all_reduce_rmsnorm_kernel[(rows,)](*args, **meta)
