//! The layer-streamed merged logits (`Gemma2Model::merged_logits`) against the dense merged model
//! built the way the trainer's merge-fidelity check used to build it: the base loaded with default
//! options (dense, activation storage), every linear overwritten by `set_tensor(merged_weight(..))`.
//! Bit-identical on the CPU; on a bf16 CUDA backend (feature `cuda`, skipped without a driver) the
//! same, since both sides run the same kernels on the same bits.
//!
//! Also the dense base's eval loss read layer by layer from the checkpoint
//! (`Gemma2Model::streamed_base_loss`, the NF4 cost's dense side) against `load(..).loss(..)`.
//!
//! Two sources: the peft fixture (gemma_io_model + gemma_io_adapter_a, a trained adapter) loaded
//! from its directory exactly as the old check did, and a random tiny model whose LoRA B is set to
//! non-zero values; each with a dense and an NF4 base.

use std::sync::Arc;

use crate::io_common::*;
use afinar_gemma::export::merged_weight;
use afinar_gemma::model::{Batch, NormKind, ParamId};
use afinar_gemma::peft::load_adapter;
use afinar_gemma::{Gemma2Config, Gemma2Model, LoadOptions, LoraConfig, Quantization, Target};
use afinar_kernels::Backend;

const NF4: Quantization = Quantization::Nf4 { double_quant: true };

/// The old merge-fidelity model: `base` (a default load of the tuned model's base) with every linear
/// replaced by the tuned model's merged weight.
fn dense_merged<B: Backend>(mut base: Gemma2Model<B>, tuned: &Gemma2Model<B>) -> Gemma2Model<B> {
    for layer in 0..tuned.layers.len() {
        for t in Target::ALL {
            let w = merged_weight(tuned, layer, t).unwrap();
            base.set_tensor(&format!("{}.weight", t.module_path(layer)), &w)
                .unwrap();
        }
    }
    base
}

/// Prompts of different lengths (one batch each, as the merge-fidelity check runs them) and one
/// batch of two rows.
fn batches(ids: &[i32]) -> Vec<Batch> {
    let one = |s: &[i32]| Batch::new(1, s.len(), s.to_vec(), vec![-100; s.len()]);
    vec![
        one(&ids[..10]),
        one(&ids[10..17]),
        one(&ids[3..4]),
        Batch::new(2, 6, ids[..12].to_vec(), vec![-100; 12]),
    ]
}

/// Non-embedding, non-norm values of the merged model are the tuned model's: the embedding, every
/// norm and the final norm of `merged` equal `tuned`'s bit for bit.
fn assert_same_embedding_and_norms<B: Backend>(merged: &Gemma2Model<B>, tuned: &Gemma2Model<B>) {
    let mut ids = vec![ParamId::Embed, ParamId::FinalNorm];
    for layer in 0..tuned.layers.len() {
        ids.extend(NormKind::ALL.map(|kind| ParamId::Norm { layer, kind }));
    }
    for id in ids {
        let name = id.name();
        let (a, b) = (
            merged.get_tensor(&name).unwrap(),
            tuned.get_tensor(&name).unwrap(),
        );
        assert!(
            a.iter()
                .map(|x| x.to_bits())
                .eq(b.iter().map(|x| x.to_bits())),
            "{name}: the dense merged model's values are not the tuned model's"
        );
    }
}

/// The streamed merged logits equal the dense merged model's, bit for bit; the adapter matters (they
/// differ from the base's), and they stay close to base + adapter (what merge fidelity measures).
fn check<B: Backend>(
    tuned: &Gemma2Model<B>,
    base: &Gemma2Model<B>,
    merged: &Gemma2Model<B>,
    ids: &[i32],
    what: &str,
) {
    assert_same_embedding_and_norms(merged, tuned);
    let bs = batches(ids);
    let streamed = tuned.merged_logits(&bs).unwrap();
    assert_eq!(streamed.len(), bs.len());
    for (k, (b, s)) in bs.iter().zip(&streamed).enumerate() {
        let dense = merged.logits(b).unwrap();
        assert_eq!(s.len(), dense.len(), "{what}: batch {k} logits length");
        let differ = s
            .iter()
            .zip(&dense)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        let max = s
            .iter()
            .zip(&dense)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert_eq!(
            differ,
            0,
            "{what}: batch {k}: {differ} of {} streamed merged logits differ from the dense merged \
             model's (largest |diff| {max:e})",
            s.len()
        );
        // The adapter is in the merge: the base alone gives other logits.
        let plain = base.logits(b).unwrap();
        let moved = s
            .iter()
            .zip(&plain)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{what}: batch {k}: merged logits equal the base's (max |diff| {moved:e}): no adapter?"
        );
        // And the merge reproduces base + adapter up to rounding.
        let unmerged = tuned.logits(b).unwrap();
        let fid = s
            .iter()
            .zip(&unmerged)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{what}: batch {k}: adapter moved logits by {moved:e}, merged vs base + adapter {fid:e}");
        // bf16 activations round the merged weights (and the activations) to 8 significant bits.
        let bf16 = tuned.backend().round_activation(1.0 + 1.0 / 1024.0) != 1.0 + 1.0 / 1024.0;
        let rel = if bf16 { 0.25 } else { 1e-4 };
        assert!(
            fid < rel * moved.max(1.0),
            "{what}: batch {k}: merged vs base + adapter differ by {fid:e} (adapter moved logits by {moved:e})"
        );
    }
}

/// The peft fixture from its directory, dense or NF4 base, with the trained adapter.
fn fixture_case<B: Backend>(be: Arc<B>, quantize: Quantization) {
    let opts = LoadOptions {
        quantize,
        ..LoadOptions::default()
    };
    let base = Gemma2Model::load(be.clone(), model_dir(), &opts).unwrap();
    let mut tuned = Gemma2Model::load(be.clone(), model_dir(), &opts).unwrap();
    load_adapter(&mut tuned, adapter_a()).unwrap();
    let merged = dense_merged(
        Gemma2Model::load(be, model_dir(), &LoadOptions::default()).unwrap(),
        &tuned,
    );
    let ids = ints(&cases(), "input_ids");
    check(
        &tuned,
        &base,
        &merged,
        &ids,
        &format!("fixture {quantize:?}"),
    );
}

const V: usize = 96;

/// A random tiny model (2 layers: sliding and full attention, GQA), LoRA r 4 on every linear with B
/// set non-zero.
fn random_case<B: Backend>(be: Arc<B>, quantize: Quantization) {
    let cfg = Gemma2Config::tiny(V, 64, 128, 2, 2, 1, 32, 4).unwrap();
    let opts = |quantize, lora| LoadOptions {
        quantize,
        lora,
        seed: 5,
        ..LoadOptions::default()
    };
    let lora = LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap();
    let base = Gemma2Model::random(be.clone(), cfg.clone(), &opts(quantize, None)).unwrap();
    let mut tuned =
        Gemma2Model::random(be.clone(), cfg.clone(), &opts(quantize, Some(lora))).unwrap();
    for id in tuned.lora_ids() {
        if let ParamId::LoraB { .. } = id {
            let name = id.name();
            let n = tuned.get_tensor(&name).unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.02)
                .collect();
            tuned.set_tensor(&name, &v).unwrap();
        }
    }
    // The same seed gives the same base weights whatever else the options say.
    let merged = dense_merged(
        Gemma2Model::random(be, cfg, &opts(Quantization::None, None)).unwrap(),
        &tuned,
    );
    let ids: Vec<i32> = (0..20).map(|i| (i * 29 + 3) % V as i32).collect();
    check(
        &tuned,
        &base,
        &merged,
        &ids,
        &format!("random {quantize:?}"),
    );
}

/// The streamed dense base loss of the checkpoint in `dir` equals a default load's `loss`, batch by
/// batch, bit for bit; more batches than one stream group, so the layers are read twice.
fn streamed_loss_case<B: Backend>(be: Arc<B>, dir: std::path::PathBuf) {
    let ids = ints(&cases(), "input_ids");
    let n = afinar_gemma::model::STREAM_GROUP_BATCHES + 3;
    let bs: Vec<Batch> = (0..n)
        .map(|k| {
            let t = 3 + k % 8;
            let x: Vec<i32> = (0..t).map(|i| ids[(i + k) % ids.len()]).collect();
            let mut y: Vec<i32> = x[1..].to_vec();
            y.push(-100);
            if k % 3 == 0 {
                y[0] = -100;
            }
            Batch::new(1, t, x, y)
        })
        .collect();
    let dense = Gemma2Model::load(be.clone(), &dir, &LoadOptions::default()).unwrap();
    let streamed = Gemma2Model::streamed_base_loss(be, &dir, &bs).unwrap();
    assert_eq!(streamed.len(), bs.len());
    for (k, (b, (s, c))) in bs.iter().zip(&streamed).enumerate() {
        let (ds, dc) = dense.loss(b).unwrap();
        assert_eq!(
            (s.to_bits(), *c),
            (ds.to_bits(), dc),
            "{}: batch {k}: streamed loss {s} over {c} vs the dense model's {ds} over {dc}",
            dir.display()
        );
        assert!(*c > 0 && s.is_finite() && *s > 0.0);
    }
}

/// A CPU test, and with feature `cuda` a bf16 CUDA test that skips cleanly without a driver.
macro_rules! merged_tests {
    ($($name:ident => $body:ident($q:expr)),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn cpu() {
                $body(Arc::new(afinar_kernels::Cpu::new()), $q);
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda_bf16() {
                use afinar_kernels::cuda::{Cuda, CudaOptions, Dtype};
                match Cuda::try_new_with(CudaOptions {
                    alloc_dtype: Dtype::Bf16,
                    ..CudaOptions::default()
                }) {
                    Ok(Some(backend)) => $body(Arc::new(backend), $q),
                    Ok(None) => eprintln!("skipped: no CUDA driver"),
                    Err(e) => panic!("the CUDA backend failed to start: {e}"),
                }
            }
        }
    )*};
}

merged_tests! {
    merged_fixture_dense => fixture_case(Quantization::None),
    merged_fixture_nf4 => fixture_case(NF4),
    merged_random_dense => random_case(Quantization::None),
    merged_random_nf4 => random_case(NF4),
    streamed_base_loss_dense_checkpoint => streamed_loss_case(model_dir()),
    streamed_base_loss_bnb_checkpoint => streamed_loss_case(bnb_dir()),
}
