//! Training-side behaviour of the model: activation checkpointing, finite differences for full
//! fine-tuning, gradient accumulation, packing with segment ids, LoRA dropout, the optimizer-facing API.

use std::sync::Arc;

use afinar_gemma::{
    Batch, Gemma2Config, Gemma2Model, GemmaError, Grads, LoadOptions, LoraConfig, ParamId,
    Quantization, Target,
};
use afinar_kernels::{Backend, Cpu, Tolerance};

const V: usize = 67;

fn config() -> Gemma2Config {
    // 3 layers (sliding, full, sliding), window 3 < T, GQA 2, NH·D = 16 != H = 12, qpas != D.
    let mut c = Gemma2Config::tiny(V, 12, 20, 3, 2, 1, 8, 3).unwrap();
    c.query_pre_attn_scalar = 6.0;
    c.attn_logit_softcapping = Some(2.0);
    c.final_logit_softcapping = Some(4.0);
    c
}

fn model(lora: Option<LoraConfig>, full: bool, seed: u64) -> Gemma2Model<Cpu> {
    let opts = LoadOptions {
        lora,
        full_finetune: full,
        seed,
        ..Default::default()
    };
    perturbed(&opts)
}

/// A random model of `config()` built with `opts`, its trainable weights made non-trivial.
fn perturbed(opts: &LoadOptions) -> Gemma2Model<Cpu> {
    let seed = opts.seed;
    let mut m = Gemma2Model::random(Arc::new(Cpu::new()), config(), opts).unwrap();
    // Make the model non-trivial: larger weights, non-zero norm offsets and LoRA B.
    let mut ids = m.trainable_ids();
    ids.extend(m.lora_ids());
    ids.sort();
    ids.dedup();
    for id in ids {
        let name = id.name();
        let Ok(mut w) = m.get_tensor(&name) else {
            continue;
        };
        for (i, x) in w.iter_mut().enumerate() {
            let r = ((i as f32 * 0.618 + seed as f32 * 0.1).fract() - 0.5) * 0.6;
            *x = match id {
                ParamId::LoraB { .. } => r,
                ParamId::LoraA { .. } => *x,
                ParamId::Norm { .. } | ParamId::FinalNorm => r + 0.5,
                _ => *x * 5.0,
            };
        }
        m.set_tensor(&name, &w).unwrap();
    }
    m
}

fn lora(dropout: f64) -> LoraConfig {
    LoraConfig::new(3, 6.0, dropout, false, &["all-linear"]).unwrap()
}

fn batch(b: usize, t: usize, salt: i32) -> Batch {
    let ids: Vec<i32> = (0..(b * t) as i32)
        .map(|i| (i * 29 + salt * 7 + 3) % V as i32)
        .collect();
    let mut targets: Vec<i32> = (0..(b * t) as i32)
        .map(|i| (i * 13 + salt + 5) % V as i32)
        .collect();
    targets[1] = -100;
    targets[b * t - 1] = -100;
    let mut batch = Batch::new(b, t, ids, targets);
    batch.dropout_seed = 99;
    batch
}

fn grads_host(m: &Gemma2Model<Cpu>, g: &Grads<Cpu>) -> NamedGrads {
    m.trainable_ids()
        .into_iter()
        .map(|id| (id.name(), g.to_host(id).unwrap()))
        .collect()
}

type NamedGrads = Vec<(String, Vec<f32>)>;

fn run(m: &Gemma2Model<Cpu>, b: &Batch, scale: f32) -> ((f64, usize), NamedGrads) {
    let mut g = Grads::zeros(m).unwrap();
    let l = m.forward_backward(b, scale, &mut g).unwrap();
    (l, grads_host(m, &g))
}

#[test]
fn checkpointing_gives_identical_gradients() {
    // LoRA with dropout + full fine-tuning: every kind of gradient, and the dropout masks must be redrawn
    // identically in the recomputation.
    let mut m = model(Some(lora(0.2)), true, 1);
    let b = batch(2, 7, 0);
    let (l0, g0) = run(&m, &b, 0.1);
    m.checkpointing = true;
    let (l1, g1) = run(&m, &b, 0.1);
    assert_eq!(l0, l1);
    assert_eq!(g0.len(), g1.len());
    for ((n, a), (_, c)) in g0.iter().zip(&g1) {
        Tolerance::EXACT.assert_close(n, c.clone(), a.clone());
        assert!(a.iter().any(|&x| x != 0.0), "{n} has an all-zero gradient");
    }
}

/// QLoRA: NF4 base weights, LoRA with dropout. The checkpointed pass recomputes layers 1 and 0 in the
/// workspace the forward left layer 2's activations in, and uses layer 2's without recomputing them;
/// the gradients must still be the plain pass's bits.
#[test]
fn checkpointing_gives_identical_gradients_with_nf4_base() {
    let opts = LoadOptions {
        lora: Some(lora(0.3)),
        quantize: Quantization::Nf4 { double_quant: true },
        seed: 4,
        ..Default::default()
    };
    let mut m = perturbed(&opts);
    assert!(m.layers[0].linear(Target::UpProj).is_nf4());
    let b = batch(3, 5, 2);
    let (l0, g0) = run(&m, &b, 0.5);
    // The plain pass again (in the buffers the first one kept), then twice checkpointed (a new
    // workspace, then the kept one), then, after another shape, once more: always the same bits.
    for (i, ckpt) in [false, true, true, true].into_iter().enumerate() {
        m.checkpointing = ckpt;
        if i == 3 {
            run(&m, &batch(2, 4, 1), 1.0);
        }
        let (l1, g1) = run(&m, &b, 0.5);
        assert_eq!(l0, l1, "pass {i}");
        assert_eq!(g0.len(), g1.len());
        for ((n, a), (_, c)) in g0.iter().zip(&g1) {
            Tolerance::EXACT.assert_close(n, c.clone(), a.clone());
            assert!(a.iter().any(|&x| x != 0.0), "{n} has an all-zero gradient");
        }
    }
    m.release_workspace();
    assert_eq!(run(&m, &b, 0.5).0, l0);
}

/// Central differences in f32 through `loss` for the largest-gradient entry of several tensors, in full
/// fine-tuning mode with LoRA (dropout off so that `loss` and `forward_backward` compute the same function).
#[test]
fn gradients_match_finite_differences() {
    let mut m = model(
        Some(LoraConfig::new(2, 4.0, 0.0, false, &["q_proj", "down_proj", "v_proj"]).unwrap()),
        true,
        2,
    );
    let b = batch(2, 6, 1);
    let (_, grads) = run(&m, &b, 1.0);
    let ids = [
        ParamId::Embed,
        ParamId::FinalNorm,
        ParamId::Norm {
            layer: 0,
            kind: afinar_gemma::NormKind::Input,
        },
        ParamId::Norm {
            layer: 1,
            kind: afinar_gemma::NormKind::PostFeedforward,
        },
        ParamId::Weight {
            layer: 0,
            target: Target::QProj,
        },
        ParamId::Weight {
            layer: 1,
            target: Target::KProj,
        },
        ParamId::Weight {
            layer: 2,
            target: Target::GateProj,
        },
        ParamId::Weight {
            layer: 2,
            target: Target::DownProj,
        },
        ParamId::LoraA {
            layer: 1,
            target: Target::VProj,
        },
        ParamId::LoraB {
            layer: 0,
            target: Target::DownProj,
        },
        ParamId::LoraA {
            layer: 2,
            target: Target::QProj,
        },
    ];
    let eps = 3e-3f32;
    for id in ids {
        let name = id.name();
        let g = &grads.iter().find(|(n, _)| *n == name).unwrap().1;
        // Two entries: the largest |g| and one in the middle of the tensor.
        let imax = (0..g.len())
            .max_by(|&a, &c| g[a].abs().total_cmp(&g[c].abs()))
            .unwrap();
        for idx in [imax, g.len() / 2] {
            let w0 = m.get_tensor(&name).unwrap();
            let mut w = w0.clone();
            w[idx] = w0[idx] + eps;
            m.set_tensor(&name, &w).unwrap();
            let lp = m.loss(&b).unwrap().0;
            w[idx] = w0[idx] - eps;
            m.set_tensor(&name, &w).unwrap();
            let lm = m.loss(&b).unwrap().0;
            m.set_tensor(&name, &w0).unwrap();
            let fd = (lp - lm) / (2.0 * eps as f64);
            // f32 loss noise (~1e-5 absolute on Σ loss ≈ 40) over 2·eps ≈ 2e-3, plus O(eps²) curvature.
            Tolerance::new(2e-3, 2e-2).assert_close(
                &format!("{name}[{idx}]"),
                [g[idx] as f64],
                [fd],
            );
        }
    }
}

#[test]
fn gradients_accumulate_and_scale() {
    let m = model(Some(lora(0.0)), false, 3);
    let (b1, b2) = (batch(2, 5, 1), batch(2, 5, 2));
    let (_, g1) = run(&m, &b1, 1.0);
    let (_, g2) = run(&m, &b2, 1.0);
    let mut acc = Grads::zeros(&m).unwrap();
    m.forward_backward(&b1, 1.0, &mut acc).unwrap();
    m.forward_backward(&b2, 1.0, &mut acc).unwrap();
    for (n, a) in grads_host(&m, &acc) {
        let s1 = &g1.iter().find(|(x, _)| *x == n).unwrap().1;
        let s2 = &g2.iter().find(|(x, _)| *x == n).unwrap().1;
        let sum: Vec<f32> = s1.iter().zip(s2).map(|(x, y)| x + y).collect();
        Tolerance::F32.assert_close(&n, a, sum);
    }
    // grad_scale multiplies every gradient.
    let (_, half) = run(&m, &b1, 0.5);
    for ((n, h), (_, f)) in half.iter().zip(&g1) {
        Tolerance::F32.assert_close(n, h.clone(), f.iter().map(|x| x * 0.5).collect::<Vec<_>>());
    }
    // sum_squares, scale, zero.
    let host_ss: f64 = grads_host(&m, &acc)
        .iter()
        .flat_map(|(_, v)| v.iter().map(|&x| x as f64 * x as f64))
        .sum();
    Tolerance::new(0.0, 1e-6).assert_close("sum_squares", [acc.sum_squares().unwrap()], [host_ss]);
    acc.scale(2.0).unwrap();
    Tolerance::new(0.0, 1e-6).assert_close("scaled", [acc.sum_squares().unwrap()], [4.0 * host_ss]);
    acc.zero().unwrap();
    assert_eq!(acc.sum_squares().unwrap(), 0.0);
}

/// Two samples packed into one row (segment ids, restarting positions) compute exactly what they compute
/// as separate rows: logits, loss and gradients.
#[test]
fn packed_row_equals_separate_rows() {
    let m = model(Some(lora(0.0)), true, 4);
    let (t1, t2) = (5usize, 7usize);
    let a = batch(1, t1, 3);
    let b = batch(1, t2, 4);
    let mut p = Batch::new(
        1,
        t1 + t2,
        [a.input_ids.clone(), b.input_ids.clone()].concat(),
        [a.targets.clone(), b.targets.clone()].concat(),
    );
    p.positions = (0..t1 as i32).chain(0..t2 as i32).collect();
    p.segment_ids = Some([vec![0; t1], vec![1; t2]].concat());

    let lp = m.logits(&p).unwrap();
    Tolerance::F32.assert_close("sample 1", lp[..t1 * V].to_vec(), m.logits(&a).unwrap());
    Tolerance::F32.assert_close("sample 2", lp[t1 * V..].to_vec(), m.logits(&b).unwrap());

    let ((sp, cp), gp) = run(&m, &p, 1.0);
    let ((sa, ca), ga) = run(&m, &a, 1.0);
    let ((sb, cb), gb) = run(&m, &b, 1.0);
    assert_eq!(cp, ca + cb);
    Tolerance::new(1e-5, 1e-5).assert_close("loss", [sp], [sa + sb]);
    for (((n, x), (_, y)), (_, z)) in gp.iter().zip(&ga).zip(&gb) {
        let sum: Vec<f32> = y.iter().zip(z).map(|(u, v)| u + v).collect();
        Tolerance::new(1e-5, 1e-3).assert_close(n, x.clone(), sum);
    }
    // Without segment ids the second sample would see the first: the logits differ.
    let mut leak = p.clone();
    leak.segment_ids = None;
    assert!(Tolerance::F32
        .compare(
            "leak",
            m.logits(&leak).unwrap()[t1 * V..].to_vec(),
            m.logits(&b).unwrap()
        )
        .is_err());
}

#[test]
fn lora_dropout_is_seeded_and_training_only() {
    let m = model(Some(lora(0.3)), false, 5);
    let mut b = batch(2, 6, 5);
    let (l1, g1) = run(&m, &b, 1.0);
    let (l2, g2) = run(&m, &b, 1.0);
    assert_eq!(l1, l2, "same seed, same masks");
    assert_eq!(g1, g2);
    b.dropout_seed = 100;
    let (l3, g3) = run(&m, &b, 1.0);
    assert_ne!(l1.0, l3.0, "another seed draws other masks");
    assert_ne!(g1, g3);
    // Evaluation (`loss`) has no dropout: it equals a model whose dropout is 0.
    let mut m0 = model(Some(lora(0.0)), false, 5);
    for name in m.lora_names() {
        m0.set_tensor(&name, &m.get_tensor(&name).unwrap()).unwrap();
    }
    assert_eq!(m.loss(&b).unwrap(), m0.loss(&b).unwrap());
    assert_ne!(m.loss(&b).unwrap().0, l3.0);
    // Masks: 0 or 1/(1−p), p of them zero within a binomial 5σ bound (the masks are deterministic,
    // so this always passes or always fails), for every (layer, target) stream.
    let (p, n) = (0.3, 10_000usize);
    let five_sigma = |q: f64, n: usize| 5.0 * (n as f64 * q * (1.0 - q)).sqrt();
    let mut masks = Vec::new();
    for layer in 0..3 {
        for target in Target::ALL {
            let mask = afinar_gemma::lora::dropout_mask(1, layer, target, p, n).unwrap();
            let zeros = mask.iter().filter(|&&x| x == 0.0).count();
            assert!(mask.iter().all(|&x| x == 0.0 || x == (1.0 / 0.7f64) as f32));
            assert!(
                (zeros as f64 - p * n as f64).abs() <= five_sigma(p, n),
                "layer {layer} {target}: {zeros} zeros of {n}"
            );
            masks.push(((layer, target), mask));
        }
    }
    // Streams differ: every pair of (layer, target) masks agrees about as often as two independent
    // masks would (p² + (1−p)²), never identically.
    let q = p * p + (1.0 - p) * (1.0 - p);
    for (i, (ka, a)) in masks.iter().enumerate() {
        for (kb, b) in &masks[i + 1..] {
            let agree = a
                .iter()
                .zip(b)
                .filter(|(x, y)| (**x == 0.0) == (**y == 0.0))
                .count();
            assert!(
                (agree as f64 - q * n as f64).abs() <= five_sigma(q, n),
                "{ka:?} vs {kb:?}: {agree} agreements of {n}"
            );
        }
    }
    // A drop probability outside [0, 1) is an error, not a panic.
    assert!(afinar_gemma::lora::dropout_mask(1, 0, Target::QProj, 1.0, 4).is_err());
}

/// The optimizer API: stable order, names, and plain SGD through `params_and_grads` lowers the loss.
#[test]
fn params_and_grads_drive_an_optimizer() {
    let mut m = model(Some(lora(0.0)), false, 6);
    let b = batch(2, 6, 6);
    let names = m.trainable_names();
    assert_eq!(names.len(), 3 * 7 * 2);
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(
        names[1],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    );
    assert_eq!(
        names.last().unwrap(),
        "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"
    );
    assert_eq!(
        m.num_trainable(),
        3 * (3 * (12 + 16) + 3 * (12 + 8) * 2 + 3 * (16 + 12) + 3 * (12 + 20) * 2 + 3 * (20 + 12))
    );
    for id in m.trainable_ids() {
        assert_eq!(ParamId::parse(&id.name()), Some(id));
    }
    let backend = m.backend().clone();
    let mut g = Grads::zeros(&m).unwrap();
    let (first, count) = m.loss(&b).unwrap();
    for _ in 0..5 {
        g.zero().unwrap();
        m.forward_backward(&b, 1.0 / count as f32, &mut g).unwrap();
        let params = m.params_and_grads(&g).unwrap();
        assert_eq!(
            params.iter().map(|p| p.id.name()).collect::<Vec<_>>(),
            names
        );
        for p in params {
            backend.axpy(-0.2, p.grad, p.param).unwrap();
        }
    }
    let last = m.loss(&b).unwrap().0;
    // A wrong sign or a wrong parameter/gradient pairing would raise the loss or leave it flat. The
    // step size keeps the descent monotone: at 0.5 the loss went up and down from step to step and
    // 1e-7 changes in GEMM summation order moved the final loss by 0.15 (measured: 0.2295 drop here
    // with either GEMM path).
    assert!(last < first - 0.15, "{first} → {last}");

    // Gradients of another model are refused, not misapplied.
    let other = model(
        Some(LoraConfig::new(3, 6.0, 0.0, false, &["q_proj"]).unwrap()),
        false,
        6,
    );
    let og = Grads::zeros(&other).unwrap();
    assert!(m.params_and_grads(&og).is_err());
    let mut og = og;
    assert!(m.forward_backward(&b, 1.0, &mut og).is_err());
}

#[test]
fn bad_batches_are_errors() {
    let m = model(None, false, 7);
    let mut b = batch(2, 4, 0);
    b.input_ids[3] = V as i32;
    assert!(matches!(m.loss(&b), Err(GemmaError::Batch(ref s)) if s.contains("input_ids[3]")));
    let mut b = batch(2, 4, 0);
    b.targets[2] = -5;
    assert!(matches!(m.logits(&b), Err(GemmaError::Batch(ref s)) if s.contains("targets[2]")));
    let mut b = batch(2, 4, 0);
    b.positions.pop();
    assert!(matches!(m.loss(&b), Err(GemmaError::Batch(ref s)) if s.contains("positions")));
    let mut b = batch(2, 4, 0);
    b.segment_ids = Some(vec![0; 3]);
    assert!(matches!(m.loss(&b), Err(GemmaError::Batch(_))));
    assert!(matches!(
        m.loss(&Batch::default()),
        Err(GemmaError::Batch(_))
    ));
    // A frozen model has nothing to train: empty gradients, the forward still runs.
    let mut g = Grads::zeros(&m).unwrap();
    assert!(g.ids().is_empty());
    let (s, c) = m.forward_backward(&batch(1, 4, 0), 1.0, &mut g).unwrap();
    assert!(s > 0.0 && c == 2);
}

#[test]
fn shift_labels_matches_transformers() {
    // HF pads labels with one −100 and drops the first: targets[t] = labels[t + 1].
    let labels = [5, 6, -100, 8, 1, 2, 3, 4];
    assert_eq!(
        Batch::shift_labels(2, 4, &labels),
        vec![6, -100, 8, -100, 2, 3, 4, -100]
    );
}

#[test]
fn full_weights_by_hf_name() {
    let mut m = model(None, true, 8);
    let name = "model.layers.1.mlp.up_proj.weight";
    let w = m.get_tensor(name).unwrap();
    assert_eq!(w.len(), 20 * 12);
    let err = m.set_tensor(name, &w[1..]).unwrap_err();
    assert!(
        err.to_string().contains(name) && err.to_string().contains("[20, 12]"),
        "{err}"
    );
    assert!(m.get_tensor("model.layers.9.mlp.up_proj.weight").is_err());
    assert!(m.get_tensor("lm_head.weight").is_err());
    let be = Cpu::new();
    assert_eq!(be.len(m.param(ParamId::Embed).unwrap()), V * 12);
}
