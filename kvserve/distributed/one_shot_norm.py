"""All-reduce fused with the residual add and RMSNorm that follow it, in one kernel.

In a tensor-parallel Llama layer every row-parallel projection (o_proj, down_proj, and the
vocabulary-parallel embedding) ends in an all-reduce, and the very next op is the pre-norm
block's `residual += x; h = rmsnorm(residual)`. At batch 1 a decode step of an 8B model makes
65 such pairs, and each is two launches of a few microseconds. This kernel does both:

1. each program (one row of the hidden state) writes its row of the local partial sum into
   every rank's symmetric buffer, in the slot reserved for this rank (remote stores over
   NVLink/P2P, posted: no round trip);
2. it makes those stores visible system-wide (`fence.acq_rel.sys`), meets the other threads of
   the program at a barrier, and raises a flag in every rank's buffer (`st.release.sys`);
3. it waits for the flag of every rank in its own buffer (`ld.acquire.sys`), reads the rows the
   ranks pushed (local memory now) and sums them in rank order in fp32, so every rank computes
   bit-identical sums;
4. residual add and RMSNorm, exactly as `models/triton_ops._rmsnorm_kernel` does them.

No barrier is needed to reuse the buffer. A flag holds the number of the call (the epoch, kept
per program in a local counter that the kernel itself advances, so CUDA graph replays advance
it too), and buffers and flags alternate between two slots by the epoch's parity. Rank q writes
slot s again at call e + 2 only after it saw every rank's flag of call e + 1; a rank raises that
flag only after its call e (which read slot s) finished, since calls run in stream order. Flags
are compared for equality, so the counter can wrap (it cycles through 1..2^30).

Every program signals before it waits, so the kernel cannot deadlock even when its programs do
not all fit on the GPU at once. Eligibility depends only on shapes and dtypes, which are the
same on every rank for the same call (ranks run the same code in lockstep).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 1024  # programs (rows) per call, and flags per (slot, rank)
MAX_COLS = 16384  # one program holds a whole row
_EPOCH_MOD = 1 << 30


@triton.jit
def _fence_sys(dummy):
    return tl.inline_asm_elementwise(
        "fence.acq_rel.sys; mov.u32 $0, 0;", "=r,r", [dummy], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _store_release_sys(addr, value):
    return tl.inline_asm_elementwise(
        "st.release.sys.global.u32 [$1], $2; mov.u32 $0, 0;",
        "=r,l,r", [addr, value], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _wait_equal_acquire_sys(addr, value):
    return tl.inline_asm_elementwise(
        """
        {
        .reg .u32 %seen;
        .reg .pred %p;
        spin:
            ld.acquire.sys.global.u32 %seen, [$1];
            setp.ne.u32 %p, %seen, $2;
            @%p bra spin;
            mov.u32 $0, %seen;
        }
        """,
        "=r,l,r", [addr, value], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _all_reduce_rmsnorm_kernel(
    x_ptr,  # [T, H] this rank's partial sum
    res_ptr,  # [T, H] residual in (unused without HAS_RES)
    w_ptr,  # [H] norm weight
    out_ptr,  # [T, H] norm(sum + residual)
    res_out_ptr,  # [T, H] sum + residual (or the sum)
    data_ptrs,  # int64[WORLD]: each rank's data region, mapped here
    flag_ptrs,  # int64[WORLD]: each rank's flag region, mapped here
    counter_ptr,  # int32[MAX_ROWS]: this rank's epoch per program
    rank,
    n_cols,
    src_stride,  # elements between two ranks' slots in a data region
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    WORLD: tl.constexpr,
    MAX_PROGS: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = x_ptr.dtype.element_ty
    one = tl.zeros([1], dtype=tl.int32)  # [1] blocks: the flag ops run in every thread
    epoch = tl.load(counter_ptr + row) % 1073741824 + 1
    slot = epoch % 2
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    # 1. push this rank's row into every rank's buffer
    mine = (slot * WORLD + rank).to(tl.int64) * src_stride + row.to(tl.int64) * n_cols
    for p in tl.static_range(WORLD):
        dst = tl.load(data_ptrs + p).to(tl.pointer_type(dt))
        tl.store(dst + mine + cols, x, mask=mask)
    # 2. stores visible everywhere, then this rank's flag in every buffer
    _fence_sys(one)
    tl.debug_barrier()
    flag = (slot * WORLD + rank) * MAX_PROGS + row
    for p in tl.static_range(WORLD):
        fp = tl.load(flag_ptrs + p).to(tl.pointer_type(tl.int32))
        _store_release_sys(fp + flag + one, epoch + one)
    # 3. every rank's row, in rank order
    my_flags = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    my_data = tl.load(data_ptrs + rank).to(tl.pointer_type(dt))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for q in tl.static_range(WORLD):
        _wait_equal_acquire_sys(my_flags + (slot * WORLD + q) * MAX_PROGS + row + one, epoch + one)
        src = (slot * WORLD + q).to(tl.int64) * src_stride + row.to(tl.int64) * n_cols
        v = tl.load(my_data + src + cols, mask=mask, other=0.0, cache_modifier=".cg")
        acc += v.to(tl.float32)
    s = acc.to(dt)  # the all-reduce's result, rounded as the unfused all-reduce returns it
    # 4. residual add and RMSNorm (models/triton_ops._rmsnorm_kernel's arithmetic)
    if HAS_RES:
        r = tl.load(res_ptr + row.to(tl.int64) * stride_r + cols, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(res_out_ptr + row.to(tl.int64) * stride_ro + cols, s, mask=mask)
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, 0) / n_cols
    normed = (sf * (1.0 / tl.sqrt_rn(var + eps))).to(dt)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, out.to(dt), mask=mask)
    tl.store(counter_ptr + row, epoch)


class AllReduceRMSNorm:
    """`__call__(x, residual, weight, eps)` -> (norm(sum + residual), sum + residual), where sum
    is `x` summed over the ranks (`residual` None: (norm(sum), sum)); or None when the call is
    not eligible and the caller must all-reduce and normalize separately. `x` is not modified.

    Collective at construction: every rank of the group builds it in the same order."""

    def __init__(self, group_name: str, world: int, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.max_bytes = max_bytes
        self.world = world
        data_bytes = 2 * world * max_bytes
        flag_bytes = 2 * world * MAX_ROWS * 4
        self.buffer = symm_mem.empty(data_bytes + flag_bytes, dtype=torch.uint8, device=device)
        self.buffer.zero_()  # flags start below every epoch
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(self.buffer, group=group_name)  # collective: all zeroed by now
        self.rank = handle.rank
        offset = self.buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        bases = [p + offset for p in handle.buffer_ptrs]
        self.data_ptrs = torch.tensor(bases, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor([b + data_bytes for b in bases], dtype=torch.int64, device=device)
        self.counters = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self._handle = handle  # keeps the peers' mappings alive

    def eligible(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        # Shapes, dtypes and strides only: the same answer on every rank for the same call.
        if not (x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            return False
        rows, cols = x.shape
        if not (0 < rows <= MAX_ROWS and 0 < cols <= MAX_COLS and rows * cols * x.element_size() <= self.max_bytes):
            return False
        if x.stride(1) != 1:
            return False
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
            return False
        return True

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.eligible(x, residual):
            return None
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        self._launch(x, residual, weight, eps, out, res_out, compile_only=False)
        return out, res_out

    def compile(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
        """Compile the variant for these arguments without running it (start-up: a rank whose
        compile failed would otherwise leave its peers spinning on its flags)."""
        self._launch(x, residual, weight, 1e-6, torch.empty_like(x), torch.empty_like(x), compile_only=True)

    def _launch(self, x, residual, weight, eps, out, res_out, compile_only: bool) -> None:
        rows, cols = x.shape
        block = triton.next_power_of_2(cols)
        args = (
            x, residual if residual is not None else x, weight, out, res_out,
            self.data_ptrs, self.flag_ptrs, self.counters,
            self.rank, cols, self.max_bytes // x.element_size(),
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
            eps,
        )
        meta = dict(WORLD=self.world, MAX_PROGS=MAX_ROWS, HAS_RES=residual is not None, BLOCK=block,
                    num_warps=min(max(block // 256, 1), 16))
        if compile_only:
            _all_reduce_rmsnorm_kernel.warmup(*args, grid=(rows,), **meta)
        else:
            _all_reduce_rmsnorm_kernel[(rows,)](*args, **meta)
