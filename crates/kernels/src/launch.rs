//! Launch planning for the CUDA kernels in `kernels/*.cu`: grid, block and shared memory for each
//! kernel family, with every overflow checked, as pure functions. They compile and are unit-tested
//! without the `cuda` feature and without a GPU; the CUDA backend only turns a [`Launch`] into a
//! `cudarc::driver::LaunchConfig` and pushes the arguments.
//!
//! Hardware limits assumed (sm_80 and newer): grid.x ≤ 2³¹ − 1, grid.y and grid.z ≤ 65 535, at most
//! 1 024 threads per block, 48 KiB of static shared memory per block. Kernel scalar dimensions are
//! `int` on the device, so every dimension passed as one must fit in an i32; flat indices are 64-bit.

use crate::error::{KernelError, Result};

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

/// Which NF4 linear kernel serves M rows: the GEMV for decode shapes, the mma GEMM otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nf4Path {
    Gemv,
    Gemm,
}

pub fn nf4_path(m: usize) -> Nf4Path {
    if m <= NF4_GEMV_MAX_M {
        Nf4Path::Gemv
    } else {
        Nf4Path::Gemm
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
        assert_eq!(nf4_path(1), Nf4Path::Gemv);
        assert_eq!(nf4_path(8), Nf4Path::Gemv);
        assert_eq!(nf4_path(9), Nf4Path::Gemm);
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
