//! Launch planning for kernels/attention_flash.cu (FlashAttention-2-style tensor-core attention for
//! D ∈ {128, 256}): grids, blocks and dynamic shared memory. The tile constants mirror FA_BQ, FA_BKV,
//! FA_BQB and FaKeys<D>::BK there; the shared-memory formulas mirror fa_*_smem, and the emulated check
//! (kernels/emu/check_attention.cpp) pins the same byte counts as the tests below.

use super::{grid_x, grid_yz, Launch};
use crate::error::Result;

/// Queries per block of the forward and dq kernels (4 warps × 16 rows).
const FA_BQ: u64 = 64;
/// Keys per block of the dk/dv kernel (4 key groups × 16 rows, 8 warps).
const FA_BKV: u64 = 64;
/// Queries per streamed tile of the dk/dv kernel.
const FA_BQB: u64 = 32;
/// Static shared memory a block may use without the opt-in attribute; dynamic shared memory above it
/// needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set on the function (cuda/args.rs does).
pub const SMEM_STATIC_MAX: u32 = 48 * 1024;

/// Dynamic shared memory in bytes of the three kernels of one head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashSmem {
    pub fwd: u32,
    pub dq: u32,
    pub dkv: u32,
}

/// Key tile of the forward and dq kernels: 32 keys at D = 256, 64 at D = 128 (FaKeys<D>::BK).
fn key_tile(d: u64) -> u64 {
    if d >= 256 {
        32
    } else {
        64
    }
}

/// The shared memory of attention_flash.cu's kernels for head dim `d` (the backward's default
/// tiling), `None` for a head dim it does not serve. bf16 tiles with a row pitch of D + 8 elements:
/// forward Q [64] + K, V [2 stages][BK]; dq Q, dO [64] + K, V [2][BK]; dk/dv K, V [64] + Q, dO
/// [stages][BQB], the Sᵀ/dPᵀ exchange (8 warps × BQB/8 × 4 × 32 f32) and lse, Δ [stages][BQB] f32.
pub fn attention_flash_smem(d: usize) -> Option<FlashSmem> {
    if d != 128 && d != 256 {
        return None;
    }
    let bwd = attention_flash_bwd_smem(d, BwdTiling::Default)?;
    let d = d as u64;
    let (pitch, bk) = ((d + 8) * 2, key_tile(d));
    let bytes = |x: u64| x as u32; // at most 101 376: fits
    Some(FlashSmem {
        fwd: bytes((FA_BQ + 4 * bk) * pitch),
        dq: bwd.0,
        dkv: bwd.1,
    })
}

/// The flash forward for head dim `d`: (launch, kernel name), `None` when it does not serve `d`.
/// Grid (⌈T/64⌉, B·NH), 128 threads.
pub fn attention_flash(
    b: usize,
    t: usize,
    nh: usize,
    d: usize,
) -> Result<Option<(Launch, &'static str)>> {
    let name = match d {
        128 => "attn_fwd_flash_d128_k",
        256 => "attn_fwd_flash_d256_k",
        _ => return Ok(None),
    };
    let Some(smem) = attention_flash_smem(d) else {
        return Ok(None);
    };
    Ok(Some((
        Launch {
            grid: (
                grid_x("attention", "t", (t as u64).div_ceil(FA_BQ))?,
                grid_yz("attention", "b·nh", (b as u64).saturating_mul(nh as u64))?,
                1,
            ),
            block: (128, 1, 1),
            shared_mem_bytes: smem.fwd,
        },
        name,
    )))
}

/// The tiling of the flash backward (attention_flash.cu's `FaBwd<D, SMALL>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BwdTiling {
    /// 32-key (D = 256) / 64-key dq tiles, double-buffered 32-query dk/dv tiles: for sm_80/sm_90's
    /// 163/227 KiB of shared memory per block.
    Default,
    /// 16-key dq tiles, single-buffered 16-query dk/dv tiles (the `_s` kernels): fits the 99 KiB of
    /// sm_86/sm_89, the 24 GB consumer GPUs, where the default D = 256 backward does not.
    Small,
}

/// Dynamic shared memory in bytes of the (dq, dk/dv) flash backward kernels for head dim `d` under
/// `tiling` (fa_dq_smem / fa_dkv_smem), `None` for a head dim it does not serve.
pub fn attention_flash_bwd_smem(d: usize, tiling: BwdTiling) -> Option<(u32, u32)> {
    if d != 128 && d != 256 {
        return None;
    }
    let d = d as u64;
    let pitch = (d + 8) * 2;
    // (dq key tile, dk/dv query tile, dk/dv stages)
    let (bk, bqb, stages) = match tiling {
        BwdTiling::Default => (key_tile(d), FA_BQB, 2),
        BwdTiling::Small => (16, 16, 1),
    };
    let dq = (2 * FA_BQ + 4 * bk) * pitch;
    let dkv =
        (2 * FA_BKV + 2 * stages * bqb) * pitch + 8 * (bqb / 8) * 4 * 32 * 4 + 2 * stages * bqb * 4;
    Some((dq as u32, dkv as u32)) // at most 152 064: fits
}

/// The backward tiling for a device with `max_dyn_smem` bytes of opt-in shared memory per block: the
/// default where it fits, else the small one (whether that fits is the path choice's question).
pub fn flash_bwd_tiling(d: usize, max_dyn_smem: u32) -> BwdTiling {
    match attention_flash_bwd_smem(d, BwdTiling::Default) {
        Some((dq, dkv)) if dq.max(dkv) > max_dyn_smem => BwdTiling::Small,
        _ => BwdTiling::Default,
    }
}

/// The flash backward for head dim `d` (TK = T) under `tiling`: the dq launch (grid (⌈T/64⌉, B·NH),
/// 128 threads), the dk/dv launch (grid (⌈T/64⌉, B·NKV), 256 threads) and their kernel names; `None`
/// when it does not serve `d`. Both tilings keep 64 queries per dq block and 64 keys per dk/dv block,
/// so only the shared memory and the kernels differ.
pub fn attention_flash_bwd(
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    tiling: BwdTiling,
) -> Result<Option<(Launch, Launch, [&'static str; 2])>> {
    let names = match (d, tiling) {
        (128, BwdTiling::Default) => ["attn_bwd_dq_flash_d128_k", "attn_bwd_dkv_flash_d128_k"],
        (256, BwdTiling::Default) => ["attn_bwd_dq_flash_d256_k", "attn_bwd_dkv_flash_d256_k"],
        (128, BwdTiling::Small) => ["attn_bwd_dq_flash_s_d128_k", "attn_bwd_dkv_flash_s_d128_k"],
        (256, BwdTiling::Small) => ["attn_bwd_dq_flash_s_d256_k", "attn_bwd_dkv_flash_s_d256_k"],
        _ => return Ok(None),
    };
    let Some((dq_smem, dkv_smem)) = attention_flash_bwd_smem(d, tiling) else {
        return Ok(None);
    };
    let dq = Launch {
        grid: (
            grid_x("attention", "t", (t as u64).div_ceil(FA_BQ))?,
            grid_yz("attention", "b·nh", (b as u64).saturating_mul(nh as u64))?,
            1,
        ),
        block: (128, 1, 1),
        shared_mem_bytes: dq_smem,
    };
    let dkv = Launch {
        grid: (
            grid_x("attention", "t", (t as u64).div_ceil(FA_BKV))?,
            grid_yz("attention", "b·nkv", (b as u64).saturating_mul(nkv as u64))?,
            1,
        ),
        block: (256, 1, 1),
        shared_mem_bytes: dkv_smem,
    };
    Ok(Some((dq, dkv, names)))
}

#[cfg(test)]
mod tests {
    use super::super::tests::MMA;
    use super::super::{attention_path, AttnPath, PathCaps, Store};
    use super::*;

    /// The byte counts check_attention.cpp pins for fa_*_smem (the kernels index their dynamic shared
    /// memory with those formulas; a launch with less would write past it).
    #[test]
    fn attention_flash_plans() {
        let s256 = attention_flash_smem(256).unwrap();
        assert_eq!(
            s256,
            FlashSmem {
                fwd: 101_376,
                dq: 135_168,
                dkv: 152_064
            }
        );
        let s128 = attention_flash_smem(128).unwrap();
        assert_eq!(
            s128,
            FlashSmem {
                fwd: 87_040,
                dq: 104_448,
                dkv: 86_528
            }
        );
        for d in [16, 32, 64, 80, 512] {
            assert!(attention_flash_smem(d).is_none(), "D = {d}");
            assert!(attention_flash(1, 8, 1, d).unwrap().is_none());
            for tiling in [BwdTiling::Default, BwdTiling::Small] {
                assert!(attention_flash_bwd(1, 8, 1, 1, d, tiling)
                    .unwrap()
                    .is_none());
            }
        }
        // The 9B shape: 32 query blocks × 32 (b, head) pairs; dk/dv over the 8 kv heads.
        let (l, name) = attention_flash(2, 2048, 16, 256).unwrap().unwrap();
        assert_eq!(
            (l.grid, l.block.0, l.shared_mem_bytes, name),
            ((32, 32, 1), 128, 101_376, "attn_fwd_flash_d256_k")
        );
        let (dq, dkv, names) = attention_flash_bwd(1, 2048, 16, 8, 256, BwdTiling::Default)
            .unwrap()
            .unwrap();
        assert_eq!((dq.grid, dq.block.0), ((32, 16, 1), 128));
        assert_eq!((dkv.grid, dkv.block.0), ((32, 8, 1), 256));
        assert_eq!(
            names,
            ["attn_bwd_dq_flash_d256_k", "attn_bwd_dkv_flash_d256_k"]
        );
        // Ragged T rounds up; too many heads for grid.y is an error, not a wrapped launch.
        assert_eq!(attention_flash(1, 65, 1, 128).unwrap().unwrap().0.grid.0, 2);
        assert!(attention_flash(65_536, 8, 1, 128).is_err());
        assert!(attention_flash_bwd(1, 8, 65_536, 1, 256, BwdTiling::Small).is_err());
    }

    /// The ≤ 99 KiB backward (`_s` kernels): the byte counts check_attention.cpp pins for
    /// fa_*_smem<D, true>, the same grids as the default, and the tiling each device gets.
    #[test]
    fn attention_flash_small_backward() {
        assert_eq!(
            attention_flash_bwd_smem(256, BwdTiling::Small),
            Some((101_376, 92_800))
        );
        assert_eq!(
            attention_flash_bwd_smem(128, BwdTiling::Small),
            Some((52_224, 51_840))
        );
        let (dq, dkv, names) = attention_flash_bwd(1, 2048, 16, 8, 256, BwdTiling::Small)
            .unwrap()
            .unwrap();
        let (dq0, dkv0, _) = attention_flash_bwd(1, 2048, 16, 8, 256, BwdTiling::Default)
            .unwrap()
            .unwrap();
        assert_eq!(
            (dq.grid, dq.block, dkv.grid, dkv.block),
            (dq0.grid, dq0.block, dkv0.grid, dkv0.block)
        );
        assert_eq!(
            (dq.shared_mem_bytes, dkv.shared_mem_bytes),
            (101_376, 92_800)
        );
        assert_eq!(
            names,
            ["attn_bwd_dq_flash_s_d256_k", "attn_bwd_dkv_flash_s_d256_k"]
        );
        // H100/H200 (227 KiB) and A100 (163 KiB): the default; sm_86/89 (99 KiB): the small one at
        // D = 256, the default at D = 128 (104 448 B of dq does not fit 99 KiB either).
        assert_eq!(flash_bwd_tiling(256, 227 * 1024), BwdTiling::Default);
        assert_eq!(flash_bwd_tiling(256, 163 * 1024), BwdTiling::Default);
        assert_eq!(flash_bwd_tiling(256, 99 * 1024), BwdTiling::Small);
        assert_eq!(flash_bwd_tiling(128, 99 * 1024), BwdTiling::Small);
        assert_eq!(flash_bwd_tiling(128, 163 * 1024), BwdTiling::Default);
        assert_eq!(flash_bwd_tiling(64, 99 * 1024), BwdTiling::Default);
    }

    /// Flash is the default for bf16 at D ∈ {128, 256} when the device has the shared memory; the
    /// older tensor-core kernels on request or when it does not; CUDA cores for everything else.
    #[test]
    fn attention_path_prefers_flash() {
        use Store::*;
        let s = attention_flash_smem(256).unwrap();
        let bwd = Some(s.dq.max(s.dkv));
        assert_eq!(
            attention_path(MMA, &[Bf16; 3], Some(s.fwd), true),
            AttnPath::Flash
        );
        assert_eq!(attention_path(MMA, &[Bf16; 4], bwd, true), AttnPath::Flash);
        // A100 (163 KiB opt-in): all of D = 256 fits.
        let sm80 = PathCaps {
            max_dyn_smem: 163 * 1024,
            ..MMA
        };
        assert_eq!(attention_path(sm80, &[Bf16; 4], bwd, true), AttnPath::Flash);
        // sm_86/89 (99 KiB): the D = 256 forward fits exactly, its default backward does not (the
        // older tensor-core kernels would serve it), the small backward does.
        let sm86 = PathCaps {
            max_dyn_smem: 99 * 1024,
            ..MMA
        };
        assert_eq!(
            attention_path(sm86, &[Bf16; 3], Some(s.fwd), true),
            AttnPath::Flash
        );
        assert_eq!(
            attention_path(sm86, &[Bf16; 4], bwd, true),
            AttnPath::TensorCores
        );
        let small = attention_flash_bwd_smem(256, flash_bwd_tiling(256, sm86.max_dyn_smem))
            .map(|(dq, dkv)| dq.max(dkv));
        assert_eq!(
            attention_path(sm86, &[Bf16; 4], small, true),
            AttnPath::Flash
        );
        // AFINAR_ATTN_PATH=mma: the older kernels where they exist.
        let old = PathCaps {
            mma_attention: true,
            ..MMA
        };
        assert_eq!(
            attention_path(old, &[Bf16; 3], Some(s.fwd), true),
            AttnPath::TensorCores
        );
        assert_eq!(
            attention_path(old, &[Bf16; 3], Some(s.fwd), false),
            AttnPath::CudaCores
        );
        // Never for f32 / f16 storage, never with simt_attention or without bf16 mma.
        assert_eq!(
            attention_path(MMA, &[F32; 3], Some(s.fwd), true),
            AttnPath::CudaCores
        );
        assert_eq!(
            attention_path(MMA, &[F16; 4], bwd, true),
            AttnPath::CudaCores
        );
        let simt = PathCaps {
            simt_attention: true,
            ..MMA
        };
        assert_eq!(
            attention_path(simt, &[Bf16; 3], Some(s.fwd), true),
            AttnPath::CudaCores
        );
        let sm75 = PathCaps {
            bf16_mma: false,
            ..MMA
        };
        assert_eq!(
            attention_path(sm75, &[Bf16; 3], Some(s.fwd), true),
            AttnPath::CudaCores
        );
    }
}
