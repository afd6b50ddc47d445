//! Library side of `afinar eval` and `afinar generate` (and of the base-vs-tuned report): loading a
//! model with an optional PEFT adapter, scoring a dataset, rendering a prompt exactly as training does
//! and decoding.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_data::{Body, DataLoader, LoaderConfig, MaskMode, Message, Role, Template, TemplateKind, TextTokenizer};
use afinar_gemma::generate::{generate, GenerateOptions};
use afinar_gemma::{Gemma2Model, LoadOptions, Quantization};
use afinar_kernels::cpu::Cpu;
use serde::Serialize;

use crate::train::{evaluate, Result, TrainError};

/// Loads `model_dir` on the CPU, NF4-quantizing the seven projections when asked, then applies the PEFT
/// adapter in `adapter` (if any).
pub fn load_model(model_dir: &Path, adapter: Option<&Path>, nf4: bool) -> Result<Gemma2Model<Cpu>> {
    let opts = LoadOptions {
        quantize: if nf4 { Quantization::Nf4 { double_quant: true } } else { Quantization::None },
        ..Default::default()
    };
    let mut model = Gemma2Model::load(Arc::new(Cpu::new()), model_dir, &opts)?;
    if let Some(a) = adapter {
        afinar_gemma::peft::load_adapter(&mut model, a)?;
    }
    Ok(model)
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
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub samples: usize,
}

/// Scores a dataset file (every record, in file order) with the training masks.
pub fn eval_file(model: &Gemma2Model<Cpu>, tok: &TextTokenizer, o: &EvalOptions) -> Result<EvalResult> {
    let mut dc = afinar_data::DataConfig::new(&o.data, o.template);
    dc.format = o.format;
    dc.max_seq_len = o.max_seq_len;
    let prepared = afinar_data::prepare(&dc, tok)?;
    let samples = prepared.train.samples.len();
    let lc = LoaderConfig { batch_size: o.batch_size.max(1), packing: false, shuffle: false, seed: 0, drop_last: false };
    let loader = DataLoader::new(prepared.train, o.max_seq_len, tok.pad_id(), lc)?;
    let (loss, tokens) = evaluate(model, &loader)?;
    Ok(EvalResult { loss, perplexity: loss.exp(), tokens, samples })
}

/// The token ids a model sees before its answer to `messages` (the last one a user turn), rendered
/// and tokenized segment by segment exactly as in training: everything before the assistant content.
pub fn prompt_ids(messages: &[Message], template: &Template, tok: &TextTokenizer) -> Result<Vec<i32>> {
    let mut msgs = messages.to_vec();
    // A placeholder answer, cut off again below: the templates render whole exchanges.
    msgs.push(Message::new(Role::Assistant, "x"));
    let body = Body::Chat(msgs);
    let enc = afinar_data::encode_record(&body, template, tok, MaskMode::LastTurn)
        .map_err(|(field, problem)| TrainError::Unsupported(format!("cannot render the prompt ({field}): {problem}")))?;
    let start = enc
        .segments
        .iter()
        .rev()
        .find(|(_, _, k)| matches!(k, afinar_data::SegKind::Completion { .. }))
        .map(|(s, _, _)| *s)
        .ok_or_else(|| TrainError::Unsupported("the template rendered no assistant turn".into()))?;
    Ok(enc.ids[..start].iter().map(|&i| i as i32).collect())
}

/// The user turn for an instruction (+ optional input), as alpaca records become chats in afinar-data.
pub fn user_message(instruction: &str, input: &str) -> Message {
    let text = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
    Message::new(Role::User, text)
}

/// Sampling settings of `afinar generate`.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

/// One generation.
#[derive(Clone, Debug, Serialize)]
pub struct GenOutput {
    pub prompt: String,
    pub completion: String,
    pub tokens: usize,
    pub stop: String,
}

/// Generates an answer to one user message. Stops on EOS and on the template's end-of-turn token.
pub fn generate_answer(
    model: &Gemma2Model<Cpu>,
    tok: &TextTokenizer,
    template: &Template,
    user: &Message,
    s: &SampleOptions,
) -> Result<GenOutput> {
    let ids = prompt_ids(std::slice::from_ref(user), template, tok)?;
    let mut opts = GenerateOptions::greedy_for(model, s.max_new_tokens);
    opts.temperature = s.temperature;
    opts.top_k = s.top_k;
    opts.top_p = s.top_p;
    opts.seed = s.seed;
    if let Some(eos) = tok.eos() {
        opts.eos_token_ids.push(eos.id as i32);
    }
    if let Some(eot) = template.end_of_turn_id() {
        opts.stop_token_ids.push(eot as i32);
    }
    let g = generate(model, &ids, &opts)?;
    // Drop a trailing stop token from the text.
    let mut toks: Vec<u32> = g.tokens.iter().map(|&t| t as u32).collect();
    if toks.last().is_some_and(|&t| opts.stop_token_ids.contains(&(t as i32)) || opts.eos_token_ids.contains(&(t as i32))) {
        toks.pop();
    }
    let completion = tok.decode(&toks)?;
    Ok(GenOutput { prompt: user.content.clone(), completion, tokens: g.tokens.len(), stop: format!("{:?}", g.stop) })
}

/// Every base tensor of a Gemma-2 checkpoint except the seven projections, in file order.
fn non_linear_ids(cfg: &afinar_gemma::Gemma2Config) -> Vec<afinar_gemma::ParamId> {
    use afinar_gemma::ParamId;
    let mut ids = vec![ParamId::Embed];
    for layer in 0..cfg.num_hidden_layers {
        for kind in afinar_gemma::NormKind::ALL {
            ids.push(ParamId::Norm { layer, kind });
        }
    }
    ids.push(ParamId::FinalNorm);
    ids
}

fn tensor_out(name: String, shape: Vec<usize>, v: &[f32], bf16: bool) -> afinar_gemma::safetensors_io::TensorOut<'static> {
    use afinar_gemma::safetensors_io::TensorOut;
    if bf16 {
        let mut data = Vec::with_capacity(v.len() * 2);
        for x in v {
            // Round to nearest even, as torch's .to(bfloat16).
            data.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
        }
        TensorOut { name, dtype: afinar_gemma::Dtype::BF16, shape, data: data.into() }
    } else {
        TensorOut::f32(name, shape, v)
    }
}

fn write_hf_dir(
    model_dir: &Path,
    out: &Path,
    tensors: &[afinar_gemma::safetensors_io::TensorOut<'_>],
    mut config: serde_json::Value,
    torch_dtype: &str,
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TrainError::Io { path: p, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    afinar_gemma::safetensors_io::write_safetensors(&out.join("model.safetensors"), tensors, Some(&meta))?;
    if let Some(o) = config.as_object_mut() {
        o.insert("torch_dtype".into(), torch_dtype.into());
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config).expect("json")).map_err(io(out))?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        let src = model_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out.join(f)).map_err(io(&src))?;
        }
    }
    Ok(())
}

/// `afinar merge`: W + s·B·A for every adapted linear (PEFT's merge: the matmul first, then × s), saved as a
/// dense Hugging Face checkpoint in bf16 (round to nearest even) or f32, with config.json and the tokenizer
/// files. One `model.safetensors` file (no sharding).
pub fn merge(model_dir: &Path, adapter: &Path, out: &Path, dtype: &str) -> Result<()> {
    use afinar_gemma::{ParamId, Target};
    let model = load_model(model_dir, Some(adapter), false)?;
    let be = model.backend().clone();
    let bf16 = dtype == "bf16";
    let cfg = &model.config;
    let mut tensors = Vec::new();
    for id in non_linear_ids(cfg) {
        tensors.push(tensor_out(id.name(), id.shape(cfg, 0), &model.get_tensor(&id.name())?, bf16));
    }
    for (layer, l) in model.layers.iter().enumerate() {
        for target in Target::ALL {
            let lin = l.linear(target);
            let (o, i) = (lin.out_features, lin.in_features);
            let mut w = model.dense_weight(layer, target)?;
            if let Some(lo) = &lin.lora {
                use afinar_kernels::Backend;
                let (a, b) = (be.to_host(&lo.a)?, be.to_host(&lo.b)?);
                let r = lo.r;
                // delta[o_, i_] = Σ_k B[o_, k]·A[k, i_], then W += s·delta.
                for oo in 0..o {
                    for ii in 0..i {
                        let mut d = 0.0f32;
                        for k in 0..r {
                            d += b[oo * r + k] * a[k * i + ii];
                        }
                        w[oo * i + ii] += d * lo.scale;
                    }
                }
            }
            tensors.push(tensor_out(ParamId::Weight { layer, target }.name(), vec![o, i], &w, bf16));
        }
    }
    write_hf_dir(model_dir, out, &tensors, model.config.to_json(), if bf16 { "bfloat16" } else { "float32" })
}

/// `afinar quantize`: a bitsandbytes-format NF4 checkpoint (blocksize 64, double-quantized absmax; quant
/// state dtype bfloat16) that transformers + bitsandbytes load; embeddings and norms in bf16, and
/// `quantization_config` in config.json.
pub fn quantize(model_dir: &Path, out: &Path) -> Result<()> {
    use afinar_gemma::{ParamId, Target};
    let model = load_model(model_dir, None, true)?;
    let cfg = &model.config;
    let mut tensors = Vec::new();
    for id in non_linear_ids(cfg) {
        tensors.push(tensor_out(id.name(), id.shape(cfg, 0), &model.get_tensor(&id.name())?, true));
    }
    for layer in 0..cfg.num_hidden_layers {
        for target in Target::ALL {
            let name = ParamId::Weight { layer, target }.name();
            let w = model
                .nf4_weight(layer, target)?
                .ok_or_else(|| TrainError::Unsupported(format!("{name} was not quantized on load")))?;
            tensors.extend(afinar_gemma::bnb::bnb_tensors(&name, &w, "bfloat16")?);
        }
    }
    let mut config = model.config.to_json();
    if let Some(o) = config.as_object_mut() {
        o.insert("quantization_config".into(), afinar_gemma::bnb::quantization_config_json("bfloat16", true));
    }
    write_hf_dir(model_dir, out, &tensors, config, "bfloat16")
}
