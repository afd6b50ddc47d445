//! Exports in the Hugging Face layout: a merged dense checkpoint (W + s·B·A) and a bitsandbytes NF4
//! checkpoint.
//!
//! Both write a model directory that transformers loads with `from_pretrained`:
//! - weights under HF names (`model.embed_tokens.weight`, `model.layers.{i}...`, `model.norm.weight`; no
//!   `lm_head.weight`, the head is tied), in one `model.safetensors` or, above `max_shard_bytes`, in shards
//!   `model-0000x-of-0000y.safetensors` with a `model.safetensors.index.json`
//!   (`{"metadata": {"total_parameters", "total_size"}, "weight_map": {name: file}}`, as transformers 5
//!   writes it), metadata `{"format": "pt"}`;
//! - `config.json`: the model's own config.json with `dtype`/`torch_dtype` set to the written dtype and
//!   `quantization_config` removed (merged) or set (NF4);
//! - tokenizer files, chat template and generation_config.json copied from `source_dir` when given.
//!
//! The directory is written atomically (temporary sibling, then rename) and streamed: linears are
//! merged / quantized one at a time and a shard is flushed as soon as it is full, so peak memory is one
//! shard plus one layer on top of the model.
//!
//! Merge (peft `merge_and_unload`): delta = (B·A)·s computed in f32 (matmul first, then the
//! scale), W ← W + delta in f32, then rounded to the output dtype (bf16 by round-to-nearest-even, as
//! torch's `.to(bfloat16)`). An NF4 base is dequantized first, so a QLoRA model merges into a dense one.
//!
//! NF4: every linear becomes a bitsandbytes `Linear4bit` state (packed codes, absmax —
//! double-quantized when asked —, quant_map, nested parts, quant-state JSON); embeddings and norms stay
//! unquantized in the output dtype. A linear that is NF4 already and has no LoRA is written as is
//! (lossless); otherwise its dense weight (merged with its LoRA, if any) is rounded to the output dtype —
//! what transformers would hold after loading a checkpoint of that dtype; with the checkpoint's own
//! dtype (`afinar quantize`'s default) the rounding changes nothing, so an f32 checkpoint is quantized
//! from its f32 values, as transformers + bitsandbytes do — and quantized bit-exactly as
//! `bitsandbytes.functional.quantize_4bit(blocksize=64, quant_type="nf4")` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use afinar_kernels::{Accum, Backend, Storage};
use serde_json::Value;

use crate::bnb;
use crate::error::{GemmaError, Result};
use crate::lora::Target;
use crate::model::Gemma2Model;
use crate::params::{LinearBase, NormKind, ParamId};
use crate::peft::write_dir_atomically;
use crate::safetensors_io::{Dtype, TensorOut};

/// Files copied verbatim from the source checkpoint directory when present.
pub const COPIED_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

/// Default shard size: transformers' long-standing `max_shard_size="5GB"`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Floating-point type of the written (unquantized) tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExportDtype {
    #[default]
    BF16,
    F32,
    F16,
}

impl ExportDtype {
    /// The torch name written into config.json and the quant state ("bfloat16", "float32", "float16").
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::BF16 => "bfloat16",
            ExportDtype::F32 => "float32",
            ExportDtype::F16 => "float16",
        }
    }

    /// The export dtype of a torch dtype name ("bfloat16"/"bf16", "float32"/"f32", "float16"/"f16"),
    /// also with transformers' "torch." prefix; None for anything else.
    pub fn from_name(name: &str) -> Option<ExportDtype> {
        match name.strip_prefix("torch.").unwrap_or(name) {
            "bfloat16" | "bf16" => Some(ExportDtype::BF16),
            "float32" | "f32" | "float" => Some(ExportDtype::F32),
            "float16" | "f16" | "half" => Some(ExportDtype::F16),
            _ => None,
        }
    }

    /// The export dtype of stored safetensors data (F32, BF16, F16); None for other dtypes.
    pub fn of_stored(d: Dtype) -> Option<ExportDtype> {
        match d {
            Dtype::F32 => Some(ExportDtype::F32),
            Dtype::BF16 => Some(ExportDtype::BF16),
            Dtype::F16 => Some(ExportDtype::F16),
            _ => None,
        }
    }

    /// Values as they will be stored (bf16 / f16 rounding, round-to-nearest-even), kept in f32.
    pub fn round(self, v: &mut [f32]) {
        match self {
            ExportDtype::F32 => {}
            ExportDtype::BF16 => {
                for x in v {
                    *x = half::bf16::from_f32(*x).to_f32();
                }
            }
            ExportDtype::F16 => {
                for x in v {
                    *x = half::f16::from_f32(*x).to_f32();
                }
            }
        }
    }

    fn tensor(self, name: String, shape: Vec<usize>, v: &[f32]) -> TensorOut<'static> {
        match self {
            ExportDtype::F32 => TensorOut::f32(name, shape, v),
            ExportDtype::BF16 => {
                let mut data = Vec::with_capacity(v.len() * 2);
                for x in v {
                    data.extend_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
                }
                TensorOut {
                    name,
                    dtype: Dtype::BF16,
                    shape,
                    data: data.into(),
                }
            }
            ExportDtype::F16 => {
                let mut data = Vec::with_capacity(v.len() * 2);
                for x in v {
                    data.extend_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
                }
                TensorOut {
                    name,
                    dtype: Dtype::F16,
                    shape,
                    data: data.into(),
                }
            }
        }
    }
}

/// Options shared by both exports.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// A shard is closed before it would exceed this many bytes (a single larger tensor gets a shard of
    /// its own). When everything fits, one `model.safetensors` is written.
    pub max_shard_bytes: u64,
    /// The checkpoint directory the model came from: `COPIED_FILES` found there are copied.
    pub source_dir: Option<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            dtype: ExportDtype::BF16,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            source_dir: None,
        }
    }
}

/// Options of the NF4 export.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Double quantization of the absmax (QLoRA's `bnb_4bit_use_double_quant=True`).
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` written into the quantization_config ("bfloat16", "float16", "float32").
    pub compute_dtype: String,
    pub export: ExportOptions,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            double_quant: true,
            compute_dtype: "bfloat16".into(),
            export: ExportOptions::default(),
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// Weight files, in order (one `model.safetensors`, or the shards).
    pub weight_files: Vec<String>,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_size: u64,
    /// Elements stored (the index's `total_parameters`).
    pub total_parameters: u64,
    /// Files copied from `source_dir`.
    pub copied: Vec<String>,
}

/// Collects tensors into shards and writes each one as soon as it is full.
struct ShardWriter<'a> {
    dir: &'a Path,
    max: u64,
    current: Vec<TensorOut<'static>>,
    current_bytes: u64,
    /// (temporary file name, tensor names) per written shard.
    shards: Vec<(String, Vec<String>)>,
    total_size: u64,
    total_parameters: u64,
}

impl<'a> ShardWriter<'a> {
    fn new(dir: &'a Path, max: u64) -> Self {
        ShardWriter {
            dir,
            max: max.max(1),
            current: Vec::new(),
            current_bytes: 0,
            shards: Vec::new(),
            total_size: 0,
            total_parameters: 0,
        }
    }

    fn push(&mut self, t: TensorOut<'static>) -> Result<()> {
        let bytes = t.data.len() as u64;
        if !self.current.is_empty() && self.current_bytes + bytes > self.max {
            self.flush()?;
        }
        self.current_bytes += bytes;
        self.total_size += bytes;
        self.total_parameters += t.shape.iter().product::<usize>() as u64;
        self.current.push(t);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let name = format!("shard-{}.tmp", self.shards.len());
        let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        crate::safetensors_io::write_safetensors(
            &self.dir.join(&name),
            &self.current,
            Some(&meta),
        )?;
        let names = self.current.iter().map(|t| t.name.clone()).collect();
        self.shards.push((name, names));
        self.current.clear();
        self.current_bytes = 0;
        Ok(())
    }

    /// Final names (`model.safetensors`, or `model-0000x-of-0000y.safetensors` + index).
    fn finish(mut self) -> Result<(Vec<String>, u64, u64)> {
        self.flush()?;
        let n = self.shards.len();
        let rename = |from: &str, to: &str| {
            std::fs::rename(self.dir.join(from), self.dir.join(to))
                .map_err(|e| GemmaError::io(self.dir.join(to), e))
        };
        if n == 1 {
            rename(&self.shards[0].0, "model.safetensors")?;
            return Ok((
                vec!["model.safetensors".into()],
                self.total_size,
                self.total_parameters,
            ));
        }
        let mut files = Vec::with_capacity(n);
        let mut weight_map = BTreeMap::new();
        for (i, (tmp, names)) in self.shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            rename(tmp, &file)?;
            for name in names {
                weight_map.insert(name.clone(), Value::String(file.clone()));
            }
            files.push(file);
        }
        let index = serde_json::json!({
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": Value::Object(weight_map.into_iter().collect()),
        });
        let p = self.dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| GemmaError::Json {
            path: p.clone(),
            source: e,
        })?;
        std::fs::write(&p, text + "\n").map_err(|e| GemmaError::io(&p, e))?;
        Ok((files, self.total_size, self.total_parameters))
    }
}

/// The merged dense weight of one linear, f32 [out, in]: W (dequantized if NF4) + (B·A)·s.
pub fn merged_weight<B: Backend>(
    model: &Gemma2Model<B>,
    layer: usize,
    target: Target,
) -> Result<Vec<f32>> {
    let be = &**model.backend();
    let lin = model
        .layers
        .get(layer)
        .ok_or_else(|| {
            GemmaError::Invalid(format!(
                "no layer {layer} (the model has {})",
                model.layers.len()
            ))
        })?
        .linear(target);
    let (out_f, in_f) = (lin.out_features, lin.in_features);
    let w = match &lin.base {
        LinearBase::Dense(w) => be.to_host(w)?,
        LinearBase::Nf4(w) => {
            let mut d = be.zeros_for(out_f * in_f, Storage::Master)?;
            be.nf4_dequantize(w, &mut d)?;
            be.to_host(&d)?
        }
    };
    let Some(lo) = &lin.lora else { return Ok(w) };
    // delta [out, in] = B [out, R] · A [R, in] = B · (Aᵀ)ᵀ: matmul_xwt with X = B (M=out, K=R), W = Aᵀ [in, R].
    let r = lo.r;
    let a = be.to_host(&lo.a)?;
    let mut at = vec![0f32; in_f * r];
    for k in 0..r {
        for i in 0..in_f {
            at[i * r + k] = a[k * in_f + i];
        }
    }
    // Master (f32) throughout: the merge must not round through the activation dtype.
    let at = be.from_vec_for(at, Storage::Master)?;
    let mut delta = be.zeros_for(out_f * in_f, Storage::Master)?;
    be.matmul_xwt(&lo.b, &at, &mut delta, out_f, r, in_f, Accum::Overwrite)?;
    be.scale(&mut delta, lo.scale)?;
    let wb = be.from_vec_for(w, Storage::Master)?;
    be.axpy(1.0, &wb, &mut delta)?;
    Ok(be.to_host(&delta)?)
}

/// Copies `COPIED_FILES` present in `src` into `dst`.
fn copy_side_files(src: Option<&Path>, dst: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    let Some(src) = src else { return Ok(copied) };
    for f in COPIED_FILES {
        let p = src.join(f);
        if p.is_file() {
            std::fs::copy(&p, dst.join(f)).map_err(|e| GemmaError::io(&p, e))?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}

/// config.json of the export: the model's own, with the dtype keys set and the quantization config
/// replaced (or removed when None).
fn write_config<B: Backend>(
    model: &Gemma2Model<B>,
    dir: &Path,
    dtype: ExportDtype,
    quant: Option<Value>,
) -> Result<()> {
    let mut cfg = model.config.to_json();
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| GemmaError::Invalid("the model's config is not a JSON object".into()))?;
    let mut set = false;
    for k in ["dtype", "torch_dtype"] {
        if obj.contains_key(k) {
            obj.insert(k.to_string(), Value::String(dtype.torch_name().into()));
            set = true;
        }
    }
    if !set {
        obj.insert(
            "torch_dtype".into(),
            Value::String(dtype.torch_name().into()),
        );
    }
    obj.remove("quantization_config");
    if let Some(q) = quant {
        obj.insert("quantization_config".into(), q);
    }
    let p = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| GemmaError::Json {
        path: p.clone(),
        source: e,
    })?;
    std::fs::write(&p, text + "\n").map_err(|e| GemmaError::io(&p, e))
}

/// Streams every tensor of the model in HF order; `linear` decides how each linear is written.
fn write_weights<B: Backend>(
    model: &Gemma2Model<B>,
    w: &mut ShardWriter<'_>,
    dtype: ExportDtype,
    mut linear: impl FnMut(usize, Target) -> Result<Vec<TensorOut<'static>>>,
) -> Result<()> {
    let be = &**model.backend();
    let cfg = &model.config;
    let h = cfg.hidden_size;
    let plain = |id: ParamId, buf: &B::Buf, shape: Vec<usize>| -> Result<TensorOut<'static>> {
        Ok(dtype.tensor(id.name(), shape, &be.to_host(buf)?))
    };
    w.push(plain(
        ParamId::Embed,
        &model.embed_tokens,
        vec![cfg.vocab_size, h],
    )?)?;
    for (layer, l) in model.layers.iter().enumerate() {
        for kind in NormKind::ALL {
            w.push(plain(ParamId::Norm { layer, kind }, l.norm(kind), vec![h])?)?;
        }
        for target in Target::ALL {
            for t in linear(layer, target)? {
                w.push(t)?;
            }
        }
    }
    w.push(plain(ParamId::FinalNorm, &model.norm, vec![h])?)?;
    Ok(())
}

/// Merges every LoRA into its base weight and writes a dense HF checkpoint (see the module docs).
/// The model itself is not modified.
pub fn export_merged<B: Backend>(
    model: &Gemma2Model<B>,
    out_dir: impl AsRef<Path>,
    opts: &ExportOptions,
) -> Result<ExportSummary> {
    let dtype = opts.dtype;
    let mut summary = None;
    write_dir_atomically(out_dir.as_ref(), |tmp| {
        let mut w = ShardWriter::new(tmp, opts.max_shard_bytes);
        write_weights(model, &mut w, dtype, |layer, target| {
            let (o, i) = target.dims(&model.config);
            let m = merged_weight(model, layer, target)?;
            Ok(vec![dtype.tensor(
                ParamId::Weight { layer, target }.name(),
                vec![o, i],
                &m,
            )])
        })?;
        let (weight_files, total_size, total_parameters) = w.finish()?;
        write_config(model, tmp, dtype, None)?;
        let copied = copy_side_files(opts.source_dir.as_deref(), tmp)?;
        summary = Some(ExportSummary {
            weight_files,
            total_size,
            total_parameters,
            copied,
        });
        Ok(())
    })?;
    summary.ok_or_else(|| GemmaError::Invalid("internal: export finished without a summary".into()))
}

/// Writes a bitsandbytes NF4 checkpoint (see the module docs) that transformers + bitsandbytes load
/// with `from_pretrained`. LoRA factors, if any, are merged before quantizing.
pub fn export_nf4<B: Backend>(
    model: &Gemma2Model<B>,
    out_dir: impl AsRef<Path>,
    opts: &QuantizeOptions,
) -> Result<ExportSummary> {
    let dtype = opts.export.dtype;
    let be = &**model.backend();
    let mut summary = None;
    write_dir_atomically(out_dir.as_ref(), |tmp| {
        let mut w = ShardWriter::new(tmp, opts.export.max_shard_bytes);
        write_weights(model, &mut w, dtype, |layer, target| {
            let name = ParamId::Weight { layer, target }.name();
            let lin = model.layers[layer].linear(target);
            let as_is = match (&lin.base, &lin.lora) {
                (LinearBase::Nf4(nf), None) => {
                    let host = be.nf4_to_host(nf)?;
                    let nested = matches!(host.absmax, afinar_kernels::nf4::Absmax::Nested { .. });
                    (nested == opts.double_quant).then_some(host)
                }
                _ => None,
            };
            let q = match as_is {
                // Already NF4 in the requested absmax format and nothing to merge: written unchanged
                // (no second quantization loss).
                Some(host) => host,
                None => {
                    let mut dense = merged_weight(model, layer, target)?;
                    dtype.round(&mut dense);
                    afinar_kernels::nf4::quantize(
                        &dense,
                        &[lin.out_features, lin.in_features],
                        opts.double_quant,
                    )?
                }
            };
            bnb::bnb_tensors(&name, &q, dtype.torch_name())
        })?;
        let (weight_files, total_size, total_parameters) = w.finish()?;
        let qc = bnb::quantization_config_json(&opts.compute_dtype, opts.double_quant);
        write_config(model, tmp, dtype, Some(qc))?;
        let copied = copy_side_files(opts.export.source_dir.as_deref(), tmp)?;
        summary = Some(ExportSummary {
            weight_files,
            total_size,
            total_parameters,
            copied,
        });
        Ok(())
    })?;
    summary.ok_or_else(|| GemmaError::Invalid("internal: export finished without a summary".into()))
}
