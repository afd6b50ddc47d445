//! Launch planning for the CUDA kernels in `kernels/*.cu`: grid, block and shared memory for each
//! kernel family, with every overflow checked, as pure functions. They compile and are unit-tested
//! without the `cuda` feature and without a GPU; the CUDA backend only turns a [`Launch`] into a
//! `cudarc::driver::LaunchConfig` and pushes the arguments.
//!
//! Hardware limits assumed (sm_80 and newer): grid.x ≤ 2³¹ − 1, grid.y and grid.z ≤ 65 535, at most
//! 1 024 threads per block, 48 KiB of static shared memory per block. Kernel scalar dimensions are
//! `int` on the device, so every dimension passed as one must fit in an i32; flat indices are 64-bit.

use crate::error::{KernelError, Result};

mod attn_flash;
pub use attn_flash::{
    attention_flash, attention_flash_bwd, attention_flash_bwd_smem, attention_flash_smem,
    flash_bwd_tiling, BwdTiling, FlashSmem, SMEM_STATIC_MAX,
};

/// Threads per block of the 1-D grid-stride kernels.
pub const ELEMENTWISE_BLOCK: u32 = 256;
/// Upper bound on the 1-D grid of grid-stride kernels (beyond this each thread loops; more blocks
/// would not add parallelism on any current GPU: 132 SMs × 2 048 threads = 1 056 blocks of 256).
pub const MAX_STRIDE_GRID: u64 = 1 << 16;
/// Blocks of the first pass of `reduce.cu` (each writes one f64 partial).
pub const REDUCE_MAX_GRID: u64 = 1024;
/// grid.x limit.
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// grid.y / grid.z limit.
pub const MAX_GRID_YZ: u64 = 65_535;
/// Block and reduction tile of `nf4_gemm.cu` (must match BM, BN, BK there).
pub const NF4_GEMM_TILE: (u64, u64, u64) = (128, 128, 32);
/// Largest M served by the GEMV kernel (`nf4_gemv.cu` keeps M accumulators per lane).
pub const NF4_GEMV_MAX_M: usize = 8;
/// Largest head dimension of `attention.cu` (8 registers per lane × 32 lanes).
pub const ATTN_MAX_D: usize = 256;
/// Warps (one query row each) per block in `attention.cu`.
pub const ATTN_WARPS: u32 = 4;
/// Rank chunk of the LoRA kernels (`RCH` in lora.cu).
pub const LORA_RANK_CHUNK: u64 = 16;

/// A kernel launch: grid and block dimensions and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

fn invalid(op: &'static str, arg: &'static str, msg: String) -> KernelError {
    KernelError::Invalid { op, arg, msg }
}

/// `value` as a device `int`, or an error naming the op and argument.
pub fn to_i32(op: &'static str, arg: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        invalid(
            op,
            arg,
            format!("{value} does not fit in the kernel's 32-bit int"),
        )
    })
}

/// `a·b` without overflow, or an error.
pub fn checked_mul(op: &'static str, arg: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(op, arg, format!("{a}·{b} overflows usize")))
}

fn grid_x(op: &'static str, arg: &'static str, blocks: u64) -> Result<u32> {
    if blocks > MAX_GRID_X {
        return Err(invalid(
            op,
            arg,
            format!("needs {blocks} blocks, more than the grid.x limit {MAX_GRID_X}"),
        ));
    }
    Ok(blocks.max(1) as u32)
}

fn grid_yz(op: &'static str, arg: &'static str, blocks: u64) -> Result<u32> {
    if blocks > MAX_GRID_YZ {
        return Err(invalid(
            op,
            arg,
            format!("needs {blocks} blocks, more than the grid.y/z limit {MAX_GRID_YZ}"),
        ));
    }
    Ok(blocks.max(1) as u32)
}

/// 1-D grid-stride loop over `n` items (elementwise kernels, NF4 dequant chunks, rope pairs...).
/// `n = 0` still gets one block (the kernel's loop does nothing), so callers need no special case.
pub fn elementwise(n: usize) -> Launch {
    let blocks = (n as u64)
        .div_ceil(ELEMENTWISE_BLOCK as u64)
        .clamp(1, MAX_STRIDE_GRID);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: (ELEMENTWISE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (RMSNorm, cross-entropy, embedding): `rows` blocks of
/// min(1024, round_up(width, 32)) threads (at least 32, at most `max_block`).
pub fn rows(op: &'static str, rows: usize, width: usize, max_block: u32) -> Result<Launch> {
    let threads = (width as u64)
        .div_ceil(32)
        .saturating_mul(32)
        .clamp(32, max_block.clamp(32, 1024) as u64) as u32;
    Ok(Launch {
        grid: (grid_x(op, "rows", rows as u64)?, 1, 1),
        block: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Pass 1 of `reduce.cu`: grid-stride over `n` with at most [`REDUCE_MAX_GRID`] blocks; the grid size
/// is also the number of f64 partials pass 2 sums.
pub fn reduce(n: usize) -> Launch {
    let blocks = (n as u64)
        .div_ceil(ELEMENTWISE_BLOCK as u64)
        .clamp(1, REDUCE_MAX_GRID);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: (ELEMENTWISE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `nf4_dequant.cu`: one thread per 16-element chunk.
pub fn nf4_dequant(numel: usize) -> Launch {
    elementwise(numel.div_ceil(16))
}

/// `nf4_quant.cu` `nf4_quant_k`: one warp per 64-element block, 256-thread blocks (8 NF4 blocks
/// each), grid-stride.
pub fn nf4_quant(numel: usize) -> Launch {
    elementwise(numel.div_ceil(64).saturating_mul(32))
}

/// `nf4_quant.cu` `nf4_quant_nested_k`: one 256-thread block per group of 256 absmax values (the
/// kernel requires blockDim = 256 = `nf4::NESTED_BLOCK`), grid-stride.
pub fn nf4_quant_nested(blocks: usize) -> Launch {
    elementwise(blocks)
}

// ---- Path selection -------------------------------------------------------------------------------
//
// Which implementation serves an op is a pure function of the operands' storage dtypes, the device and
// the backend's options, so it is unit-tested here without a GPU. The rule that matters for
// correctness: the bf16 tensor-core (`mma.sync`) kernels round their inputs to bf16, so they may only
// take operands that are *stored* bf16; f32 (and f16) data goes to the CUDA-core kernels or to cuBLAS in
// its own precision (CUBLAS_COMPUTE_32F; the backend never enables TF32 math), so an f32 model on the
// GPU computes what the CPU reference computes, to f32 rounding.

/// The storage dtype of an operand, as the path choice sees it (the CUDA backend's `Dtype`, which only
/// exists with the `cuda` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    F32,
    Bf16,
    F16,
}

/// What the device and the backend's options allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathCaps {
    /// bf16 `mma.sync` exists (sm_80 and newer) and is not disabled (`AFINAR_NO_MMA=1`).
    pub bf16_mma: bool,
    /// The CUDA-core attention was asked for (`CudaOptions::simt_attention`, `AFINAR_ATTN_PATH=simt`).
    pub simt_attention: bool,
    /// The first tensor-core attention kernels (attention.cu's `*_mma_*`) were asked for instead of
    /// attention_flash.cu (`CudaOptions::mma_attention`, `AFINAR_ATTN_PATH=mma`), for comparisons.
    pub mma_attention: bool,
    /// The device's opt-in limit of dynamic shared memory per block, in bytes
    /// (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 227 KiB on sm_90, 163 KiB on sm_80,
    /// 99 KiB on sm_86/89). Kernels needing more are not selected.
    pub max_dyn_smem: u32,
    /// The fused NF4 tensor-core GEMM was asked for at training shapes (`AFINAR_NF4_FUSED=1`) instead
    /// of dequantize + cuBLAS.
    pub nf4_fused: bool,
    /// The fused LoRA kernels of lora.cu were asked for (`AFINAR_LORA_FUSED=1`) instead of cuBLAS.
    pub lora_fused: bool,
}

/// Whether a bf16 tensor-core kernel may take these operands: the device has one and every operand is
/// stored bf16 (an f32 or f16 operand would be silently rounded to bf16's 8-bit mantissa).
pub fn tensor_cores_for(caps: PathCaps, operands: &[Store]) -> bool {
    caps.bf16_mma && !operands.is_empty() && operands.iter().all(|&s| s == Store::Bf16)
}

/// The attention kernels for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPath {
    /// attention_flash.cu (D ∈ {128, 256}, bf16 Q, K, V and dOut, sm_80+, enough shared memory).
    Flash,
    /// attention.cu's `*_mma_*` kernels (D ∈ {16, 32, 64, 128, 256}, bf16 Q, K, V and dOut).
    TensorCores,
    /// The CUDA-core kernels (any D ≤ 256, f32 arithmetic on any storage).
    CudaCores,
}

/// `operands`: Q, K, V (and dOut for the backward); `flash_smem`: the dynamic shared memory the
/// attention_flash.cu kernels of this head dim need (the largest of the call's kernels), `None` when
/// there are none for it; `has_mma_kernel`: an attention.cu tensor-core kernel exists for this head dim.
/// Flash is the default wherever it applies; `mma_attention` selects the older tensor-core kernels,
/// `simt_attention` the CUDA cores.
pub fn attention_path(
    caps: PathCaps,
    operands: &[Store],
    flash_smem: Option<u32>,
    has_mma_kernel: bool,
) -> AttnPath {
    if caps.simt_attention || !tensor_cores_for(caps, operands) {
        return AttnPath::CudaCores;
    }
    match flash_smem {
        Some(need) if !caps.mma_attention && need <= caps.max_dyn_smem => AttnPath::Flash,
        _ if has_mma_kernel => AttnPath::TensorCores,
        _ => AttnPath::CudaCores,
    }
}

/// Smallest M at which an NF4 linear (M > [`NF4_GEMV_MAX_M`]) dequantizes the weight into the reused
/// scratch and calls cuBLAS rather than the fused tensor-core GEMM. Below it the fused kernel reads
/// 4-bit weights once for few rows and is expected to win (the dequantize alone writes 2 bytes per
/// weight); at training shapes (M ≥ 1024) cuBLAS wins by ~8× (measured on an H200: the fused GEMM runs
/// at 0.10–0.14× cuBLAS bf16). The crossover itself is not measured yet: gpu_bench's rows at M = 1024
/// and 4096 bound it from above.
pub const NF4_DENSE_MIN_M: usize = 128;

/// Which NF4 linear serves M rows whose activation operand (X forward, dY backward) is stored `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nf4Path {
    /// nf4_gemv.cu (M ≤ [`NF4_GEMV_MAX_M`], forward only): f32 arithmetic on any storage.
    Gemv,
    /// nf4_gemm.cu on bf16 tensor cores (bf16 activations only).
    FusedMma,
    /// Dequantize W̃ into the backend's reused scratch in the activation's dtype, then cuBLAS in that
    /// dtype (f32 data: an f32 GEMM).
    DequantGemm,
}

/// `forward`: X·W̃ᵀ (the GEMV serves small M there); the backward dY·W̃ has no GEMV.
pub fn nf4_path(caps: PathCaps, m: usize, x: Store, forward: bool) -> Nf4Path {
    if forward && m <= NF4_GEMV_MAX_M {
        return Nf4Path::Gemv;
    }
    let fused_ok = tensor_cores_for(caps, &[x]);
    if fused_ok && (caps.nf4_fused || m < NF4_DENSE_MIN_M) {
        Nf4Path::FusedMma
    } else {
        Nf4Path::DequantGemm
    }
}

/// The rank-r halves of the LoRA linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPath {
    /// GEMMs (cuBLAS, or gemm.cu without it) with β = 1 accumulation into Y, dX, dA and dB; the dropout
    /// mask is an elementwise multiply.
    Gemm,
    /// lora.cu's kernels (lora_proj_k, lora_add_k, lora_da_k, lora_db_k, lora_dx_k).
    Fused,
}

pub fn lora_path(caps: PathCaps) -> LoraPath {
    if caps.lora_fused {
        LoraPath::Fused
    } else {
        LoraPath::Gemm
    }
}

/// `nf4_gemv.cu`: one warp per output column, 8 warps per block.
pub fn nf4_gemv(m: usize, n: usize) -> Result<Launch> {
    if m == 0 || m > NF4_GEMV_MAX_M {
        return Err(invalid(
            "nf4_gemv",
            "m",
            format!("M = {m}; the GEMV serves 1 ≤ M ≤ {NF4_GEMV_MAX_M}"),
        ));
    }
    Ok(Launch {
        grid: (grid_x("nf4_gemv", "n", (n as u64).div_ceil(8))?, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `nf4_gemm.cu`: output C [m, nc], 128×128 block tiles, 256 threads, static shared memory.
pub fn nf4_gemm(m: usize, nc: usize) -> Result<Launch> {
    let (bm, bn, _) = NF4_GEMM_TILE;
    Ok(Launch {
        grid: (
            grid_x("nf4_gemm", "columns", (nc as u64).div_ceil(bn))?,
            grid_yz("nf4_gemm", "m", (m as u64).div_ceil(bm))?,
            1,
        ),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `gemm.cu` (the SIMT fallback GEMM): 16×16 threads, one output each.
pub fn gemm_fallback(m: usize, n: usize) -> Result<Launch> {
    Ok(Launch {
        grid: (
            grid_x("gemm", "n", (n as u64).div_ceil(16))?,
            grid_yz("gemm", "m", (m as u64).div_ceil(16))?,
            1,
        ),
        block: (16, 16, 1),
        shared_mem_bytes: 0,
    })
}

/// `attention.cu`: one warp per row (query row for fwd/dq/delta, key row for dk/dv).
pub fn attention(rows: usize, d: usize) -> Result<Launch> {
    if d == 0 || d > ATTN_MAX_D {
        return Err(invalid(
            "attention",
            "d",
            format!("head dim D = {d}; the kernel supports 1 ≤ D ≤ {ATTN_MAX_D}"),
        ));
    }
    Ok(Launch {
        grid: (
            grid_x(
                "attention",
                "rows",
                (rows as u64).div_ceil(ATTN_WARPS as u64),
            )?,
            1,
            1,
        ),
        block: (32 * ATTN_WARPS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Queries per block of the tensor-core attention forward (`FQ` in attention.cu).
pub const ATTN_MMA_QUERIES: u64 = 64;

/// The tensor-core attention forward for head dim `d`, when there is one: (launch, kernel name).
/// `None` means the CUDA-core kernel (`attention`) serves this D.
pub fn attention_mma(
    b: usize,
    t: usize,
    nh: usize,
    d: usize,
) -> Result<Option<(Launch, &'static str)>> {
    let name = match d {
        16 => "attn_fwd_mma_d16_k",
        32 => "attn_fwd_mma_d32_k",
        64 => "attn_fwd_mma_d64_k",
        128 => "attn_fwd_mma_d128_k",
        256 => "attn_fwd_mma_d256_k",
        _ => return Ok(None),
    };
    let heads = (b as u64).saturating_mul(nh as u64);
    Ok(Some((
        Launch {
            grid: (
                grid_x("attention", "t", (t as u64).div_ceil(ATTN_MMA_QUERIES))?,
                grid_yz("attention", "b·nh", heads)?,
                1,
            ),
            block: (128, 1, 1),
            shared_mem_bytes: 0,
        },
        name,
    )))
}

/// The tensor-core attention backward for head dim `d` (TK = T), when there is one: the launches of the
/// dq kernel (grid over B·NH) and of the dk/dv kernels (grid over B·NKV), and the kernel names
/// (dq, dk, dv). W warps of 16 rows per block: 1 for D = 256 (shared memory), 4 otherwise.
pub fn attention_mma_bwd(
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    d: usize,
) -> Result<Option<(Launch, Launch, [&'static str; 3])>> {
    let names = match d {
        16 => [
            "attn_bwd_dq_mma_d16_k",
            "attn_bwd_dk_mma_d16_k",
            "attn_bwd_dv_mma_d16_k",
        ],
        32 => [
            "attn_bwd_dq_mma_d32_k",
            "attn_bwd_dk_mma_d32_k",
            "attn_bwd_dv_mma_d32_k",
        ],
        64 => [
            "attn_bwd_dq_mma_d64_k",
            "attn_bwd_dk_mma_d64_k",
            "attn_bwd_dv_mma_d64_k",
        ],
        128 => [
            "attn_bwd_dq_mma_d128_k",
            "attn_bwd_dk_mma_d128_k",
            "attn_bwd_dv_mma_d128_k",
        ],
        256 => [
            "attn_bwd_dq_mma_d256_k",
            "attn_bwd_dk_mma_d256_k",
            "attn_bwd_dv_mma_d256_k",
        ],
        _ => return Ok(None),
    };
    let warps: u64 = if d >= 256 { 1 } else { 4 };
    let gx = grid_x("attention", "t", (t as u64).div_ceil(16 * warps))?;
    let block = (32 * warps as u32, 1, 1);
    let dq = Launch {
        grid: (
            gx,
            grid_yz("attention", "b·nh", (b as u64).saturating_mul(nh as u64))?,
            1,
        ),
        block,
        shared_mem_bytes: 0,
    };
    let dkv = Launch {
        grid: (
            gx,
            grid_yz("attention", "b·nkv", (b as u64).saturating_mul(nkv as u64))?,
            1,
        ),
        block,
        shared_mem_bytes: 0,
    };
    Ok(Some((dq, dkv, names)))
}

/// `lora.cu` lora_proj_k: one block per row, rank chunks of 16 on grid.y.
pub fn lora_proj(m: usize, r: usize) -> Result<Launch> {
    Ok(Launch {
        grid: (
            grid_x("lora", "m", m as u64)?,
            grid_yz("lora", "r", (r as u64).div_ceil(LORA_RANK_CHUNK))?,
            1,
        ),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `lora.cu` lora_da_k / lora_db_k: thread per column, rank chunks of 16 on grid.y.
pub fn lora_cols(cols: usize, r: usize) -> Result<Launch> {
    Ok(Launch {
        grid: (
            grid_x("lora", "cols", (cols as u64).div_ceil(256))?,
            grid_yz("lora", "r", (r as u64).div_ceil(LORA_RANK_CHUNK))?,
            1,
        ),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Rows of the fused LM head + cross-entropy processed at once, so the f32 logits chunk
/// [rows, V] stays within `budget_bytes` (at least one row, at most `n`).
pub fn lm_head_chunk_rows(n: usize, v: usize, budget_bytes: usize) -> usize {
    let per_row = v.saturating_mul(4).max(1);
    (budget_bytes / per_row).clamp(1, n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_covers_every_item_and_caps_the_grid() {
        assert_eq!(elementwise(0).grid.0, 1);
        assert_eq!(elementwise(256).grid.0, 1);
        assert_eq!(elementwise(257).grid.0, 2);
        // 2^40 items: the grid is capped; the kernel's grid-stride loop covers the rest.
        let l = elementwise(1 << 40);
        assert_eq!(l.grid.0 as u64, MAX_STRIDE_GRID);
        assert_eq!(l.block, (256, 1, 1));
    }

    #[test]
    fn rows_rounds_threads_to_warps() {
        let l = rows("rmsnorm", 7, 33, 1024).unwrap();
        assert_eq!((l.grid.0, l.block.0), (7, 64));
        assert_eq!(rows("rmsnorm", 1, 1, 1024).unwrap().block.0, 32);
        assert_eq!(rows("ce", 3, 256_000, 1024).unwrap().block.0, 1024);
        assert_eq!(rows("ce", 3, 256_000, 256).unwrap().block.0, 256);
        assert!(matches!(
            rows("rmsnorm", 1 << 31, 8, 1024),
            Err(KernelError::Invalid { op: "rmsnorm", .. })
        ));
    }

    #[test]
    fn reduce_grid_is_bounded() {
        assert_eq!(reduce(1).grid.0, 1);
        assert_eq!(reduce(1 << 30).grid.0 as u64, REDUCE_MAX_GRID);
    }

    #[test]
    fn nf4_plans() {
        assert_eq!(
            nf4_dequant(3584 * 14336).grid.0 as u64,
            ((3584u64 * 14336).div_ceil(16))
                .div_ceil(256)
                .min(MAX_STRIDE_GRID)
        );
        assert_eq!(nf4_dequant(17).grid.0, 1);
        assert_eq!(nf4_gemv(1, 14336).unwrap().grid.0, 1792);
        assert!(nf4_gemv(9, 4).is_err());
        assert!(nf4_gemv(0, 4).is_err());
        let g = nf4_gemm(4096, 14336).unwrap();
        assert_eq!((g.grid.0, g.grid.1, g.block.0), (112, 32, 256));
        let g = nf4_gemm(129, 1).unwrap();
        assert_eq!((g.grid.0, g.grid.1), (1, 2));
        // M beyond 65 535 tiles of 128 rows does not fit grid.y.
        assert!(nf4_gemm(128 * 65_536, 8).is_err());
    }

    #[test]
    fn attention_limits_head_dim() {
        let l = attention(2 * 2048 * 16, 256).unwrap();
        assert_eq!((l.grid.0, l.block.0), (16_384, 128));
        assert!(attention(4, 257).is_err());
        assert!(attention(4, 0).is_err());
        assert_eq!(attention(1, 64).unwrap().grid.0, 1);
    }

    #[test]
    fn attention_mma_serves_multiples_of_16_up_to_256() {
        let (l, name) = attention_mma(2, 2048, 16, 256).unwrap().unwrap();
        assert_eq!(
            (l.grid, l.block.0, name),
            ((32, 32, 1), 128, "attn_fwd_mma_d256_k")
        );
        assert_eq!(
            attention_mma(1, 65, 1, 16).unwrap().unwrap().0.grid,
            (2, 1, 1)
        );
        assert!(attention_mma(1, 8, 1, 40).unwrap().is_none());
        assert!(attention_mma(1, 8, 1, 512).unwrap().is_none());
        // B·NH beyond grid.y.
        assert!(attention_mma(65_536, 8, 1, 64).is_err());
    }

    #[test]
    fn attention_mma_bwd_plans() {
        let (dq, dkv, names) = attention_mma_bwd(1, 2048, 16, 8, 256).unwrap().unwrap();
        assert_eq!(
            (dq.grid, dkv.grid, dq.block.0),
            ((128, 16, 1), (128, 8, 1), 32)
        );
        assert_eq!(names[2], "attn_bwd_dv_mma_d256_k");
        let (dq, _, _) = attention_mma_bwd(2, 70, 4, 2, 64).unwrap().unwrap();
        assert_eq!((dq.grid, dq.block.0), ((2, 8, 1), 128));
        assert!(attention_mma_bwd(1, 8, 2, 1, 80).unwrap().is_none());
    }

    #[test]
    fn lora_and_gemm_plans() {
        let l = lora_proj(4096, 16).unwrap();
        assert_eq!((l.grid.0, l.grid.1), (4096, 1));
        assert_eq!(lora_proj(5, 17).unwrap().grid.1, 2);
        assert_eq!(lora_cols(3584, 64).unwrap().grid, (14, 4, 1));
        let g = gemm_fallback(17, 33).unwrap();
        assert_eq!((g.grid.0, g.grid.1, g.block), (3, 2, (16, 16, 1)));
    }

    #[test]
    fn int_and_overflow_checks() {
        assert_eq!(to_i32("op", "k", 5).unwrap(), 5);
        assert!(matches!(
            to_i32("op", "k", 1 << 31),
            Err(KernelError::Invalid {
                op: "op",
                arg: "k",
                ..
            })
        ));
        assert!(checked_mul("op", "m·k", usize::MAX, 2).is_err());
        assert_eq!(checked_mul("op", "m·k", 3, 4).unwrap(), 12);
    }

    #[test]
    fn lm_head_chunks_fit_the_budget() {
        assert_eq!(lm_head_chunk_rows(4096, 256_000, 256 << 20), 262);
        assert_eq!(lm_head_chunk_rows(10, 256_000, 1), 1);
        assert_eq!(lm_head_chunk_rows(10, 16, 1 << 30), 10);
        assert_eq!(lm_head_chunk_rows(0, 16, 1 << 30), 1);
    }

    pub(super) const MMA: PathCaps = PathCaps {
        bf16_mma: true,
        simt_attention: false,
        mma_attention: false,
        max_dyn_smem: 227 * 1024,
        nf4_fused: false,
        lora_fused: false,
    };

    /// f32 (and f16) data never reaches a bf16 tensor-core kernel, whatever the device and options.
    #[test]
    fn tensor_cores_only_for_bf16_storage() {
        use Store::*;
        assert!(tensor_cores_for(MMA, &[Bf16, Bf16, Bf16]));
        for ops in [
            [F32, F32, F32],
            [Bf16, F32, Bf16],
            [F16, F16, F16],
            [Bf16, Bf16, F16],
        ] {
            assert!(!tensor_cores_for(MMA, &ops), "{ops:?}");
        }
        assert!(!tensor_cores_for(MMA, &[]));
        let no_mma = PathCaps {
            bf16_mma: false,
            ..MMA
        };
        assert!(!tensor_cores_for(no_mma, &[Bf16]));
    }

    #[test]
    fn attention_path_follows_storage() {
        use Store::*;
        let tc = AttnPath::TensorCores;
        let cc = AttnPath::CudaCores;
        assert_eq!(attention_path(MMA, &[Bf16; 4], None, true), tc);
        // The f32 golden models on an H200: CUDA cores (the mma path rounded them to bf16).
        for flash in [None, Some(1024)] {
            assert_eq!(attention_path(MMA, &[F32; 3], flash, true), cc);
            assert_eq!(attention_path(MMA, &[F32; 4], flash, true), cc);
            assert_eq!(
                attention_path(MMA, &[Bf16, Bf16, Bf16, F32], flash, true),
                cc
            );
            assert_eq!(attention_path(MMA, &[F16; 3], flash, true), cc);
        }
        assert_eq!(attention_path(MMA, &[Bf16; 3], None, false), cc);
        let simt = PathCaps {
            simt_attention: true,
            ..MMA
        };
        assert_eq!(attention_path(simt, &[Bf16; 3], Some(1024), true), cc);
        let sm75 = PathCaps {
            bf16_mma: false,
            ..MMA
        };
        assert_eq!(attention_path(sm75, &[Bf16; 3], Some(1024), true), cc);
    }

    #[test]
    fn nf4_path_follows_storage_and_shape() {
        use Nf4Path::*;
        use Store::*;
        // Decode shapes: the GEMV (f32 arithmetic) for every dtype, forward only.
        for x in [F32, Bf16, F16] {
            assert_eq!(nf4_path(MMA, 1, x, true), Gemv);
            assert_eq!(nf4_path(MMA, NF4_GEMV_MAX_M, x, true), Gemv);
        }
        // Training shapes: dequantize + cuBLAS by default.
        for m in [NF4_DENSE_MIN_M, 1024, 4096] {
            assert_eq!(nf4_path(MMA, m, Bf16, true), DequantGemm);
            assert_eq!(nf4_path(MMA, m, Bf16, false), DequantGemm);
        }
        // Small M with bf16 data: the fused kernel; f32/f16 data never takes it.
        assert_eq!(nf4_path(MMA, 9, Bf16, true), FusedMma);
        assert_eq!(nf4_path(MMA, 1, Bf16, false), FusedMma);
        for x in [F32, F16] {
            for m in [1, 9, 127, 4096] {
                assert_eq!(nf4_path(MMA, m, x, false), DequantGemm, "{x:?} M={m}");
            }
            assert_eq!(nf4_path(MMA, 9, x, true), DequantGemm);
        }
        // AFINAR_NF4_FUSED=1: the fused kernel at every M > 8 — for bf16 data only.
        let fused = PathCaps {
            nf4_fused: true,
            ..MMA
        };
        assert_eq!(nf4_path(fused, 4096, Bf16, true), FusedMma);
        assert_eq!(nf4_path(fused, 4096, F32, true), DequantGemm);
        let sm75 = PathCaps {
            bf16_mma: false,
            nf4_fused: true,
            ..MMA
        };
        assert_eq!(nf4_path(sm75, 9, Bf16, true), DequantGemm);
    }

    #[test]
    fn lora_path_default_is_gemm() {
        assert_eq!(lora_path(MMA), LoraPath::Gemm);
        let fused = PathCaps {
            lora_fused: true,
            ..MMA
        };
        assert_eq!(lora_path(fused), LoraPath::Fused);
    }

    /// The nested absmax decode must be a rounded multiply then a rounded add, as the host's
    /// `Nf4Tensor::block_absmax` (NVRTC would contract `a * b + c` into one FMA), and it must be the
    /// only decode in the kernels.
    #[test]
    fn nf4_absmax_decode_is_explicitly_rounded() {
        let common = include_str!("../../../kernels/common.cuh");
        assert!(common.contains(
            "return __fadd_rn(__fmul_rn(w.code8[w.codes[blk]], w.absmax[blk >> 8]), w.offset);"
        ));
        for (file, src) in crate::abi::SOURCES {
            assert!(
                !src.contains("code8["),
                "{file} decodes an absmax itself; use nf4_absmax (common.cuh)"
            );
        }
    }

    /// The NF4 table in kernels/common.cuh must be the one in nf4.rs (the kernels cannot import it).
    #[test]
    fn cuda_nf4_table_matches_rust() {
        let src = include_str!("../../../kernels/common.cuh");
        let start = src
            .find("#define NF4_TABLE")
            .expect("NF4_TABLE in common.cuh");
        let body = &src[start..];
        let open = body.find('{').unwrap();
        let close = body.find('}').unwrap();
        let vals: Vec<f32> = body[open + 1..close]
            .split(',')
            .map(|s| {
                s.replace('\\', "")
                    .trim()
                    .trim_end_matches('f')
                    .parse::<f32>()
                    .expect("a float literal")
            })
            .collect();
        assert_eq!(vals.len(), 16);
        for (i, (a, b)) in vals.iter().zip(crate::nf4::NF4_CODE.iter()).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "NF4 code {i}: common.cuh {a} vs nf4.rs {b}"
            );
        }
    }
}
