//! Building a model: from a Hugging Face checkpoint directory, from an open tensor store, or random
//! (transformers' init); optional NF4 quantization and LoRA factors; the loading progress bar.

use std::path::Path;
use std::sync::Arc;

use afinar_kernels::{Backend, Storage};

use crate::config::Gemma2Config;
use crate::error::{GemmaError, Result};
use crate::lora::{LoraConfig, Target};
use crate::params::{Layer, Linear, LinearBase, LoraWeights, NormKind, ParamId};
use crate::safetensors_io::{Stored, TensorStore};
use afinar_kernels::nf4::RawDtype;

use super::stream::{with_stream, Stream};
use super::Gemma2Model;

/// How target linears are stored after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense f32 (or whatever `B::Buf` holds).
    #[default]
    None,
    /// NF4, bit-exact with bitsandbytes `quantize_4bit(blocksize=64)`; `double_quant` = QLoRA's nested absmax.
    Nf4 { double_quant: bool },
}

/// What to build when loading a checkpoint or creating a random model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub quantize: Quantization,
    /// Adds LoRA factors (A from `seed`, B = 0) to the config's targets.
    pub lora: Option<LoraConfig>,
    /// Every base weight (embedding, norms, dense linears) becomes trainable. Requires `Quantization::None`.
    pub full_finetune: bool,
    /// Seed of the LoRA A init (and of random weights in `Gemma2Model::random`).
    pub seed: u64,
    /// Show an indicatif progress bar while loading (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quantize: Quantization::None,
            lora: None,
            full_finetune: false,
            seed: 0,
            progress: false,
        }
    }
}

/// Source of base weights for `Gemma2Model::build`.
enum Source<'a> {
    Store(&'a TensorStore),
    /// Random init as transformers' `_init_weights`: N(0, std) for embedding and linears, 0 for norm offsets.
    Random {
        seed: u64,
        std: f64,
    },
}

/// Standard normal sample by Box–Muller (rand 0.9 has no normal distribution without rand_distr).
fn normal_vec(rng: &mut rand_chacha::ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        if out.len() < len {
            out.push((r * th.sin()) as f32);
        }
    }
    out
}

impl<'a> Source<'a> {
    /// The values of `name` with shape `shape`: the mapped bytes of a stored F32/BF16/F16 tensor (no
    /// host copy), or f32 values (random init, F64 checkpoints).
    fn fetch(&self, name: &str, shape: &[usize]) -> Result<Fetched<'a>> {
        match self {
            Source::Store(s) => Ok(match s.stored_shaped(name, shape)? {
                Stored::Raw(bytes, dtype) => Fetched::Raw(bytes, dtype),
                Stored::F32(v) => Fetched::F32(v),
            }),
            Source::Random { seed, std } => {
                use rand::SeedableRng;
                let numel = shape.iter().product();
                if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
                    return Ok(Fetched::F32(vec![0.0; numel]));
                }
                // One independent stream per tensor name, so adding layers does not reshuffle the others.
                let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                });
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ key);
                Ok(Fetched::F32(normal_vec(&mut rng, numel, *std)))
            }
        }
    }
}

/// One weight on its way to the backend.
enum Fetched<'a> {
    /// Stored little-endian bytes, straight from the memory-mapped checkpoint.
    Raw(&'a [u8], RawDtype),
    F32(Vec<f32>),
}

impl Fetched<'_> {
    /// Bytes this tensor accounts for in the progress bar.
    fn bytes(&self) -> u64 {
        match self {
            Fetched::Raw(b, _) => b.len() as u64,
            Fetched::F32(v) => 4 * v.len() as u64,
        }
    }

    /// A dense backend buffer: raw bytes go through `from_raw_for` (uploaded as they are on a device
    /// whose storage dtype matches; decoded in parallel on the CPU), f32 values are handed over.
    fn into_buf<B: Backend>(self, backend: &B, storage: Storage) -> Result<B::Buf> {
        Ok(match self {
            Fetched::Raw(bytes, dtype) => backend.from_raw_for(bytes, dtype, storage)?,
            Fetched::F32(v) => backend.from_vec_for(v, storage)?,
        })
    }

    /// NF4 on the backend (`Backend::nf4_quantize`: on the device for CUDA), bit-identical to
    /// `nf4::quantize` of the decoded values.
    fn into_nf4<B: Backend>(
        self,
        backend: &B,
        shape: &[usize],
        double_quant: bool,
    ) -> Result<B::Nf4> {
        Ok(match self {
            Fetched::Raw(bytes, dtype) => {
                backend.nf4_quantize(bytes, dtype, shape, double_quant)?
            }
            Fetched::F32(v) => {
                backend.nf4_from_host(&afinar_kernels::nf4::quantize(&v, shape, double_quant)?)?
            }
        })
    }
}

impl<B: Backend> Gemma2Model<B> {
    /// Loads a Hugging Face model directory (config.json + model.safetensors or sharded safetensors with
    /// an index). Weights are converted to f32 and moved to the backend one tensor at a time (layer by
    /// layer), and target linears are quantized to NF4 on the fly when `opts.quantize` asks for it, so
    /// peak host memory stays near one layer's f32 weights on top of the memory-mapped files.
    /// Pre-quantized bitsandbytes 4-bit linears (`*.weight.absmax` present) are read directly as NF4.
    ///
    /// Reads `dir/config.json`; a caller that has already parsed it (to check it before the load, say)
    /// passes it to [`Gemma2Model::load_with_config`] instead, so the file is read once.
    pub fn load(backend: Arc<B>, dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Gemma2Config::from_file(crate::config::config_path(dir))?;
        Self::load_with_config(backend, config, dir, opts)
    }

    /// [`Gemma2Model::load`] with `config` already parsed from `dir/config.json`: only the weights are
    /// read from `dir`.
    pub fn load_with_config(
        backend: Arc<B>,
        config: Gemma2Config,
        dir: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let store = TensorStore::open_dir(dir)?;
        Self::from_store(backend, config, &store, opts)
    }

    /// Builds the model from an open tensor store.
    pub fn from_store(
        backend: Arc<B>,
        config: Gemma2Config,
        store: &TensorStore,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::build(backend, config, Source::Store(store), opts)
    }

    /// A randomly initialised model (embedding and linears N(0, 0.02), norm offsets 0), for pretraining the
    /// demo model, tests and benchmarks. Deterministic in `opts.seed`.
    pub fn random(backend: Arc<B>, config: Gemma2Config, opts: &LoadOptions) -> Result<Self> {
        let std = config
            .raw
            .get("initializer_range")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.02);
        Self::build(
            backend,
            config,
            Source::Random {
                seed: opts.seed,
                std,
            },
            opts,
        )
    }

    fn build(
        backend: Arc<B>,
        config: Gemma2Config,
        src: Source<'_>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        if opts.full_finetune && opts.quantize != Quantization::None {
            return Err(GemmaError::Invalid(
                "full fine-tuning needs dense weights: use Quantization::None (NF4 bases are frozen)".into(),
            ));
        }
        let cfg = &config;
        if let Some(lc) = &opts.lora {
            // ΔW = B·A of an [out, in] linear has rank ≤ min(out, in): a larger r only adds parameters,
            // and an absurd r (a typo, 10^11) would otherwise abort in the allocation of A.
            for &t in &lc.targets {
                let (out_f, in_f) = t.dims(cfg);
                if lc.r > out_f.min(in_f) {
                    return Err(GemmaError::LoraConfig(format!(
                        "r = {} exceeds min(out, in) = {} of {t} ([{out_f}, {in_f}]); ΔW cannot have a \
                         rank above that",
                        lc.r,
                        out_f.min(in_f)
                    )));
                }
            }
        }
        let h = cfg.hidden_size;
        let nl = cfg.num_hidden_layers;
        // Trained base tensors (full fine-tuning) are optimizer parameters: f32 master storage.
        // Frozen ones are stored like activations (bf16 on a bf16 GPU run), as transformers holds them.
        let base = if opts.full_finetune {
            Storage::Master
        } else {
            Storage::Activation
        };
        let store = match &src {
            Source::Store(s) => Some(*s),
            Source::Random { .. } => None,
        };
        // The fetch order of a store's tensors, for the prefetch helper and the progress total. Only
        // layers the store holds are planned (no allocation from the config's layer count alone: a
        // corrupt config must fail on a missing tensor, not abort on a huge allocation); a random
        // model has nothing to prefetch.
        let mut plan = Vec::new();
        if let Some(s) = store {
            plan.push("model.embed_tokens.weight".to_string());
            for li in 0..nl {
                if !s.contains(
                    &ParamId::Norm {
                        layer: li,
                        kind: NormKind::Input,
                    }
                    .name(),
                ) {
                    break;
                }
                for kind in NormKind::ALL {
                    plan.push(ParamId::Norm { layer: li, kind }.name());
                }
                for target in Target::ALL {
                    plan.push(ParamId::Weight { layer: li, target }.name());
                }
            }
            plan.push("model.norm.weight".to_string());
        }
        let total_bytes: u64 = match store {
            Some(s) => plan.iter().map(|n| s.stored_bytes(n) as u64).sum(),
            None => 0,
        };
        let (embed_tokens, layers, norm) =
            with_stream(store, &plan, total_bytes, opts.progress, |st| {
                let be = &*backend;
                let emb_name = "model.embed_tokens.weight";
                st.begin(emb_name);
                let mut emb = src.fetch(emb_name, &[cfg.vocab_size, h])?;
                if let (Fetched::F32(v), Some(pad)) = (&mut emb, cfg.pad_token_id) {
                    if matches!(src, Source::Random { .. }) {
                        // nn.Embedding(padding_idx=pad) starts with a zero row, as transformers' init
                        // leaves it.
                        if let Some(row) = usize::try_from(pad).ok().filter(|&p| p < cfg.vocab_size)
                        {
                            v[row * h..(row + 1) * h].fill(0.0);
                        }
                    }
                }
                // Raw bytes go to the backend as they are; f32 values are handed over, not copied, so
                // the [V,H] embedding exists once on the host when the backend is the CPU.
                let bytes = emb.bytes();
                let embed_tokens = emb.into_buf(be, base)?;
                st.done(emb_name, bytes);
                let mut layers = Vec::new();
                for li in 0..nl {
                    layers.push(build_layer(be, cfg, &src, opts, li, st)?);
                }
                let name = "model.norm.weight";
                st.begin(name);
                let t = src.fetch(name, &[h])?;
                let bytes = t.bytes();
                let norm = t.into_buf(be, base)?;
                st.done(name, bytes);
                Ok::<_, GemmaError>((embed_tokens, layers, norm))
            })?;
        Ok(Gemma2Model {
            backend,
            config,
            embed_tokens,
            layers,
            norm,
            lora: opts.lora.clone(),
            full_finetune: opts.full_finetune,
            checkpointing: false,
            train_ws: Default::default(),
        })
    }
}

/// The fetch order of layer `li`'s tensors (what `build_layer` reads): four norms, seven linears.
pub(super) fn layer_plan(li: usize) -> impl Iterator<Item = String> {
    NormKind::ALL
        .into_iter()
        .map(move |kind| ParamId::Norm { layer: li, kind }.name())
        .chain(
            Target::ALL
                .into_iter()
                .map(move |target| ParamId::Weight { layer: li, target }.name()),
        )
}

/// Loads decoder layer `li` from `store` as `Gemma2Model::load` with default options builds it
/// (dense linears and norms in activation storage; pre-quantized bnb linears as NF4; no LoRA).
pub(super) fn store_layer<B: Backend>(
    backend: &B,
    cfg: &Gemma2Config,
    store: &TensorStore,
    li: usize,
    st: &mut Stream<'_>,
) -> Result<Layer<B>> {
    build_layer(
        backend,
        cfg,
        &Source::Store(store),
        &LoadOptions::default(),
        li,
        st,
    )
}

/// A store's dense tensor `name` of shape `shape` in activation storage, as the loader reads the
/// embedding and the final norm of a default load.
pub(super) fn store_tensor<B: Backend>(
    backend: &B,
    store: &TensorStore,
    name: &str,
    shape: &[usize],
    st: &mut Stream<'_>,
) -> Result<B::Buf> {
    st.begin(name);
    let t = Source::Store(store).fetch(name, shape)?;
    let bytes = t.bytes();
    let buf = t.into_buf(backend, Storage::Activation)?;
    st.done(name, bytes);
    Ok(buf)
}

/// Loads decoder layer `li`: its four norms, then its seven linears (`build_linear`).
fn build_layer<B: Backend>(
    be: &B,
    cfg: &Gemma2Config,
    src: &Source<'_>,
    opts: &LoadOptions,
    li: usize,
    st: &mut Stream<'_>,
) -> Result<Layer<B>> {
    let h = cfg.hidden_size;
    // Trained norms (full fine-tuning) are f32 master; frozen ones are stored like activations.
    let base = if opts.full_finetune {
        Storage::Master
    } else {
        Storage::Activation
    };
    let mut norm = |kind: NormKind| -> Result<B::Buf> {
        let name = ParamId::Norm { layer: li, kind }.name();
        st.begin(&name);
        let t = src.fetch(&name, &[h])?;
        let bytes = t.bytes();
        let buf = t.into_buf(be, base)?;
        st.done(&name, bytes);
        Ok(buf)
    };
    let norms = [
        norm(NormKind::Input)?,
        norm(NormKind::PostAttention)?,
        norm(NormKind::PreFeedforward)?,
        norm(NormKind::PostFeedforward)?,
    ];
    let mut lins = Vec::with_capacity(7);
    for target in Target::ALL {
        lins.push(build_linear(be, cfg, src, opts, li, target, st)?);
    }
    let linears: [Linear<B>; 7] = lins.try_into().map_err(|_| {
        GemmaError::Invalid("internal: a layer must have exactly seven linears".into())
    })?;
    Ok(Layer { norms, linears })
}

/// Loads one linear: pre-quantized NF4 as is, else f32 → (optionally) NF4; adds LoRA factors when targeted.
#[allow(clippy::too_many_arguments)]
fn build_linear<B: Backend>(
    backend: &B,
    cfg: &Gemma2Config,
    src: &Source<'_>,
    opts: &LoadOptions,
    layer: usize,
    target: Target,
    st: &mut Stream<'_>,
) -> Result<Linear<B>> {
    let (out_f, in_f) = target.dims(cfg);
    let name = ParamId::Weight { layer, target }.name();
    st.begin(&name);
    let prequant = match src {
        Source::Store(s) => crate::bnb::is_bnb_4bit(s, &name),
        Source::Random { .. } => false,
    };
    let base = if prequant {
        let Source::Store(s) = src else {
            return Err(GemmaError::Invalid(
                "internal: pre-quantized weight without a store".into(),
            ));
        };
        if opts.full_finetune {
            return Err(GemmaError::Invalid(format!(
                "`{name}` is a pre-quantized bitsandbytes 4-bit weight; full fine-tuning needs a dense checkpoint"
            )));
        }
        let w = crate::bnb::read_bnb_nf4(s, &name, &[out_f, in_f])?;
        let q = LinearBase::Nf4(backend.nf4_from_host(&w.tensor)?);
        st.done(&name, s.stored_bytes(&name) as u64);
        q
    } else {
        let data = src.fetch(&name, &[out_f, in_f])?;
        let bytes = data.bytes();
        let base = match opts.quantize {
            Quantization::None => {
                let storage = if opts.full_finetune {
                    Storage::Master
                } else {
                    Storage::Activation
                };
                LinearBase::Dense(data.into_buf(backend, storage)?)
            }
            Quantization::Nf4 { double_quant } => {
                LinearBase::Nf4(data.into_nf4(backend, &[out_f, in_f], double_quant)?)
            }
        };
        st.done(&name, bytes);
        base
    };
    let lora = match &opts.lora {
        // LoRA factors are what the optimizer updates: f32 master storage (peft keeps adapters in f32
        // over a bf16 base, too).
        Some(lc) if lc.targets_contains(target) => Some(LoraWeights {
            a: backend.from_vec_for(
                crate::lora::init_a(opts.seed, layer, target, lc.r, in_f),
                Storage::Master,
            )?,
            b: backend.zeros_for(out_f * lc.r, Storage::Master)?,
            r: lc.r,
            scale: lc.scale(),
            dropout: lc.dropout,
        }),
        _ => None,
    };
    Ok(Linear {
        target,
        out_features: out_f,
        in_features: in_f,
        base,
        lora,
    })
}
