//! `afinar plan`: the peak memory of a training run, predicted from the model's shape and the run's
//! settings before anything is loaded, broken down by what holds it, and the longest sequence and the
//! largest micro-batch that fit in a given memory.
//!
//! The model counts the buffers the code keeps, not a rule of thumb:
//! - **weights** (`afinar_gemma::params`): the seven projections per layer dense in the activation
//!   dtype, or NF4 (packed codes n/2 bytes, absmax 4 bytes per 64-block, or with double quantization
//!   1 byte per 64-block + 4 bytes per 256 blocks + the 256-entry code table); the tied embedding
//!   [V,H] and the 4L+1 norms [H] in the activation dtype; everything trainable in f32 (`Storage::Master`);
//! - **trainer state**: LoRA A [R,in] and B [out,R] per adapted linear, their gradients, AdamW m and v
//!   (f32 each; in pinned host memory with `train.paged_optimizer` on a GPU, which streams them through
//!   two 16 MiB device chunks — `cuda/adamw_paged.rs`);
//! - **the kept training workspace** (`model/passes.rs` `TrainWorkspace`, kept between steps): the L layer
//!   outputs [N,H]; the saved activations `LayerActs` (`layer/mod.rs`: xn1, o, h1, xn2, d [N,H]; q, ao
//!   [N,NH·D]; k, v [N,NKV·D]; gate, up, act [N,I]; four rstd [N] and the attention lse [B,NH,T] in
//!   f32; per adapted linear xa [N,R] and, with dropout, its mask [N,in] in f32) — one set per layer,
//!   or one in all with gradient checkpointing, which adds the recompute output [N,H]; the backward's
//!   `BwdScratch` (`layer/backward.rs`: [N, 3H + 3I + 2·NH·D + 2·NKV·D]);
//! - **per-pass buffers** on top of that (`train_pass`): the embedding x0, the final hidden xf, its
//!   gradient dxf [N,H] while the LM head runs, then x0 and the two residual gradients dh, dnext while
//!   the layers run backward; the larger of the fused LM head's row chunk (CPU: `default_chunk_rows(V)`
//!   rows of [H] gathered + [V] logits, f32; GPU: 256 MiB of f32 logits) and the layer backward's
//!   temporaries (CPU attention: private dq, dk, dv per (batch, head) = 3·N·NH·D f32 plus two [64,T]
//!   f32 blocks per thread; GPU attention: delta [B,NH,T] f32; LoRA with dropout: a [N,in] temporary);
//! - **the evaluation pass** during training (`final_hidden` + LM head), which runs while the training
//!   workspace is still kept: x and next [N,H], one `LayerActs` without saved LoRA state, the LM head chunk;
//! - **GPU only**: the NF4 dequantization scratch (`cuda/nf4.rs`: one dense copy of the largest NF4
//!   weight in the activation dtype, kept) and the CUDA context with cuBLAS (≈ 500 MiB, measured on an
//!   H200: [`CUDA_CONTEXT_BYTES`]).
//!
//! With `[eval]` set, two more phases can set the peak: `eval.nf4_cost` scores the dense base before
//! training (alone), reading it from the checkpoint one layer at a time
//! (`Gemma2Model::streamed_base_loss`; [`nf4_cost_bytes`]), and `eval.merge_fidelity` runs the
//! merged model next to the trained model after training, layer-streamed
//! (`Gemma2Model::merged_logits`: one dense merged layer at a time, the merge prompts' hidden states
//! and one prompt's logits; [`merge_fidelity_bytes`]). Neither holds a dense copy of the model.
//!
//! On the CPU everything is f32 and lives in host memory; the prediction is of the training phase's
//! resident memory (the process's peak RSS also holds the loader's transient copies; see
//! `tests/it/plan_rss.rs`, which checks the prediction against measured RSS).

mod render;

use std::path::Path;

use afinar_gemma::{Gemma2Config, Target};
use serde::Serialize;

use crate::config::{Config, Device, Dtype, Quantization};
use crate::suite::MERGE_PROMPTS;

pub use render::{human, parse_bytes, plan_table};

/// Device memory the CUDA context, cuBLAS handle and workspace and the loaded kernel modules take
/// before the first buffer (≈ 500 MiB on an H200 with CUDA 13; the first GPU run's nvidia-smi figures
/// include it).
pub const CUDA_CONTEXT_BYTES: u64 = 500 << 20;

/// f32 logits the CUDA LM head keeps per row chunk (`LM_HEAD_CHUNK_BYTES` in cuda/lm_head.rs).
pub const CUDA_LM_HEAD_CHUNK_BYTES: usize = 256 << 20;

/// Elements of m and of v the paged optimizer streams through the device at once (cuda/adamw_paged.rs).
const PAGED_CHUNK: u64 = 1 << 22;

/// NF4 block sizes (bitsandbytes): 64 weights per absmax, 256 absmax per nested absmax.
const NF4_BLOCK: u64 = 64;
const NF4_NESTED_BLOCK: u64 = 256;

/// Everything the prediction depends on besides the model's shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanSettings {
    pub device: Device,
    /// Activation/frozen-weight dtype (the CPU computes in f32 whatever is asked).
    pub dtype: Dtype,
    pub quantization: Quantization,
    pub double_quant: bool,
    pub full_finetune: bool,
    pub lora_r: usize,
    #[serde(serialize_with = "target_names")]
    pub lora_targets: Vec<Target>,
    /// LoRA dropout > 0 (each adapted linear then keeps a mask [N,in]).
    pub lora_dropout: bool,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub gradient_checkpointing: bool,
    pub paged_optimizer: bool,
    /// An eval loss is computed during training (eval data configured).
    pub eval: bool,
    /// `eval.nf4_cost` with NF4 and eval data: the dense base is scored, layer-streamed, before training.
    pub nf4_cost: bool,
    /// `eval.merge_fidelity` with a suite: the merged model runs layer-streamed after training.
    pub merge_fidelity: bool,
    /// CPU threads (the CPU attention backward keeps per-thread blocks).
    pub threads: usize,
}

fn target_names<S: serde::Serializer>(t: &[Target], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(t.iter().map(|t| t.name()))
}

impl PlanSettings {
    /// The settings of a run config.
    pub fn from_config(cfg: &Config) -> PlanSettings {
        let eval = !cfg.data.eval.as_os_str().is_empty() || cfg.data.eval_fraction > 0.0;
        let nf4 = cfg.model.quantization == Quantization::Nf4;
        let suite = cfg.eval.enabled();
        PlanSettings {
            device: cfg.model.device,
            dtype: cfg.model.dtype,
            quantization: cfg.model.quantization,
            double_quant: cfg.model.double_quant,
            full_finetune: cfg.model.full_finetune,
            lora_r: cfg.lora.r,
            lora_targets: cfg.lora.targets.clone(),
            lora_dropout: cfg.lora.dropout > 0.0,
            micro_batch: cfg.train.micro_batch_size,
            seq_len: cfg.data.max_seq_len,
            gradient_checkpointing: cfg.train.gradient_checkpointing,
            paged_optimizer: cfg.train.paged_optimizer,
            eval,
            nf4_cost: suite && nf4 && eval && cfg.eval.nf4_cost,
            merge_fidelity: suite && cfg.eval.merge_fidelity && !cfg.model.full_finetune,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Bytes of one activation element where the run computes.
    fn act(&self) -> u64 {
        match (self.device, self.dtype) {
            (Device::Cpu, _) | (_, Dtype::F32) => 4,
            (Device::Cuda, Dtype::Bf16 | Dtype::F16) => 2,
        }
    }
}

/// One line of the breakdown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub bytes: u64,
    /// Where it lives when not in the memory the peak counts ("host (paged)"), else empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The prediction for one (micro-batch, sequence length).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub settings: PlanSettings,
    /// Held for the whole run: weights, trainer state, the kept training workspace, GPU constants.
    pub resident: Vec<Item>,
    /// On top of `resident` during one training pass (the largest moment).
    pub train_pass: Vec<Item>,
    /// On top of `resident` during an evaluation pass (0 when no eval loss is computed).
    pub eval_pass: u64,
    /// The layer-streamed dense eval of `eval.nf4_cost`, before training, alone (0 when off; see
    /// [`nf4_cost_bytes`]).
    pub nf4_cost_phase: u64,
    /// The layer-streamed merged forward of `eval.merge_fidelity` next to the trained model (0 when
    /// off; see [`merge_fidelity_bytes`]).
    pub merge_fidelity_extra: u64,
    /// The kept activations with the other checkpointing setting, for comparison.
    pub activations_other_mode: u64,
    /// Pinned host memory (paged AdamW state): not device memory.
    pub host_pinned: u64,
    /// The predicted peak of the device (GPU) or of the process's resident memory (CPU).
    pub peak: u64,
}

impl Plan {
    pub fn resident_total(&self) -> u64 {
        self.resident.iter().map(|i| i.bytes).sum()
    }
    pub fn train_pass_total(&self) -> u64 {
        self.train_pass.iter().map(|i| i.bytes).sum()
    }
}

/// Elements of the weight of `t` in one layer.
fn numel(cfg: &Gemma2Config, t: Target) -> u64 {
    let (o, i) = t.dims(cfg);
    (o * i) as u64
}

/// Bytes of one NF4 weight of `n` elements: (packed codes, absmax state).
pub fn nf4_bytes(n: u64, double_quant: bool) -> (u64, u64) {
    let blocks = n.div_ceil(NF4_BLOCK);
    let absmax = if double_quant {
        // u8 code per block, f32 nested absmax per 256 blocks, the f32 offset, the 256-entry f32 map.
        blocks + 4 * blocks.div_ceil(NF4_NESTED_BLOCK) + 4 + 4 * 256
    } else {
        4 * blocks
    };
    (n.div_ceil(2), absmax)
}

/// Activation widths of one saved layer: (act-dtype elements per row, f32 elements per row, lse f32).
fn layer_acts(cfg: &Gemma2Config, s: &PlanSettings, keep_lora: bool) -> u64 {
    let (n, act) = ((s.micro_batch * s.seq_len) as u64, s.act());
    let (h, qd, kd, i) = (
        cfg.hidden_size as u64,
        cfg.q_dim() as u64,
        cfg.kv_dim() as u64,
        cfg.intermediate_size as u64,
    );
    let acts = n * (5 * h + 2 * qd + 2 * kd + 3 * i) * act;
    let stats = 4 * (4 * n + (s.micro_batch * cfg.num_attention_heads * s.seq_len) as u64);
    let mut lora = 0;
    if keep_lora && !s.full_finetune {
        for &t in &s.lora_targets {
            let (_, inf) = t.dims(cfg);
            lora += 4 * n * s.lora_r as u64;
            if s.lora_dropout {
                lora += 4 * n * inf as u64;
            }
        }
    }
    acts + stats + lora
}

/// Bytes of the fused LM head's row chunk for `n` rows.
fn lm_head_chunk(cfg: &Gemma2Config, s: &PlanSettings, n: usize) -> u64 {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size as u64);
    match s.device {
        Device::Cpu => {
            let rows = afinar_kernels::cpu::lm_head::default_chunk_rows(v).min(n.max(1)) as u64;
            // Gathered hidden rows and their gradient [rows,H], the logits [rows,V], f32.
            4 * rows * (2 * h + v as u64)
        }
        Device::Cuda => {
            let rows =
                afinar_kernels::launch::lm_head_chunk_rows(n, v, CUDA_LM_HEAD_CHUNK_BYTES) as u64;
            4 * rows * (v as u64 + 1)
        }
    }
}

/// The temporaries of one layer backward beyond the kept buffers.
fn layer_bwd_temp(cfg: &Gemma2Config, s: &PlanSettings) -> u64 {
    let (b, t) = (s.micro_batch as u64, s.seq_len as u64);
    let n = b * t;
    let nh = cfg.num_attention_heads as u64;
    let attn = match s.device {
        // One task per (b, h): dq, dk, dv [T,D] f32 each, all collected before the reduction, plus the
        // probability blocks p, dp [64,T] f32 per running task.
        Device::Cpu => {
            4 * 3 * n * cfg.q_dim() as u64 + 4 * 2 * 64 * t * (s.threads as u64).min(b * nh)
        }
        Device::Cuda => 4 * b * nh * t,
    };
    let lora = if s.lora_dropout && !s.full_finetune {
        let max_in = s
            .lora_targets
            .iter()
            .map(|t| t.dims(cfg).1 as u64)
            .max()
            .unwrap_or(0);
        n * max_in * s.act() + 4 * n * s.lora_r as u64
    } else {
        0
    };
    attn.max(lora)
}

/// One dense decoder layer in the activation dtype: seven linears and four norms.
fn dense_layer_bytes(cfg: &Gemma2Config, s: &PlanSettings) -> u64 {
    let h = cfg.hidden_size as u64;
    (Target::ALL.iter().map(|&x| numel(cfg, x)).sum::<u64>() + 4 * h) * s.act()
}

/// What `eval.nf4_cost` holds, alone, before the training model exists: the dense base's eval loss
/// from `Gemma2Model::streamed_base_loss`, which loads the embedding and the final norm and reads the
/// decoder layers one at a time, for groups of up to `STREAM_GROUP_BATCHES` eval batches of
/// micro_batch × seq_len tokens. The larger of its two phases counts on top of the embedding:
/// - a layer: the group's hidden states [N,H], the dense layer, one batch's output [N,H] and layer
///   workspace (`LayerActs` without LoRA state);
/// - the head: the group's hidden states and final hidden states (2 × [N,H] per batch), the rstd and
///   the LM head's row chunk of one batch.
///
/// Plus the CUDA context on a GPU.
pub fn nf4_cost_bytes(cfg: &Gemma2Config, s: &PlanSettings) -> u64 {
    let act = s.act();
    let n = (s.micro_batch * s.seq_len) as u64;
    let (h, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let g = afinar_gemma::model::STREAM_GROUP_BATCHES as u64;
    let ends = (v + 1) * h * act;
    let layer_phase =
        g * n * h * act + dense_layer_bytes(cfg, s) + n * h * act + layer_acts(cfg, s, false);
    let head_phase = 2 * g * n * h * act + 4 * n + lm_head_chunk(cfg, s, n as usize);
    let ctx = if s.device == Device::Cuda {
        CUDA_CONTEXT_BYTES
    } else {
        0
    };
    ends + layer_phase.max(head_phase) + ctx
}

/// What `eval.merge_fidelity` holds on top of the trained model (`suite::merge_fidelity`, which runs
/// `Gemma2Model::merged_logits` and then the tuned model's `logits` on each of the
/// [`MERGE_PROMPTS`] prompts). Each prompt is taken to be at most `seq_len` tokens (suite prompts
/// are a few dozen). The phases, of which the largest counts:
/// - building and running one merged layer: every prompt's hidden state [T,H] (act), the dense
///   layer (seven linears + four norms, act), and the larger of `merged_weight`'s f32 temporaries for
///   one linear (W and the delta [out,in]; on the CPU also the host copy it returns) and one prompt's
///   layer pass (its output [T,H] and a `LayerActs` without LoRA state);
/// - the head, and later the tuned model's `logits`: one prompt's eval pass (x, next / xf [T,H],
///   the workspace, rstd, the f32 logits [T,V]) next to the hidden states;
/// - on the CPU (host memory is what the plan counts there): the merged logits of every prompt,
///   kept for the comparison, plus the host copy of one more [T,V] in f32.
pub fn merge_fidelity_bytes(cfg: &Gemma2Config, s: &PlanSettings) -> u64 {
    let act = s.act();
    let p = MERGE_PROMPTS as u64;
    let t = s.seq_len as u64;
    let (h, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let layer = dense_layer_bytes(cfg, s);
    let largest = Target::ALL
        .iter()
        .map(|&x| numel(cfg, x))
        .max()
        .unwrap_or(0);
    let cpu = s.device == Device::Cpu;
    let merge_temps = if cpu { 3 } else { 2 } * 4 * largest;
    let one = PlanSettings {
        micro_batch: 1,
        ..s.clone()
    };
    let acts = layer_acts(cfg, &one, false);
    let hidden = p * t * h * act;
    let layer_phase = layer + merge_temps.max(t * h * act + acts);
    let eval_one = 2 * t * h * act + acts + 4 * t + 4 * t * v;
    let host_logits = if cpu { (p + 1) * 4 * t * v } else { 0 };
    hidden + layer_phase.max(eval_one) + host_logits
}

/// Predicts the peak memory of training `cfg` with `s` (see the module doc).
pub fn plan(cfg: &Gemma2Config, s: &PlanSettings) -> Plan {
    let act = s.act();
    let (l, h, v) = (
        cfg.num_hidden_layers as u64,
        cfg.hidden_size as u64,
        cfg.vocab_size as u64,
    );
    let n = (s.micro_batch * s.seq_len) as u64;
    let cuda = s.device == Device::Cuda;
    let nf4 = s.quantization == Quantization::Nf4 && !s.full_finetune;
    let full = s.full_finetune;
    let mut resident = Vec::new();
    let mut push = |name, bytes, note: &str| {
        resident.push(Item {
            name,
            bytes,
            note: note.into(),
        })
    };

    // Frozen (or, in full fine-tuning, trained f32) weights.
    let weight_elem = if full { 4 } else { act };
    let (mut packed, mut absmax, mut dense, mut largest) = (0, 0, 0, 0);
    for &t in &Target::ALL {
        let e = numel(cfg, t);
        largest = largest.max(e);
        if nf4 {
            let (p, a) = nf4_bytes(e, s.double_quant);
            packed += l * p;
            absmax += l * a;
        } else {
            dense += l * e * weight_elem;
        }
    }
    if nf4 {
        push("NF4 weights (packed 4-bit)", packed, "");
        push(
            if s.double_quant {
                "NF4 absmax (double-quantized)"
            } else {
                "NF4 absmax (f32)"
            },
            absmax,
            "",
        );
    } else {
        push("dense linear weights", dense, "");
    }
    push("embedding (tied LM head)", v * h * weight_elem, "");
    push("norms", (4 * l + 1) * h * weight_elem, "");

    // Trainer state.
    let trainable = if full {
        cfg.num_parameters() as u64
    } else {
        l * s
            .lora_targets
            .iter()
            .map(|&t| {
                let (o, i) = t.dims(cfg);
                (s.lora_r * (o + i)) as u64
            })
            .sum::<u64>()
    };
    if !full {
        push("LoRA weights (f32)", 4 * trainable, "");
    }
    push("gradients (f32)", 4 * trainable, "");
    let paged = cuda && s.paged_optimizer;
    let largest_trainable = if full {
        (v * h).max(largest)
    } else {
        s.lora_targets
            .iter()
            .map(|&t| {
                let (o, i) = t.dims(cfg);
                (s.lora_r * o.max(i)) as u64
            })
            .max()
            .unwrap_or(0)
    };
    if paged {
        push(
            "AdamW m, v: device chunks",
            2 * 4 * PAGED_CHUNK.min(largest_trainable),
            "",
        );
    } else {
        push("AdamW m, v (f32)", 2 * 4 * trainable, "");
    }
    let host_pinned = if paged { 2 * 4 * trainable } else { 0 };

    // The kept training workspace.
    let kept_layers = if s.gradient_checkpointing { 1 } else { l };
    let one_layer = layer_acts(cfg, s, true);
    push("activations: layer outputs", l * n * h * act, "");
    push(
        if s.gradient_checkpointing {
            "activations: one layer (checkpointing)"
        } else {
            "activations: every layer"
        },
        kept_layers * one_layer,
        "",
    );
    let (qd, kd, i) = (
        cfg.q_dim() as u64,
        cfg.kv_dim() as u64,
        cfg.intermediate_size as u64,
    );
    let mut scratch = n * (3 * h + 3 * i + 2 * qd + 2 * kd) * act;
    if s.gradient_checkpointing && l > 1 {
        scratch += n * h * act;
    }
    push("backward scratch (kept)", scratch, "");
    let other_mode = l * n * h * act
        + if s.gradient_checkpointing {
            l * one_layer
        } else {
            one_layer + n * h * act
        };
    if cuda {
        if nf4 {
            push("NF4 dequantization scratch", largest * act, "");
        }
        push("CUDA context + cuBLAS", CUDA_CONTEXT_BYTES, "");
    }

    // One training pass on top.
    let nb = n as usize;
    let ce = lm_head_chunk(cfg, s, nb);
    let bwd = layer_bwd_temp(cfg, s);
    let pass_buffers = 3 * n * h * act + 4 * n;
    let train_pass = vec![
        Item {
            name: "pass buffers (x0, xf / dh, dxf / dnext)",
            bytes: pass_buffers,
            note: String::new(),
        },
        Item {
            name: if ce >= bwd {
                "cross-entropy chunk (LM head)"
            } else {
                "layer backward temporaries (attention, LoRA)"
            },
            bytes: ce.max(bwd),
            note: String::new(),
        },
    ];
    let eval_pass = if s.eval {
        2 * n * h * act + layer_acts(cfg, s, false) + 4 * n + ce
    } else {
        0
    };
    let nf4_cost_phase = if s.nf4_cost {
        nf4_cost_bytes(cfg, s)
    } else {
        0
    };
    let merge_fidelity_extra = if s.merge_fidelity {
        merge_fidelity_bytes(cfg, s)
    } else {
        0
    };
    let mut p = Plan {
        settings: s.clone(),
        resident,
        train_pass,
        eval_pass,
        nf4_cost_phase,
        merge_fidelity_extra,
        activations_other_mode: other_mode,
        host_pinned,
        peak: 0,
    };
    let base = p.resident_total();
    p.peak = (base + p.train_pass_total().max(eval_pass))
        .max(nf4_cost_phase)
        .max(base + merge_fidelity_extra);
    p
}

/// What fits in a memory budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fit {
    pub memory: u64,
    /// The longest sequence (up to max_position_embeddings) at the configured micro-batch; 0 = none.
    pub max_seq_len: usize,
    /// The largest micro-batch (up to 4096) at the configured sequence length; 0 = none.
    pub max_micro_batch: usize,
}

/// The largest x in [1, hi] with `fits(x)`, or 0 (the peak grows with x: binary search).
fn largest(hi: usize, fits: impl Fn(usize) -> bool) -> usize {
    if hi == 0 || !fits(1) {
        return 0;
    }
    let (mut lo, mut hi) = (1, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Largest micro-batch [`fit`] tries.
pub const MAX_FIT_MICRO_BATCH: usize = 4096;

/// The longest sequence and the largest micro-batch whose predicted peak is within `memory` bytes.
pub fn fit(cfg: &Gemma2Config, s: &PlanSettings, memory: u64) -> Fit {
    let at = |b: usize, t: usize| {
        let mut s = s.clone();
        s.micro_batch = b;
        s.seq_len = t;
        plan(cfg, &s).peak <= memory
    };
    Fit {
        memory,
        max_seq_len: largest(cfg.max_position_embeddings, |t| at(s.micro_batch, t)),
        max_micro_batch: largest(MAX_FIT_MICRO_BATCH, |b| at(b, s.seq_len)),
    }
}

/// The model's config.json: `path` is a model directory or the file itself.
pub fn read_model_config(path: &Path) -> afinar_gemma::Result<Gemma2Config> {
    if path.is_dir() {
        Gemma2Config::from_file(afinar_gemma::config::config_path(path))
    } else {
        Gemma2Config::from_file(path)
    }
}

#[cfg(test)]
mod tests;
