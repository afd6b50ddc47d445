//! Library side of `afinar eval` and `afinar generate` (and of the base-vs-tuned report): loading a
//! model with an optional PEFT adapter, scoring a dataset, rendering a prompt exactly as training does
//! and decoding.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_data::{
    Body, DataLoader, LoaderConfig, MaskMode, Message, Role, Template, TemplateKind, TextTokenizer,
};
use afinar_gemma::generate::{generate, GenerateOptions};
use afinar_gemma::{Gemma2Model, LoadOptions, Quantization};
use afinar_kernels::cpu::Cpu;
use afinar_kernels::Backend;
use serde::Serialize;

use crate::train::{evaluate, Result, TrainError};

/// Loads `model_dir` on the CPU, NF4-quantizing the seven projections when asked, then applies the PEFT
/// adapter in `adapter` (if any).
pub fn load_model(model_dir: &Path, adapter: Option<&Path>, nf4: bool) -> Result<Gemma2Model<Cpu>> {
    load_model_on(Arc::new(Cpu::new()), model_dir, adapter, nf4)
}

/// [`load_model`] on any backend (e.g. a profiled CPU, see `crate::profile`).
pub fn load_model_on<B: Backend>(
    backend: Arc<B>,
    model_dir: &Path,
    adapter: Option<&Path>,
    nf4: bool,
) -> Result<Gemma2Model<B>> {
    let opts = LoadOptions {
        quantize: if nf4 {
            Quantization::Nf4 { double_quant: true }
        } else {
            Quantization::None
        },
        ..Default::default()
    };
    let mut model = Gemma2Model::load(backend, model_dir, &opts)?;
    if let Some(a) = adapter {
        afinar_gemma::peft::load_adapter(&mut model, a)?;
    }
    Ok(model)
}

/// `afinar eval`'s row length when `--max-seq-len` is not given (capped at the model's positions).
pub const DEFAULT_EVAL_MAX_SEQ_LEN: usize = 1024;

/// `afinar generate`'s token limit when `--max-new-tokens` is not given (capped at what the model's
/// positions leave after the prompt).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;

/// The row length `afinar eval` uses: `given` as is (an explicit value beyond the model's positions is
/// refused later, naming both numbers), or [`DEFAULT_EVAL_MAX_SEQ_LEN`] lowered to the model's
/// `max_position_embeddings` (read from `model_dir/config.json`), so a small model needs no flag.
pub fn eval_max_seq_len(model_dir: &Path, given: Option<usize>) -> Result<usize> {
    if let Some(n) = given {
        return Ok(n);
    }
    let path = afinar_gemma::config::config_path(model_dir);
    let cfg = afinar_gemma::Gemma2Config::from_file(&path)?;
    Ok(DEFAULT_EVAL_MAX_SEQ_LEN.min(cfg.max_position_embeddings))
}

/// `want` new tokens, lowered to what the model's `max_position_embeddings` leaves after `prompt`
/// (rendered as generation renders it). At least 1 so that a prompt that already fills the positions
/// still gets generate's own error naming both lengths.
pub fn fit_new_tokens<B: Backend>(
    model: &Gemma2Model<B>,
    tok: &TextTokenizer,
    template: &Template,
    prompt: &Prompt,
    want: usize,
) -> Result<usize> {
    let ids = prompt_ids(prompt, template, tok)?;
    let left = model
        .config
        .max_position_embeddings
        .saturating_sub(ids.len());
    Ok(want.min(left).max(1))
}

/// The quantization of the base an adapter was trained on, when the adapter sits in (or one level
/// below) a run directory whose config.toml says (`model.quantization`): (that config.toml, NF4?).
/// None for an adapter without a run (e.g. downloaded from the Hub, whose adapter_config.json does
/// not record it).
pub fn adapter_training_quantization(adapter: &Path) -> Option<(PathBuf, bool)> {
    let dir = adapter.canonicalize().ok()?;
    for cfg in dir
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("config.toml"))
    {
        if let Ok(text) = std::fs::read_to_string(&cfg) {
            let t: toml::Table = text.parse().ok()?;
            let q = t
                .get("model")
                .and_then(|m| m.get("quantization"))
                .and_then(|q| q.as_str())
                .unwrap_or("none");
            return Some((cfg, q == "nf4"));
        }
    }
    None
}

/// The warning `afinar eval` prints when `adapter` was trained on a base quantized differently from
/// the one it is scored on (`nf4` = the scoring base is NF4), else None.
pub fn quantization_mismatch(adapter: &Path, nf4: bool) -> Option<String> {
    let (cfg, trained_nf4) = adapter_training_quantization(adapter)?;
    let name = |q: bool| if q { "an NF4 (QLoRA)" } else { "a dense" };
    (trained_nf4 != nf4).then(|| {
        format!(
            "warning: the adapter was trained on {} base ({}: model.quantization) and is scored on {} base: \
             that is a different model from the one trained; pass --quantization {} to score the trained one",
            name(trained_nf4),
            cfg.display(),
            name(nf4),
            if trained_nf4 { "nf4" } else { "none" }
        )
    })
}

/// The CUDA backend of `--device cuda` with `dtype` as its activation/frozen-weight dtype (as
/// `model.dtype` in training). Ok(None) when the machine has no driver or GPU.
#[cfg(feature = "cuda")]
pub fn cuda_backend(dtype: crate::config::Dtype) -> Result<Option<afinar_kernels::cuda::Cuda>> {
    use afinar_kernels::cuda::{Cuda, CudaOptions, Dtype as CudaDtype};
    let alloc_dtype = match dtype {
        crate::config::Dtype::F32 => CudaDtype::F32,
        crate::config::Dtype::Bf16 => CudaDtype::Bf16,
        crate::config::Dtype::F16 => CudaDtype::F16,
    };
    let force_fallback_gemm = std::env::var("AFINAR_NO_CUBLAS").is_ok_and(|v| v == "1");
    Ok(Cuda::try_new_with(CudaOptions {
        alloc_dtype,
        force_fallback_gemm,
        ..CudaOptions::default()
    })?)
}

/// `afinar eval` options.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub data: PathBuf,
    pub format: Option<afinar_data::Format>,
    pub template: TemplateKind,
    pub max_seq_len: usize,
    pub batch_size: usize,
}

/// `afinar eval` result: loss = Σ CE over scored tokens / scored tokens.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub samples: usize,
}

/// Scores a dataset file (every record, in file order) with the training masks.
pub fn eval_file<B: Backend>(
    model: &Gemma2Model<B>,
    tok: &TextTokenizer,
    o: &EvalOptions,
) -> Result<EvalResult> {
    if o.max_seq_len > model.config.max_position_embeddings {
        return Err(TrainError::Invalid {
            key: "--max-seq-len".into(),
            reason: format!(
                "{} exceeds the model's max_position_embeddings = {}",
                o.max_seq_len, model.config.max_position_embeddings
            ),
        });
    }
    if o.batch_size == 0 {
        return Err(TrainError::Invalid {
            key: "--batch-size".into(),
            reason: "0: a batch holds at least one sequence".into(),
        });
    }
    let mut dc = afinar_data::DataConfig::new(&o.data, o.template);
    dc.format = o.format;
    dc.max_seq_len = o.max_seq_len;
    let prepared = afinar_data::prepare(&dc, tok)?;
    let samples = prepared.train.samples.len();
    let lc = LoaderConfig {
        batch_size: o.batch_size,
        packing: false,
        shuffle: false,
        seed: 0,
        drop_last: false,
    };
    let loader = DataLoader::new(prepared.train, o.max_seq_len, tok.pad_id(), lc)?;
    let (loss, tokens) = evaluate(model, &loader)?;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
        samples,
    })
}

/// What a model answers: an instruction (alpaca fields) or a conversation ending with a user turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Instruction {
        system: Option<String>,
        instruction: String,
        input: String,
    },
    Chat(Vec<Message>),
}

impl Prompt {
    /// A plain instruction with no input.
    pub fn text(instruction: &str) -> Prompt {
        Prompt::Instruction {
            system: None,
            instruction: instruction.into(),
            input: String::new(),
        }
    }

    /// The prompt as a one-line description (for reports).
    pub fn display(&self) -> String {
        match self {
            Prompt::Instruction {
                instruction, input, ..
            } if input.is_empty() => instruction.clone(),
            Prompt::Instruction {
                instruction, input, ..
            } => format!("{instruction}\n\n{input}"),
            Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        }
    }

    /// The record training would see, with a placeholder answer (cut off again by `prompt_ids`).
    fn body(&self) -> Body {
        match self {
            Prompt::Instruction {
                system,
                instruction,
                input,
            } => Body::Instruction {
                system: system.clone(),
                instruction: instruction.clone(),
                input: input.clone(),
                output: "x".into(),
            },
            Prompt::Chat(m) => {
                let mut m = m.clone();
                m.push(Message::new(Role::Assistant, "x"));
                Body::Chat(m)
            }
        }
    }
}

/// The token ids a model sees before its answer, rendered and tokenized segment by segment exactly as
/// in training (an alpaca record keeps its `### Input:` section): everything before the content of
/// the last assistant turn.
pub fn prompt_ids(prompt: &Prompt, template: &Template, tok: &TextTokenizer) -> Result<Vec<i32>> {
    let enc = afinar_data::encode_record(&prompt.body(), template, tok, MaskMode::LastTurn)
        .map_err(|(field, problem)| {
            TrainError::Unsupported(format!("cannot render the prompt ({field}): {problem}"))
        })?;
    let start = enc
        .segments
        .iter()
        .rev()
        .find(|(_, _, k)| matches!(k, afinar_data::SegKind::Completion { .. }))
        .map(|(s, _, _)| *s)
        .ok_or_else(|| TrainError::Unsupported("the template rendered no assistant turn".into()))?;
    Ok(enc.ids[..start].iter().map(|&i| i as i32).collect())
}

/// Sampling settings of `afinar generate`.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// transformers' `repetition_penalty` (1 = off).
    pub repetition_penalty: f32,
    /// transformers' `no_repeat_ngram_size` (0 = off): no n-gram of this size occurs twice in prompt + output.
    pub no_repeat_ngram_size: usize,
}

/// One generation.
#[derive(Clone, Debug, Serialize)]
pub struct GenOutput {
    pub prompt: String,
    pub completion: String,
    pub tokens: usize,
    pub stop: String,
    /// Tokens of the rendered prompt (the prefill's length).
    pub prompt_tokens: usize,
    /// Prompt tokens per second of the prefill, and new tokens per second of the decode steps (null
    /// when a phase had nothing to time).
    pub prefill_tokens_per_s: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
}

/// Generates an answer to one prompt. Stops on EOS and on the template's end-of-turn token.
pub fn generate_answer<B: Backend>(
    model: &Gemma2Model<B>,
    tok: &TextTokenizer,
    template: &Template,
    prompt: &Prompt,
    s: &SampleOptions,
) -> Result<GenOutput> {
    let ids = prompt_ids(prompt, template, tok)?;
    let mut opts = GenerateOptions::greedy_for(model, s.max_new_tokens);
    opts.temperature = s.temperature;
    opts.top_k = s.top_k;
    opts.top_p = s.top_p;
    opts.seed = s.seed;
    opts.repetition_penalty = s.repetition_penalty;
    opts.no_repeat_ngram_size = s.no_repeat_ngram_size;
    if let Some(eos) = tok.eos() {
        opts.eos_token_ids.push(eos.id as i32);
    }
    if let Some(eot) = template.end_of_turn_id() {
        opts.stop_token_ids.push(eot as i32);
    }
    let g = generate(model, &ids, &opts)?;
    // Drop a trailing stop token from the text.
    let mut toks: Vec<u32> = g.tokens.iter().map(|&t| t as u32).collect();
    if toks.last().is_some_and(|&t| {
        opts.stop_token_ids.contains(&(t as i32)) || opts.eos_token_ids.contains(&(t as i32))
    }) {
        toks.pop();
    }
    let completion = tok.decode(&toks)?;
    Ok(GenOutput {
        prompt: prompt.display(),
        completion,
        tokens: g.tokens.len(),
        stop: format!("{:?}", g.stop),
        prompt_tokens: ids.len(),
        prefill_tokens_per_s: g.prefill_tokens_per_s(ids.len()),
        decode_tokens_per_s: g.decode_tokens_per_s(),
    })
}

/// `afinar merge`: W + s·B·A for every adapted linear, written as a dense Hugging Face checkpoint in bf16 or
/// f32 (afinar-gemma's `export_merged`: sharded above 5 GB, atomic, tokenizer files copied).
pub fn merge(
    model_dir: &Path,
    adapter: &Path,
    out: &Path,
    dtype: &str,
) -> Result<afinar_gemma::export::ExportSummary> {
    merge_on(Arc::new(Cpu::new()), model_dir, adapter, out, dtype)
}

/// [`merge`] on any backend: the base and the adapter are loaded there, and each linear's
/// W (dequantized if NF4) + s·B·A is computed with that backend's ops in f32 (`export::merged_weight`),
/// then streamed to the host and written shard by shard. On a GPU, the base should be held in the
/// checkpoint's own dtype (lossless) so that the result equals the CPU's.
pub fn merge_on<B: Backend>(
    backend: Arc<B>,
    model_dir: &Path,
    adapter: &Path,
    out: &Path,
    dtype: &str,
) -> Result<afinar_gemma::export::ExportSummary> {
    use afinar_gemma::export::{export_merged, ExportDtype, ExportOptions};
    let model = load_model_on(backend, model_dir, Some(adapter), false)?;
    let opts = ExportOptions {
        dtype: if dtype == "f32" {
            ExportDtype::F32
        } else {
            ExportDtype::BF16
        },
        source_dir: Some(model_dir.to_path_buf()),
        ..Default::default()
    };
    Ok(export_merged(&model, out, &opts)?)
}

/// The dtype a checkpoint stores its weights in: config.json's `dtype` / `torch_dtype` when it names a
/// float type, else the stored dtype of `model.embed_tokens.weight` (transformers' `dtype="auto"`).
pub fn checkpoint_dtype(model_dir: &Path) -> Result<afinar_gemma::export::ExportDtype> {
    use afinar_gemma::export::ExportDtype;
    let path = afinar_gemma::config::config_path(model_dir);
    let cfg = afinar_gemma::Gemma2Config::from_file(&path)?;
    if let Some(d) = cfg.torch_dtype.as_deref().and_then(ExportDtype::from_name) {
        return Ok(d);
    }
    let store = afinar_gemma::TensorStore::open_dir(model_dir)?;
    let name = "model.embed_tokens.weight";
    let stored = store.info(name)?.dtype;
    ExportDtype::of_stored(stored).ok_or_else(|| TrainError::Invalid {
        key: "--model".into(),
        reason: format!(
            "{}: {name} is stored as {} and config.json names no float dtype; pass --dtype",
            model_dir.display(),
            stored.as_str()
        ),
    })
}

/// `afinar quantize`: a bitsandbytes NF4 checkpoint (blocksize 64, double-quantized absmax, compute dtype
/// bfloat16) that transformers + bitsandbytes load (afinar-gemma's `export_nf4`). The linears are
/// quantized from their values in `dtype` and the embedding and norms written in it; None = the
/// checkpoint's own dtype ([`checkpoint_dtype`]), so an f32 checkpoint is quantized from its f32
/// values, bit for bit what transformers + bitsandbytes produce from it. Returns the dtype used.
pub fn quantize(
    model_dir: &Path,
    out: &Path,
    dtype: Option<afinar_gemma::export::ExportDtype>,
) -> Result<(
    afinar_gemma::export::ExportSummary,
    afinar_gemma::export::ExportDtype,
)> {
    quantize_on(Arc::new(Cpu::new()), model_dir, out, dtype)
}

/// [`quantize`] on any backend. When every projection is stored in `dtype` (the default: the
/// checkpoint's own dtype), the model is loaded straight to NF4 by the streamed loader — each linear
/// quantized by the backend's `nf4_quantize` from its stored bytes (on a GPU, on the GPU), bit-exactly
/// what the host quantizer gives for those values — so the dense model never exists: a 9B checkpoint
/// needs ≈ 6 GB instead of 18 (bf16 on a GPU) or 37 (f32 on the CPU). Otherwise (a projection stored
/// in another dtype, which must first be rounded to `dtype`) the dense model is loaded and its
/// rounded values quantized on the host, as before.
pub fn quantize_on<B: Backend>(
    backend: Arc<B>,
    model_dir: &Path,
    out: &Path,
    dtype: Option<afinar_gemma::export::ExportDtype>,
) -> Result<(
    afinar_gemma::export::ExportSummary,
    afinar_gemma::export::ExportDtype,
)> {
    use afinar_gemma::export::{export_nf4, ExportOptions, QuantizeOptions};
    let dtype = match dtype {
        Some(d) => d,
        None => checkpoint_dtype(model_dir)?,
    };
    let direct = projections_stored_as(model_dir, dtype)?;
    let model = load_model_on(backend, model_dir, None, direct)?;
    let opts = QuantizeOptions {
        export: ExportOptions {
            dtype,
            source_dir: Some(model_dir.to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok((export_nf4(&model, out, &opts)?, dtype))
}

/// Whether every projection weight (`*_proj.weight`) of the checkpoint in `model_dir` is stored in
/// `dtype`, so that quantizing its stored values equals quantizing them after rounding to `dtype`.
fn projections_stored_as(
    model_dir: &Path,
    dtype: afinar_gemma::export::ExportDtype,
) -> Result<bool> {
    use afinar_gemma::export::ExportDtype;
    let store = afinar_gemma::TensorStore::open_dir(model_dir)?;
    let mut any = false;
    for name in store.names() {
        if !name.ends_with("_proj.weight") {
            continue;
        }
        any = true;
        if ExportDtype::of_stored(store.info(name)?.dtype) != Some(dtype) {
            return Ok(false);
        }
    }
    Ok(any)
}

/// Shape of a randomly initialised model (`afinar init`).
#[derive(Clone, Debug)]
pub struct InitShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: usize,
    pub seed: u64,
}

/// Largest model `afinar init` creates: 2^36 ≈ 69e9 parameters (256 GiB of f32).
pub const MAX_INIT_PARAMETERS: usize = 1 << 36;

/// `afinar init`: a randomly initialised Gemma-2 (embedding and linears N(0, 0.02), norm offsets 0) in the
/// Hugging Face layout (f32), with the vocabulary of the tokenizer in `tokenizer_dir` (whose
/// tokenizer.json / tokenizer_config.json are copied). The starting point for pretraining from scratch
/// with `model.full_finetune = true`.
pub fn init_model(tokenizer_dir: &Path, out: &Path, s: &InitShape) -> Result<()> {
    use afinar_gemma::export::{export_merged, ExportDtype, ExportOptions};
    let tok = TextTokenizer::from_model_dir(tokenizer_dir)?;
    let vocab = tok.vocab_size();
    let cfg = afinar_gemma::Gemma2Config::tiny(
        vocab,
        s.hidden,
        s.intermediate,
        s.layers,
        s.heads,
        s.kv_heads,
        s.head_dim,
        s.sliding_window,
    )?;
    // Every parameter is drawn in host memory: refuse sizes no machine holds instead of aborting in
    // (or thrashing through) the allocation. The limit is far above any released Gemma-2 (27B).
    let params = cfg.num_parameters();
    if params > MAX_INIT_PARAMETERS {
        return Err(TrainError::Invalid {
            key: "--hidden/--intermediate/--layers".into(),
            reason: format!(
                "the model would have {params} parameters ({:.0} GiB in f32), above the {MAX_INIT_PARAMETERS} that init accepts",
                params as f64 * 4.0 / (1u64 << 30) as f64
            ),
        });
    }
    let opts = LoadOptions {
        seed: s.seed,
        ..Default::default()
    };
    let model = Gemma2Model::random(Arc::new(Cpu::new()), cfg, &opts)?;
    let e = ExportOptions {
        dtype: ExportDtype::F32,
        source_dir: Some(tokenizer_dir.to_path_buf()),
        ..Default::default()
    };
    export_merged(&model, out, &e)?;
    Ok(())
}

/// Prompts from a file (`afinar generate --prompts`): JSONL records (alpaca `instruction`/`input`/`system`; `messages` up to the last user
/// turn; `prompt` or `text`) or plain lines.
pub fn read_prompts(p: &Path) -> Result<Vec<Prompt>> {
    use afinar_data::{Message, Role};
    let text = std::fs::read_to_string(p).map_err(|source| TrainError::Io {
        path: p.to_path_buf(),
        source,
    })?;
    let bad = TrainError::BadPrompt;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{}:{}", p.display(), i + 1);
        if !line.starts_with('{') {
            out.push(Prompt::text(line));
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("{}: invalid JSON: {e}", at())))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        if let Some(instruction) = s("instruction") {
            out.push(Prompt::Instruction {
                system: s("system").filter(|x| !x.is_empty()),
                instruction,
                input: s("input").unwrap_or_default(),
            });
        } else if let Some(msgs) = v.get("messages").and_then(|x| x.as_array()) {
            let mut chat = Vec::new();
            for m in msgs {
                let content = m.get("content").and_then(|c| c.as_str()).unwrap_or("");
                let name = m.get("role").and_then(|r| r.as_str());
                let Some(role) = name.and_then(Role::from_name) else {
                    return Err(bad(format!("{}: unknown role {name:?}", at())));
                };
                chat.push(Message::new(role, content));
            }
            // Up to and including the last user turn.
            let Some(last_user) = chat.iter().rposition(|m| m.role == Role::User) else {
                return Err(bad(format!("{}: no user message", at())));
            };
            chat.truncate(last_user + 1);
            out.push(Prompt::Chat(chat));
        } else if let Some(t) = s("prompt").or_else(|| s("text")) {
            out.push(Prompt::text(&t));
        } else {
            return Err(bad(format!(
                "{}: expected `instruction`, `messages`, `prompt` or `text`",
                at()
            )));
        }
    }
    Ok(out)
}
