//! bitsandbytes 4-bit checkpoints (reading pre-quantized ones, writing our own) and merged dense
//! exports, against fixtures made by transformers + peft + bitsandbytes (tests/golden/make_gemma_io.py).
//!
//! Set AFINAR_IO_EXPORT_DIR=/some/dir to keep the exported directories (merged_f32, merged_bf16,
//! merged_sharded, nf4) for tests/golden/check_gemma_io_export.py, which loads them with transformers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::io_common::*;
use afinar_gemma::export::{
    export_merged, export_nf4, merged_weight, ExportDtype, ExportOptions, QuantizeOptions,
};
use afinar_gemma::model::{Batch, ParamId};
use afinar_gemma::peft::load_adapter;
use afinar_gemma::safetensors_io::{write_safetensors, Dtype, TensorOut};
use afinar_gemma::{Gemma2Model, LoadOptions, Quantization, Target, TensorStore};
use afinar_kernels::cpu::Cpu;
use afinar_kernels::Tolerance;
use serde_json::Value;

const LOGITS: Tolerance = Tolerance::new(1e-5, 1e-4);

fn logits(model: &Gemma2Model<Cpu>) -> Vec<f32> {
    let ids = ints(&cases(), "input_ids");
    model
        .logits(&Batch::new(2, 10, ids.clone(), vec![-100; ids.len()]))
        .unwrap()
}

/// Where an export goes: under $AFINAR_IO_EXPORT_DIR when set (kept for the Python check), else in `tmp`.
fn out_dir(tmp: &Path, name: &str) -> PathBuf {
    match std::env::var_os("AFINAR_IO_EXPORT_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => tmp.join(name),
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[test]
fn prequantized_bnb_checkpoint_matches_transformers_bitsandbytes() {
    let mut model = Gemma2Model::load(backend(), bnb_dir(), &LoadOptions::default()).unwrap();
    // Every linear was read as NF4, and dequantizes to exactly what bitsandbytes computes with.
    let deq =
        TensorStore::open_files(&[fixtures().join("gemma_io_bnb_dequant.safetensors")]).unwrap();
    for layer in 0..model.layers.len() {
        for target in Target::ALL {
            assert!(model.layers[layer].linear(target).is_nf4());
            let name = ParamId::Weight { layer, target }.name();
            Tolerance::EXACT.assert_close(
                &name,
                model.dense_weight(layer, target).unwrap(),
                deq.read_f32(&name).unwrap(),
            );
        }
    }
    // Bit-identical weights, so the f32 tolerance applies.
    Tolerance::F32.assert_close(
        "logits_bnb",
        logits(&model),
        floats(&cases(), "logits_bnb").0,
    );
    // QLoRA: the 4-bit model with the peft adapter.
    load_adapter(&mut model, adapter_a()).unwrap();
    Tolerance::F32.assert_close(
        "logits_bnb_adapter_a",
        logits(&model),
        floats(&cases(), "logits_bnb_adapter_a").0,
    );
}

/// Every tensor of two safetensors files: same names, dtypes, shapes and bytes.
fn assert_same_tensors(got: &Path, want: &Path) {
    let g = TensorStore::open_files(&[got.to_path_buf()]).unwrap();
    let w = TensorStore::open_files(&[want.to_path_buf()]).unwrap();
    assert_eq!(g.names(), w.names());
    for name in w.names() {
        let (gb, gi) = g.raw(name).unwrap();
        let (wb, wi) = w.raw(name).unwrap();
        assert_eq!((gi.dtype, &gi.shape), (wi.dtype, &wi.shape), "{name}");
        assert!(gb == wb, "{name}: bytes differ");
    }
    assert_eq!(g.metadata(0), w.metadata(0));
}

/// Our NF4 checkpoint of the dense fixture model against the one bitsandbytes (CPU) saved from the same
/// f32 weights. Everything is byte-identical — packed codes, quant maps, nested absmax, quant-state JSON
/// (hence the double-quant offset) — except that a few 8-bit absmax codes may differ by one step:
/// bitsandbytes' CPU kernel picks them through a 65536-bin lookup table that is not always the nearest
/// code, while afinar applies the CUDA `dQuantize` rule (nearest by f32 midpoints), which is what GPU-made
/// QLoRA checkpoints hold. For each such block we check that our code is the nearer (or equally near)
/// one. Returns the number of differing codes.
fn assert_same_as_bitsandbytes(model: &Gemma2Model<Cpu>, got: &Path, want: &Path) -> usize {
    let g = TensorStore::open_files(&[got.to_path_buf()]).unwrap();
    let w = TensorStore::open_files(&[want.to_path_buf()]).unwrap();
    assert_eq!(g.names(), w.names());
    let mut differing = 0;
    for name in w.names() {
        let (gb, gi) = g.raw(name).unwrap();
        let (wb, wi) = w.raw(name).unwrap();
        assert_eq!((gi.dtype, &gi.shape), (wi.dtype, &wi.shape), "{name}");
        if gb == wb {
            continue;
        }
        let p = name
            .strip_suffix(".absmax")
            .unwrap_or_else(|| panic!("{name}: bytes differ"));
        let id = ParamId::parse(p).unwrap();
        let ParamId::Weight { layer, target } = id else {
            panic!("{name}")
        };
        let dense = model.dense_weight(layer, target).unwrap();
        let code8 = w.read_f32(&format!("{p}.nested_quant_map")).unwrap();
        let nested = w.read_f32(&format!("{p}.nested_absmax")).unwrap();
        let qs = afinar_gemma::bnb::parse_quant_state(
            p,
            w.raw(&format!("{p}.quant_state.bitsandbytes__nf4"))
                .unwrap()
                .0,
        )
        .unwrap();
        let offset = qs.nested.unwrap().2 as f32;
        for (i, (&ours, &theirs)) in gb.iter().zip(wb).enumerate() {
            if ours == theirs {
                continue;
            }
            differing += 1;
            assert_eq!(
                (ours as i32 - theirs as i32).abs(),
                1,
                "{name}[{i}]: codes {ours} vs {theirs}"
            );
            let amax = dense[i * 64..(i + 1) * 64]
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()));
            let xn = (amax - offset) * (1.0 / nested[i / 256]);
            let (d_ours, d_theirs) = (
                (xn - code8[ours as usize]).abs(),
                (xn - code8[theirs as usize]).abs(),
            );
            assert!(d_ours <= d_theirs, "{name}[{i}]: x = {xn:e}: our code {ours} is {d_ours:e} away, bitsandbytes' {theirs} {d_theirs:e}");
        }
    }
    assert_eq!(g.metadata(0), w.metadata(0));
    differing
}

#[test]
fn nf4_export_matches_bitsandbytes_save_pretrained() {
    let tmp = tempfile::tempdir().unwrap();
    let model = load_model(&LoadOptions::default());
    let opts = QuantizeOptions {
        double_quant: true,
        compute_dtype: "float32".into(),
        export: ExportOptions {
            dtype: ExportDtype::F32,
            source_dir: Some(model_dir()),
            ..ExportOptions::default()
        },
    };
    let dir = out_dir(tmp.path(), "nf4");
    let summary = export_nf4(&model, &dir, &opts).unwrap();
    assert_eq!(summary.weight_files, vec!["model.safetensors".to_string()]);
    assert!(
        summary.copied.contains(&"tokenizer.json".to_string())
            && summary
                .copied
                .contains(&"generation_config.json".to_string())
    );
    // Quantized from the same f32 weights, our checkpoint equals the one transformers + bitsandbytes saved
    // (up to the CPU-vs-CUDA 8-bit absmax rounding, see `assert_same_as_bitsandbytes`).
    let differing = assert_same_as_bitsandbytes(
        &model,
        &dir.join("model.safetensors"),
        &bnb_dir().join("model.safetensors"),
    );
    let per_layer: usize = Target::ALL
        .iter()
        .map(|t| t.dims(&model.config).0 * t.dims(&model.config).1 / 64)
        .sum();
    let blocks = per_layer * model.layers.len();
    eprintln!("{differing} of {blocks} 8-bit absmax codes differ from bitsandbytes-CPU (its LUT is not nearest)");
    assert!(
        differing * 100 < blocks,
        "{differing} of {blocks} absmax codes differ"
    );
    let (ours, theirs) = (
        json(&dir.join("config.json")),
        json(&bnb_dir().join("config.json")),
    );
    assert_eq!(ours["quantization_config"], theirs["quantization_config"]);
    assert_eq!(ours["dtype"], "float32");
    // It loads back as the model quantized on load (same quantizer), logits for logits.
    let back = Gemma2Model::load(backend(), &dir, &LoadOptions::default()).unwrap();
    let on_load = load_model(&LoadOptions {
        quantize: Quantization::Nf4 { double_quant: true },
        ..LoadOptions::default()
    });
    Tolerance::EXACT.assert_close(
        "exported vs quantized on load",
        logits(&back),
        logits(&on_load),
    );
    if let Some(d) = std::env::var_os("AFINAR_IO_EXPORT_DIR") {
        // For check_gemma_io_export.py: what afinar computes with this checkpoint.
        let d = PathBuf::from(d);
        let mut outs = vec![TensorOut::f32("logits", vec![2, 10, 97], &logits(&back))];
        for layer in 0..back.layers.len() {
            for target in Target::ALL {
                let (o, i) = target.dims(&back.config);
                outs.push(TensorOut::f32(
                    ParamId::Weight { layer, target }.name(),
                    vec![o, i],
                    &back.dense_weight(layer, target).unwrap(),
                ));
            }
        }
        write_safetensors(&d.join("nf4_afinar_outputs.safetensors"), &outs, None).unwrap();
    }
    // Re-exporting a pre-quantized model without LoRA is lossless: the same bytes again.
    let prequant = Gemma2Model::load(backend(), bnb_dir(), &LoadOptions::default()).unwrap();
    let again = out_dir(tmp.path(), "nf4_again");
    export_nf4(&prequant, &again, &opts).unwrap();
    assert_same_tensors(
        &again.join("model.safetensors"),
        &bnb_dir().join("model.safetensors"),
    );
}

#[test]
fn nf4_export_in_bf16_quantizes_bf16_rounded_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = load_model(&LoadOptions::default());
    let dir = out_dir(tmp.path(), "nf4_bf16_plain");
    export_nf4(
        &model,
        &dir,
        &QuantizeOptions {
            double_quant: false,
            ..QuantizeOptions::default()
        },
    )
    .unwrap();
    let st = TensorStore::open_dir(&dir).unwrap();
    assert_eq!(
        st.info("model.embed_tokens.weight").unwrap().dtype,
        Dtype::BF16
    );
    let name = "model.layers.1.mlp.down_proj.weight";
    let blob = String::from_utf8(
        st.raw(&format!("{name}.quant_state.bitsandbytes__nf4"))
            .unwrap()
            .0
            .to_vec(),
    )
    .unwrap();
    assert_eq!(blob, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 64]}");
    assert_eq!(
        st.info(&format!("{name}.absmax")).unwrap().dtype,
        Dtype::F32
    );
    let cfg = json(&dir.join("config.json"));
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_use_double_quant"],
        false
    );
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_compute_dtype"],
        "bfloat16"
    );
    // The codes are those of the bf16-rounded weight.
    let w: Vec<f32> = model
        .dense_weight(1, Target::DownProj)
        .unwrap()
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let q = afinar_kernels::nf4::quantize(&w, &[64, 64], false).unwrap();
    assert_eq!(st.raw(name).unwrap().0, &q.packed[..]);

    // The QLoRA default (bf16, double quant) loads back as NF4 weights equal to quantizing the
    // bf16-rounded weights on load.
    let dq = out_dir(tmp.path(), "nf4_bf16");
    export_nf4(&model, &dq, &QuantizeOptions::default()).unwrap();
    let back = Gemma2Model::load(backend(), &dq, &LoadOptions::default()).unwrap();
    for (d, name) in [(&dir, "nf4_bf16_plain"), (&dq, "nf4_bf16")] {
        let m = Gemma2Model::load(backend(), d, &LoadOptions::default()).unwrap();
        let mut outs = Vec::new();
        for layer in 0..m.layers.len() {
            for target in Target::ALL {
                let (o, i) = target.dims(&m.config);
                let got = m.dense_weight(layer, target).unwrap();
                outs.push(TensorOut::f32(
                    ParamId::Weight { layer, target }.name(),
                    vec![o, i],
                    &got,
                ));
            }
        }
        if let Some(root) = std::env::var_os("AFINAR_IO_EXPORT_DIR") {
            // For check_gemma_io_export.py: afinar's dequantized weights of this export.
            write_safetensors(
                &PathBuf::from(root).join(format!("{name}_afinar_dequant.safetensors")),
                &outs,
                None,
            )
            .unwrap();
        }
    }
    let w: Vec<f32> = model
        .dense_weight(0, Target::QProj)
        .unwrap()
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let q = afinar_kernels::nf4::quantize(&w, &[128, 64], true).unwrap();
    Tolerance::EXACT.assert_close(
        "q_proj",
        back.dense_weight(0, Target::QProj).unwrap(),
        q.dequantize().unwrap(),
    );
}

#[test]
fn merged_export_matches_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = load_model(&LoadOptions::default());
    load_adapter(&mut model, adapter_a()).unwrap();
    let dir = out_dir(tmp.path(), "merged_f32");
    let opts = ExportOptions {
        dtype: ExportDtype::F32,
        source_dir: Some(model_dir()),
        ..ExportOptions::default()
    };
    let summary = export_merged(&model, &dir, &opts).unwrap();
    assert_eq!(summary.weight_files, vec!["model.safetensors".to_string()]);
    assert_eq!(
        summary.total_parameters as usize,
        model.config.num_parameters()
    );

    let st = TensorStore::open_dir(&dir).unwrap();
    let peft =
        TensorStore::open_files(&[fixtures().join("gemma_io_merged_a.safetensors")]).unwrap();
    let base = TensorStore::open_dir(model_dir()).unwrap();
    for name in base.names() {
        let got = st.read_f32(name).unwrap();
        if peft.contains(name) {
            // W + (B·A)·s: r = 4 products per element, so only the last bits can differ from torch.
            Tolerance::new(1e-6, 1e-6).assert_close(name, got, peft.read_f32(name).unwrap());
        } else {
            Tolerance::EXACT.assert_close(name, got, base.read_f32(name).unwrap());
        }
    }
    assert_eq!(st.names(), base.names(), "no lm_head, no extra tensors");
    let cfg = json(&dir.join("config.json"));
    assert_eq!(cfg["dtype"], "float32");
    assert!(cfg.get("quantization_config").is_none());
    assert_eq!(
        std::fs::read(dir.join("tokenizer.json")).unwrap(),
        std::fs::read(model_dir().join("tokenizer.json")).unwrap()
    );

    // The merged directory loads and gives the merged model's logits.
    let merged = Gemma2Model::load(backend(), &dir, &LoadOptions::default()).unwrap();
    LOGITS.assert_close(
        "logits_merged_a",
        logits(&merged),
        floats(&cases(), "logits_merged_a").0,
    );
}

#[test]
fn merged_export_bf16_and_sharded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = load_model(&LoadOptions::default());
    load_adapter(&mut model, adapter_a()).unwrap();

    let bf = out_dir(tmp.path(), "merged_bf16");
    export_merged(
        &model,
        &bf,
        &ExportOptions {
            dtype: ExportDtype::BF16,
            source_dir: Some(model_dir()),
            ..ExportOptions::default()
        },
    )
    .unwrap();
    let st = TensorStore::open_dir(&bf).unwrap();
    for name in st.names() {
        assert_eq!(st.info(name).unwrap().dtype, Dtype::BF16, "{name}");
    }
    let want: Vec<f32> = merged_weight(&model, 1, Target::OProj)
        .unwrap()
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    Tolerance::EXACT.assert_close(
        "o_proj bf16",
        st.read_f32("model.layers.1.self_attn.o_proj.weight")
            .unwrap(),
        want,
    );
    assert_eq!(json(&bf.join("config.json"))["dtype"], "bfloat16");

    // 40 kB shards: several files and an index, loading to the same model as one file.
    let sh = out_dir(tmp.path(), "merged_sharded");
    let opts = ExportOptions {
        dtype: ExportDtype::F32,
        max_shard_bytes: 40_000,
        source_dir: Some(model_dir()),
    };
    let summary = export_merged(&model, &sh, &opts).unwrap();
    let n = summary.weight_files.len();
    assert!(n > 2, "{:?}", summary.weight_files);
    assert_eq!(
        summary.weight_files[0],
        format!("model-00001-of-{n:05}.safetensors")
    );
    assert!(!sh.join("model.safetensors").exists());
    let index = json(&sh.join("model.safetensors.index.json"));
    assert_eq!(
        index["metadata"]["total_size"].as_u64(),
        Some(summary.total_size)
    );
    let mut on_disk = 0u64;
    for f in &summary.weight_files {
        let shard = TensorStore::open_files(&[sh.join(f)]).unwrap();
        on_disk += shard
            .names()
            .iter()
            .map(|n| shard.info(n).unwrap().numel() as u64 * 4)
            .sum::<u64>();
    }
    assert_eq!(on_disk, summary.total_size);
    for f in &summary.weight_files {
        let len = std::fs::metadata(sh.join(f)).unwrap().len();
        assert!(len < 40_000 + 4_000, "{f}: {len} bytes");
    }
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(
        map.len(),
        TensorStore::open_dir(model_dir()).unwrap().names().len()
    );
    let sharded = Gemma2Model::load(backend(), &sh, &LoadOptions::default()).unwrap();
    LOGITS.assert_close(
        "logits_merged_a (sharded)",
        logits(&sharded),
        floats(&cases(), "logits_merged_a").0,
    );
}

#[test]
fn qlora_merge_dequantizes_then_adds_the_delta() {
    // NF4 base (quantized on load) + adapter: merged = dequant(W) + (B·A)·s.
    let mut q = load_model(&LoadOptions {
        quantize: Quantization::Nf4 { double_quant: true },
        ..LoadOptions::default()
    });
    let w_nf4 = q.dense_weight(0, Target::UpProj).unwrap();
    load_adapter(&mut q, adapter_a()).unwrap();
    let mut d = load_model(&LoadOptions::default());
    let w = d.dense_weight(0, Target::UpProj).unwrap();
    load_adapter(&mut d, adapter_a()).unwrap();
    let delta: Vec<f32> = merged_weight(&d, 0, Target::UpProj)
        .unwrap()
        .iter()
        .zip(&w)
        .map(|(m, w)| m - w)
        .collect();
    let want: Vec<f32> = w_nf4.iter().zip(&delta).map(|(a, b)| a + b).collect();
    Tolerance::new(1e-6, 1e-5).assert_close(
        "qlora merged up_proj",
        merged_weight(&q, 0, Target::UpProj).unwrap(),
        want,
    );
}

/// Copies the bnb fixture into `dst` with its tensor list edited by `edit` (name, dtype, shape, bytes).
fn rewrite_bnb(dst: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(bnb_dir().join("config.json"), dst.join("config.json")).unwrap();
    let st = TensorStore::open_dir(bnb_dir()).unwrap();
    let mut ts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .names()
        .into_iter()
        .map(|n| {
            let (b, i) = st.raw(n).unwrap();
            (n.to_string(), i.dtype, i.shape.clone(), b.to_vec())
        })
        .collect();
    edit(&mut ts);
    let outs: Vec<TensorOut> = ts
        .into_iter()
        .map(|(name, dtype, shape, data)| TensorOut {
            name,
            dtype,
            shape,
            data: data.into(),
        })
        .collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_safetensors(&dst.join("model.safetensors"), &outs, Some(&meta)).unwrap();
}

/// `rewrite_bnb` replacing tensor `target` by `replace(bytes, dtype, shape)`, or removing it (None).
fn corrupt_bnb(
    dst: &Path,
    target: &str,
    replace: impl Fn(&[u8], Dtype, &[usize]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    rewrite_bnb(dst, |ts| {
        let i = ts
            .iter()
            .position(|t| t.0 == target)
            .unwrap_or_else(|| panic!("no {target} in the fixture"));
        match replace(&ts[i].3, ts[i].1, &ts[i].2) {
            Some((dtype, shape, data)) => ts[i] = (target.to_string(), dtype, shape, data),
            None => {
                ts.remove(i);
            }
        }
    });
}

#[test]
fn broken_bnb_checkpoints_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let p = "model.layers.1.self_attn.q_proj.weight";
    let load = |d: &Path| {
        Gemma2Model::load(backend(), d, &LoadOptions::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };

    // A quant_map that is not the NF4 table.
    let d = tmp.path().join("qmap");
    corrupt_bnb(&d, &format!("{p}.quant_map"), |b, dt, s| {
        let mut b = b.to_vec();
        b[0..4].copy_from_slice(&(-0.5f32).to_le_bytes());
        Some((dt, s.to_vec(), b))
    });
    let err = load(&d);
    assert!(
        err.contains(&format!("{p}.quant_map")) && err.contains("entry 0"),
        "{err}"
    );
    // Every message below names the file too (the part checks are `Nf4Tensor::from_bnb_parts`').
    let file = d.join("model.safetensors").display().to_string();
    assert!(err.contains(&file), "{err}");

    // absmax codes of the wrong length.
    let d = tmp.path().join("absmax");
    corrupt_bnb(&d, &format!("{p}.absmax"), |b, dt, _| {
        Some((dt, vec![b.len() - 1], b[1..].to_vec()))
    });
    let err = load(&d);
    assert!(
        err.contains(&format!("{p}.absmax")) && err.contains("[128]") && err.contains("[127]"),
        "{err}"
    );
    assert!(
        err.contains(&d.join("model.safetensors").display().to_string()),
        "{err}"
    );

    // A nested_quant_map of the wrong length, and a non-finite nested absmax.
    let d = tmp.path().join("nmap");
    corrupt_bnb(&d, &format!("{p}.nested_quant_map"), |b, dt, _| {
        Some((dt, vec![255], b[4..].to_vec()))
    });
    let err = load(&d);
    assert!(
        err.contains(&format!("{p}.nested_quant_map"))
            && err.contains("[255]")
            && err.contains("[256]")
            && err.contains(&d.join("model.safetensors").display().to_string()),
        "{err}"
    );
    let d = tmp.path().join("nan");
    corrupt_bnb(&d, &format!("{p}.nested_absmax"), |b, dt, s| {
        let mut b = b.to_vec();
        b[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        Some((dt, s.to_vec(), b))
    });
    let err = load(&d);
    assert!(
        err.contains(&format!("{p}.nested_absmax")) && err.contains("NaN"),
        "{err}"
    );

    // Double-quant parts next to a plain F32 absmax: refused, naming the part.
    let d = tmp.path().join("mixed");
    rewrite_bnb(&d, |ts| {
        let i = ts
            .iter()
            .position(|t| t.0 == format!("{p}.absmax"))
            .unwrap();
        let n = ts[i].3.len();
        ts[i] = (
            format!("{p}.absmax"),
            Dtype::F32,
            vec![n],
            1.0f32.to_le_bytes().repeat(n),
        );
    });
    let err = load(&d);
    assert!(
        err.contains(&format!("{p}.nested_absmax")) && err.contains("F32"),
        "{err}"
    );

    // A quant state whose shape disagrees with the config.
    let d = tmp.path().join("shape");
    corrupt_bnb(
        &d,
        &format!("{p}.quant_state.bitsandbytes__nf4"),
        |b, dt, _| {
            let s = String::from_utf8(b.to_vec())
                .unwrap()
                .replace("[128, 64]", "[64, 128]");
            Some((dt, vec![s.len()], s.into_bytes()))
        },
    );
    let err = load(&d);
    assert!(
        err.contains("quant_state")
            && err.contains("[128, 64]")
            && err.contains("[64, 128]")
            && err.contains(&d.join("model.safetensors").display().to_string()),
        "{err}"
    );

    // Truncated packed codes.
    let d = tmp.path().join("packed");
    corrupt_bnb(&d, p, |b, dt, _| {
        Some((dt, vec![b.len() - 2, 1], b[2..].to_vec()))
    });
    let err = load(&d);
    assert!(
        err.contains(p)
            && err.contains("packed")
            && err.contains(&d.join("model.safetensors").display().to_string()),
        "{err}"
    );

    // A missing nested_absmax names itself and the file searched.
    let d = tmp.path().join("nested");
    corrupt_bnb(&d, &format!("{p}.nested_absmax"), |_, _, _| None);
    let err = load(&d);
    assert!(
        err.contains(&format!("{p}.nested_absmax")) && err.contains("model.safetensors"),
        "{err}"
    );

    // FP4 is refused by name.
    let d = tmp.path().join("fp4");
    rewrite_bnb(&d, |ts| {
        ts.retain(|t| t.0 != format!("{p}.quant_state.bitsandbytes__nf4"));
        let blob = b"{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [128, 64]}".to_vec();
        ts.push((
            format!("{p}.quant_state.bitsandbytes__fp4"),
            Dtype::U8,
            vec![blob.len()],
            blob,
        ));
    });
    let err = load(&d);
    assert!(err.contains("FP4") && err.contains(p), "{err}");

    // Every one of these is an error, not a panic, and the intact fixture still loads.
    assert!(load(&bnb_dir()).is_empty());
}
