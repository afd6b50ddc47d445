//! LoRA configuration and PEFT-compatible initialisation.
//!
//! A LoRA linear computes y = x·W̃ᵀ + s·(drop(x)·Aᵀ)·Bᵀ with A [R, in], B [out, R] and
//! s = α/R (or α/√R with rsLoRA), exactly as peft's `lora.Linear`. Dropout masks are
//! counter-based (`Backend::dropout_mask`), generated where they are used.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{GemmaError, Result};

/// The seven linear layers of a Gemma-2 decoder layer, in the fixed order used everywhere in this crate
/// (parameter lists, gradients, adapters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// The module name ("q_proj").
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The parent module ("self_attn" or "mlp").
    pub fn parent(self) -> &'static str {
        match self {
            Target::QProj | Target::KProj | Target::VProj | Target::OProj => "self_attn",
            _ => "mlp",
        }
    }

    /// HF module path inside layer `i`: `model.layers.{i}.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }

    /// Parses a module name; also accepts a dotted suffix such as "self_attn.q_proj".
    pub fn parse(s: &str) -> Result<Target> {
        let last = s.rsplit('.').next().unwrap_or(s);
        Target::ALL
            .iter()
            .copied()
            .find(|t| t.name() == last)
            .ok_or_else(|| GemmaError::UnknownTarget {
                name: s.to_string(),
                valid: Target::ALL
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// (out, in) features for a config.
    pub fn dims(self, cfg: &crate::config::Gemma2Config) -> (usize, usize) {
        let h = cfg.hidden_size;
        match self {
            Target::QProj => (cfg.q_dim(), h),
            Target::KProj | Target::VProj => (cfg.kv_dim(), h),
            Target::OProj => (h, cfg.q_dim()),
            Target::GateProj | Target::UpProj => (cfg.intermediate_size, h),
            Target::DownProj => (h, cfg.intermediate_size),
        }
    }

    /// Position in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// LoRA hyper-parameters (peft `LoraConfig` subset that changes the math).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank R (> 0).
    pub r: usize,
    /// α.
    pub alpha: f64,
    /// Dropout probability on the LoRA input, in [0, 1).
    pub dropout: f64,
    /// s = α/√R instead of α/R.
    pub use_rslora: bool,
    /// Adapted modules, sorted in `Target::ALL` order, no duplicates.
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// Validates and normalises. `targets` holds module names or the single entry "all-linear".
    pub fn new<S: AsRef<str>>(
        r: usize,
        alpha: f64,
        dropout: f64,
        use_rslora: bool,
        targets: &[S],
    ) -> Result<Self> {
        if r == 0 {
            return Err(GemmaError::LoraConfig("r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(GemmaError::LoraConfig(format!(
                "lora_dropout must be in [0, 1), found {dropout}"
            )));
        }
        if !alpha.is_finite() {
            return Err(GemmaError::LoraConfig(format!(
                "lora_alpha must be finite, found {alpha}"
            )));
        }
        let targets = parse_targets(targets)?;
        Ok(LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            targets,
        })
    }

    /// peft's default for Gemma-2 would be q_proj + v_proj; QLoRA practice (and ours) is all-linear.
    pub fn all_linear(r: usize, alpha: f64) -> Self {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            targets: Target::ALL.to_vec(),
        }
    }

    /// s = α/R, or α/√R with rsLoRA (computed in f64 as peft does, then rounded to f32).
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }) as f32
    }

    pub fn targets_contains(&self, t: Target) -> bool {
        self.targets.contains(&t)
    }
}

/// Parses a target list: module names (any order, duplicates merged) or ["all-linear"].
pub fn parse_targets<S: AsRef<str>>(targets: &[S]) -> Result<Vec<Target>> {
    if targets.is_empty() {
        return Err(GemmaError::LoraConfig(
            "target_modules is empty; name modules or use \"all-linear\"".into(),
        ));
    }
    let mut out = Vec::new();
    for t in targets {
        let t = t.as_ref();
        if t == "all-linear" {
            out.extend_from_slice(&Target::ALL);
        } else {
            out.push(Target::parse(t)?);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// PEFT init of A [R, in]: kaiming_uniform(a=√5) = U(−1/√in, 1/√in), drawn from a ChaCha8 stream keyed by
/// (seed, layer, target), so each adapter is reproducible independently of load order.
/// (torch's RNG cannot be matched; golden tests load A from the fixture instead.)
pub fn init_a(seed: u64, layer: usize, target: Target, r: usize, in_features: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stream_key(layer, target));
    let bound = 1.0 / (in_features as f64).sqrt();
    (0..r * in_features)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// Distinct 64-bit key per (layer, target), mixed so nearby layers give unrelated streams.
pub(crate) fn stream_key(layer: usize, target: Target) -> u64 {
    splitmix64((layer as u64) << 8 | target.index() as u64)
}

/// SplitMix64 finaliser: a cheap bijective mixer for seeds (the kernels crate's, which its dropout
/// masks use too).
pub(crate) fn splitmix64(z: u64) -> u64 {
    afinar_kernels::cpu::dropout::splitmix64(z)
}

/// The dropout stream of the LoRA input of (layer, target): `Backend::dropout_mask` hashes
/// (seed, this stream, element index), so each adapter gets its own mask, independent of the order in
/// which the layers run.
pub fn dropout_stream(layer: usize, target: Target) -> u64 {
    stream_key(layer, target) ^ 0xD0D0_D0D0
}

/// The seed whose mask on `stream` is the mask of (`seed`, `stream`) from element `offset` on:
/// `Backend::dropout_mask` with the returned seed writes elements offset, offset + 1, … of the mask
/// of `seed`. This is what lets a rank train rows r·b.. of a global micro-batch with exactly the
/// masks those rows get when one process trains the whole batch.
///
/// Why it exists: element i's bits are splitmix64(key + i·γ) with key = splitmix64(seed ^
/// splitmix64(stream)) (afinar-kernels' `cpu::dropout` contract), so starting `offset` elements later
/// is the key key + offset·γ; splitmix64 is a bijection, so the seed giving that key is
/// splitmix64⁻¹(key + offset·γ) ^ splitmix64(stream). No backend change is needed.
pub fn dropout_seed_at(seed: u64, stream: u64, offset: u64) -> u64 {
    use afinar_kernels::cpu::dropout::{mask_key, GAMMA};
    if offset == 0 {
        return seed;
    }
    let key = mask_key(seed, stream).wrapping_add(offset.wrapping_mul(GAMMA));
    unsplitmix64(key) ^ splitmix64(stream)
}

/// The inverse of [`splitmix64`]: undoes the three xor-shift-multiply stages, then the γ step.
fn unsplitmix64(y: u64) -> u64 {
    use afinar_kernels::cpu::dropout::GAMMA;
    // x ^ (x >> s) is inverted by iterating x ← y ^ (x >> s): each pass fixes s more high bits.
    fn unxorshift(y: u64, s: u32) -> u64 {
        let mut x = y;
        for _ in 0..(64 / s + 1) {
            x = y ^ (x >> s);
        }
        x
    }
    // The inverse of an odd c mod 2⁶⁴ by Newton's iteration (each step doubles the correct low bits;
    // c·c ≡ 1 mod 8 gives 3 to start: 3 → 6 → 12 → 24 → 48 → 96).
    fn inverse(c: u64) -> u64 {
        let mut x = c;
        for _ in 0..5 {
            x = x.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(x)));
        }
        x
    }
    let mut z = unxorshift(y, 31);
    z = unxorshift(z.wrapping_mul(inverse(0x94D0_49BB_1331_11EB)), 27);
    z = unxorshift(z.wrapping_mul(inverse(0xBF58_476D_1CE4_E5B9)), 30);
    z.wrapping_sub(GAMMA)
}

/// The inverted-dropout mask [M, K] for one LoRA input, on the host: each entry 0 with probability p,
/// else 1/(1−p) (torch `nn.Dropout` semantics). Deterministic in (seed, layer, target), and bit for bit
/// the mask the training forward generates on its backend (`Backend::dropout_mask` with
/// `dropout_stream(layer, target)`): the layer never builds it on the host. p outside [0, 1) is an error.
pub fn dropout_mask(
    seed: u64,
    layer: usize,
    target: Target,
    p: f64,
    len: usize,
) -> Result<Vec<f32>> {
    let mut m = vec![0.0f32; len];
    afinar_kernels::cpu::dropout::dropout_mask(&mut m, p, seed, dropout_stream(layer, target))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsplitmix64_inverts_splitmix64() {
        for z in [
            0u64,
            1,
            42,
            u64::MAX,
            0x9E37_79B9_7F4A_7C15,
            0xDEAD_BEEF_0123_4567,
        ] {
            assert_eq!(unsplitmix64(splitmix64(z)), z);
            assert_eq!(splitmix64(unsplitmix64(z)), z);
        }
    }

    #[test]
    fn the_seed_at_an_offset_gives_the_tail_of_the_whole_mask() {
        let (p, stream) = (0.3, dropout_stream(1, Target::VProj));
        let whole = {
            let mut m = vec![0.0f32; 5000];
            afinar_kernels::cpu::dropout::dropout_mask(&mut m, p, 77, stream).unwrap();
            m
        };
        for off in [0usize, 1, 64, 2345] {
            let mut tail = vec![0.0f32; 5000 - off];
            let seed = dropout_seed_at(77, stream, off as u64);
            afinar_kernels::cpu::dropout::dropout_mask(&mut tail, p, seed, stream).unwrap();
            assert_eq!(tail, whole[off..], "offset {off}");
        }
        // Some elements are dropped and some kept, so the comparison means something.
        assert!(whole.contains(&0.0) && whole.iter().any(|&x| x > 1.0));
    }
}
