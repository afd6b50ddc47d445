//! torch's CPU f32 `sum`/`mean`, bit for bit: the offset of a double-quantized absmax is a torch mean.

/// torch's CPU f32 `sum` of a contiguous 1-D tensor (ATen `SumKernel.cpp`, `cascade_sum`), bit for bit.
///
/// With 8-lane vectors (what torch 2.15 on x86-64 uses for this reduction — checked on 1500+ random
/// lengths up to 131072): the input is read as `nv = n/8` vectors; 4 interleaved vector accumulators
/// (vector j goes to accumulator j % 4) each with a 4-level cascade that flushes level 0 into level 1
/// every 16 rows (2^4; more levels only past 2^19 rows); leftover vectors go into accumulator 0; the
/// 4 accumulators are added in order; then a scalar starts at 0, adds the scalar tail (elements 8·nv..n)
/// in order and then the 8 lanes in order. Below 8 elements, the same with 4 scalar accumulators.
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    fn ceil_log2(v: usize) -> usize {
        if v <= 2 {
            1
        } else {
            (usize::BITS - (v - 1).leading_zeros()) as usize
        }
    }
    // Index loops on purpose: they mirror ATen's `multi_row_sum` line for line.
    #[allow(clippy::needless_range_loop)]
    /// `multi_row_sum` over `rows` rows of ILP "columns", a column being a `W`-wide chunk at
    /// `load(row·ILP + col)`.
    fn multi_row_sum<const W: usize>(
        rows: usize,
        load: impl Fn(usize) -> [f32; W],
    ) -> [[f32; W]; ILP] {
        let level_power = 4.max(ceil_log2(rows) / LEVELS);
        let level_step = 1usize << level_power;
        let level_mask = level_step - 1;
        let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
        let add = |a: &mut [f32; W], b: &[f32; W]| a.iter_mut().zip(b).for_each(|(x, y)| *x += *y);
        let mut i = 0usize;
        while i + level_step <= rows {
            for _ in 0..level_step {
                for (k, a) in acc[0].iter_mut().enumerate() {
                    add(a, &load(i * ILP + k));
                }
                i += 1;
            }
            for j in 1..LEVELS {
                for k in 0..ILP {
                    let lo = acc[j - 1][k];
                    add(&mut acc[j][k], &lo);
                    acc[j - 1][k] = [0.0; W];
                }
                if i & (level_mask << (j * level_power)) != 0 {
                    break;
                }
            }
        }
        while i < rows {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let hi = acc[j][k];
                add(&mut acc[0][k], &hi);
            }
        }
        acc[0]
    }
    fn row_sum<const W: usize>(count: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
        let rows = count / ILP;
        let mut p = multi_row_sum::<W>(rows, &load);
        for i in rows * ILP..count {
            let v = load(i);
            p[0].iter_mut().zip(&v).for_each(|(a, b)| *a += *b);
        }
        for k in 1..ILP {
            let pk = p[k];
            p[0].iter_mut().zip(&pk).for_each(|(a, b)| *a += *b);
        }
        p[0]
    }
    let n = x.len();
    if n < LANES {
        // Scalar path (`scalar_inner_sum`): output starts at 0 and gets the row sum added.
        return 0.0 + row_sum::<1>(n, |i| [x[i]])[0];
    }
    let nv = n / LANES;
    let lanes = row_sum::<LANES>(nv, |i| {
        let mut v = [0.0f32; LANES];
        v.copy_from_slice(&x[i * LANES..(i + 1) * LANES]);
        v
    });
    let mut acc = 0.0f32;
    for &t in &x[nv * LANES..] {
        acc += t;
    }
    for l in lanes {
        acc += l;
    }
    0.0 + acc
}

/// torch's CPU f32 `mean` of a 1-D tensor with torch running ONE thread (or any thread count below 32768
/// elements): [`torch_sum_f32`] divided by `n` (as f32). This is what bitsandbytes uses as the double-quant
/// `offset`, and what [`quantize`] uses: deterministic, independent of the machine.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// torch's CPU f32 `sum` of a contiguous 1-D tensor when torch runs `threads` threads
/// (`torch.get_num_threads()`). From 32768 elements (ATen's GRAIN_SIZE) on, ATen's `two_pass_reduction`
/// splits the input into `min(threads, ceil(n/32768))` chunks of `ceil(n/chunks)` elements, sums each
/// chunk with [`torch_sum_f32`] into a zero-initialised buffer of `threads` partials, and sums that buffer
/// the same way. The bits therefore depend on the thread count of the machine that ran torch.
pub fn torch_sum_f32_threads(x: &[f32], threads: usize) -> f32 {
    const GRAIN_SIZE: usize = 32768;
    let n = x.len();
    if n < GRAIN_SIZE || threads <= 1 {
        return torch_sum_f32(x);
    }
    let chunks = threads.min(n.div_ceil(GRAIN_SIZE));
    let mut partials = vec![0.0f32; threads];
    for (p, c) in partials.iter_mut().zip(x.chunks(n.div_ceil(chunks))) {
        *p += torch_sum_f32(c);
    }
    torch_sum_f32(&partials)
}

/// [`torch_mean_f32`] for torch running `threads` threads (see [`torch_sum_f32_threads`]).
pub fn torch_mean_f32_threads(x: &[f32], threads: usize) -> f32 {
    torch_sum_f32_threads(x, threads) / x.len() as f32
}
