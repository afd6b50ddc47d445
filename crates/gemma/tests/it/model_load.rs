//! Loading checkpoints: sharded and single files, bf16/f16/f32, NF4 on load, pre-quantized bitsandbytes
//! checkpoints, and the errors bad files must produce (never a panic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_gemma::safetensors_io::{write_safetensors, Dtype, TensorOut, TensorStore};
use afinar_gemma::{
    Batch, Gemma2Config, Gemma2Model, GemmaError, LinearBase, LoadOptions, NormKind, ParamId,
    Quantization, Target,
};
use afinar_kernels::{Absmax, Backend, Cpu, Nf4Tensor, Storage, Tolerance};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/fixtures")
}

fn tiny_a() -> PathBuf {
    fixtures().join("gemma_tiny_a")
}

fn cpu() -> Arc<Cpu> {
    Arc::new(Cpu::new())
}

fn batch() -> Batch {
    let ids: Vec<i32> = (0..16).map(|i| i * 37 % 97 + 2).collect();
    Batch::new(2, 8, ids, vec![-100; 16])
}

/// Copies tiny_a's config and re-writes its tensors into `n` shards (+ index) in dtype `dtype`.
fn write_sharded(dir: &Path, dtype: Dtype, n: usize, drop: Option<&str>) {
    std::fs::copy(tiny_a().join("config.json"), dir.join("config.json")).unwrap();
    let src = TensorStore::open_dir(tiny_a()).unwrap();
    let names: Vec<String> = src.names().iter().map(|s| s.to_string()).collect();
    let mut weight_map = serde_json::Map::new();
    for s in 0..n {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, n);
        let mut outs = Vec::new();
        for name in names.iter().skip(s).step_by(n) {
            let vals = src.read_f32(name).unwrap();
            let shape = src.info(name).unwrap().shape.clone();
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            if Some(name.as_str()) == drop {
                continue;
            }
            let data: Vec<u8> = match dtype {
                Dtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::BF16 => vals
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                    .collect(),
                Dtype::F16 => vals
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
                    .collect(),
                other => panic!("{other:?}"),
            };
            outs.push(TensorOut {
                name: name.clone(),
                dtype,
                shape,
                data: data.into(),
            });
        }
        let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        write_safetensors(&dir.join(&file), &outs, Some(&meta)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn sharded_f32_equals_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path(), Dtype::F32, 3, None);
    let single = Gemma2Model::load(cpu(), tiny_a(), &LoadOptions::default()).unwrap();
    let sharded = Gemma2Model::load(cpu(), tmp.path(), &LoadOptions::default()).unwrap();
    assert_eq!(TensorStore::open_dir(tmp.path()).unwrap().files().len(), 3);
    Tolerance::EXACT.assert_close(
        "logits",
        sharded.logits(&batch()).unwrap(),
        single.logits(&batch()).unwrap(),
    );
}

/// `load_with_config` builds the model from the config it is given (config.json is not read again) and
/// the weights of the directory: with the parsed config.json it is `load`, bit for bit.
#[test]
fn load_with_config_uses_the_given_config() {
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let opts = LoadOptions::default();
    let a = Gemma2Model::load(cpu(), tiny_a(), &opts).unwrap();
    let cfg = Gemma2Config::from_file(tiny_a().join("config.json")).unwrap();
    let b = Gemma2Model::load_with_config(cpu(), cfg.clone(), tiny_a(), &opts).unwrap();
    let want = bits(a.logits(&batch()).unwrap());
    assert_eq!(bits(b.logits(&batch()).unwrap()), want);
    // A config that differs from the file's is the one used.
    let capped = Gemma2Config {
        final_logit_softcapping: Some(0.5),
        ..cfg
    };
    let c = Gemma2Model::load_with_config(cpu(), capped, tiny_a(), &opts).unwrap();
    assert_eq!(c.config.final_logit_softcapping, Some(0.5));
    assert_ne!(bits(c.logits(&batch()).unwrap()), want);
}

#[test]
fn bf16_and_f16_are_widened_exactly() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let tmp = tempfile::tempdir().unwrap();
        write_sharded(tmp.path(), dtype, 2, None);
        let m = Gemma2Model::load(cpu(), tmp.path(), &LoadOptions::default()).unwrap();
        let src = TensorStore::open_dir(tiny_a()).unwrap();
        for name in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.2.post_feedforward_layernorm.weight",
        ] {
            let expected: Vec<f32> = src
                .read_f32(name)
                .unwrap()
                .iter()
                .map(|&v| match dtype {
                    Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
                    _ => half::f16::from_f32(v).to_f32(),
                })
                .collect();
            Tolerance::EXACT.assert_close(name, m.get_tensor(name).unwrap(), expected);
        }
    }
}

#[test]
fn missing_tensor_names_tensor_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = "model.layers.2.mlp.up_proj.weight";
    write_sharded(tmp.path(), Dtype::F32, 2, Some(victim));
    let err = Gemma2Model::<Cpu>::load(cpu(), tmp.path(), &LoadOptions::default())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, GemmaError::MissingTensor { .. }), "{msg}");
    assert!(msg.contains(victim) && msg.contains("model-0000"), "{msg}");

    // A single file without the tensor at all.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_a().join("config.json"), tmp.path().join("config.json")).unwrap();
    let src = TensorStore::open_dir(tiny_a()).unwrap();
    let outs: Vec<TensorOut> = src
        .names()
        .iter()
        .filter(|n| **n != "model.norm.weight")
        .map(|n| {
            TensorOut::f32(
                *n,
                src.info(n).unwrap().shape.clone(),
                &src.read_f32(n).unwrap(),
            )
        })
        .collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &outs, None).unwrap();
    let msg = Gemma2Model::<Cpu>::load(cpu(), tmp.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_a().join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_a().join("config.json")).unwrap())
            .unwrap();
    cfg["intermediate_size"] = serde_json::json!(50);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = Gemma2Model::<Cpu>::load(cpu(), tmp.path(), &LoadOptions::default())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(&err, GemmaError::StoredShapeMismatch { path, .. } if path.ends_with("model.safetensors")),
        "{msg}"
    );
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[50, 32]")
            && msg.contains("[48, 32]")
            && msg.contains("model.safetensors"),
        "{msg}"
    );

    // Sharded: the error names the shard that holds the tensor (not just the directory or the index).
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path(), Dtype::F32, 3, None);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let store = TensorStore::open_dir(tmp.path()).unwrap();
    let shard = store
        .path_of("model.layers.0.mlp.gate_proj.weight")
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let msg = Gemma2Model::<Cpu>::load(cpu(), tmp.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains(&shard),
        "{shard}: {msg}"
    );
}

/// A safetensors file from a header (JSON) and a data region of `data_len` zero bytes.
fn raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn overlapping_holey_or_padded_data_ranges_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let open = |header: &str, data_len: usize| {
        raw_safetensors(&path, header, data_len);
        TensorStore::open_files(std::slice::from_ref(&path))
            .err()
            .map(|e| (matches!(e, GemmaError::Safetensors { .. }), e.to_string()))
    };
    // Two tensors sharing bytes [8, 16): the format gives every tensor its own bytes.
    let (typed, msg) = open(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    )
    .expect("overlap accepted");
    assert!(typed, "{msg}");
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`a`")
            && msg.contains("`b`")
            && msg.contains("overlap"),
        "{msg}"
    );
    // Exact aliasing (same range under two names) is an overlap too.
    let (_, msg) = open(
        r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        8,
    )
    .expect("aliasing accepted");
    assert!(
        msg.contains("`x`") && msg.contains("`y`") && msg.contains("overlap"),
        "{msg}"
    );
    // A hole between two tensors, and bytes after the last one.
    let (_, msg) = open(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
        20,
    )
    .expect("hole accepted");
    assert!(
        msg.contains("[8, 12)") && msg.contains("`a`") && msg.contains("`b`"),
        "{msg}"
    );
    let (_, msg) = open(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        12,
    )
    .expect("trailing bytes accepted");
    assert!(msg.contains("[8, 12)") && msg.contains("`a`"), "{msg}");
    // Tiling in any header order, with a zero-size tensor at a boundary, is fine.
    raw_safetensors(
        &path,
        r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        16,
    );
    let store = TensorStore::open_files(std::slice::from_ref(&path)).unwrap();
    assert_eq!(store.names(), vec!["a", "b", "e"]);
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let good = std::fs::read(tiny_a().join("model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut bad_json = good.clone();
    bad_json[8] = b'#';
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("4 bytes", good[..4].to_vec()),
        ("cut in the header", good[..8 + header_len / 2].to_vec()),
        ("cut in the data", good[..good.len() - 100].to_vec()),
        ("header not JSON", bad_json),
        ("header length too large", huge_header),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = TensorStore::open_files(std::slice::from_ref(&path))
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        let msg = err.to_string();
        assert!(
            matches!(err, GemmaError::Safetensors { .. }),
            "{what}: {msg}"
        );
        assert!(msg.contains("model.safetensors"), "{what}: {msg}");
    }
    // A tensor whose byte size disagrees with its dtype × shape.
    let hdr = br#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#;
    let mut bytes = (hdr.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(hdr);
    bytes.extend_from_slice(&[0u8; 20]);
    std::fs::write(&path, &bytes).unwrap();
    let msg = TensorStore::open_files(std::slice::from_ref(&path))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("`w`") && msg.contains("24"), "{msg}");
    // No checkpoint at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        TensorStore::open_dir(empty.path()),
        Err(GemmaError::Io { .. })
    ));
}

#[test]
fn wrong_dtype_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.safetensors");
    write_safetensors(
        &path,
        &[TensorOut {
            name: "ids".into(),
            dtype: Dtype::I32,
            shape: vec![2],
            data: vec![0u8; 8].into(),
        }],
        None,
    )
    .unwrap();
    let store = TensorStore::open_files(std::slice::from_ref(&path)).unwrap();
    let msg = store.read_f32("ids").unwrap_err().to_string();
    assert!(msg.contains("`ids`") && msg.contains("I32"), "{msg}");
}

/// NF4 on load: the model computes with exactly the dequantized NF4 weights (the dense model given those
/// weights agrees to f32 rounding), and differs from the dense original.
#[test]
fn nf4_on_load_computes_with_dequantized_weights() {
    for double_quant in [false, true] {
        let opts = LoadOptions {
            quantize: Quantization::Nf4 { double_quant },
            ..Default::default()
        };
        let q = Gemma2Model::load(cpu(), tiny_a(), &opts).unwrap();
        let mut dense = Gemma2Model::load(cpu(), tiny_a(), &LoadOptions::default()).unwrap();
        let original = dense.logits(&batch()).unwrap();
        for layer in 0..q.config.num_hidden_layers {
            for t in Target::ALL {
                assert!(q.layers[layer].linear(t).is_nf4());
                let w = q.dense_weight(layer, t).unwrap();
                dense
                    .set_tensor(&ParamId::Weight { layer, target: t }.name(), &w)
                    .unwrap();
            }
        }
        let got = q.logits(&batch()).unwrap();
        Tolerance::F32.assert_close("nf4 logits", got.clone(), dense.logits(&batch()).unwrap());
        assert!(
            Tolerance::F32
                .compare("nf4 vs original", got, original)
                .is_err(),
            "quantization changed nothing"
        );
    }
    // Full fine-tuning needs dense weights.
    let opts = LoadOptions {
        quantize: Quantization::Nf4 { double_quant: true },
        full_finetune: true,
        ..Default::default()
    };
    assert!(Gemma2Model::<Cpu>::load(cpu(), tiny_a(), &opts).is_err());
}

/// A bitsandbytes 4-bit checkpoint saved by transformers (fixture of tests/golden/make_gemma_io.py) loads
/// directly as NF4 (no dequantize-to-disk), each linear holds exactly the stored NF4 tensor, and the model
/// computes with it.
///
/// Parity with transformers + bitsandbytes' own logits for this checkpoint is tested in io_export.rs.
/// (bitsandbytes 0.50.2's CPU `dequantize_4bit` is wrong when a weight's last dimension is below the
/// 64-element block — it applies block 0's absmax to every block — which is why those fixtures use
/// in_features that are multiples of 64.)
#[test]
fn prequantized_bnb_checkpoint_loads_as_nf4() {
    let dir = fixtures().join("gemma_io_bnb");
    let store = TensorStore::open_dir(&dir).unwrap();
    let q = Gemma2Model::load(cpu(), &dir, &LoadOptions::default()).unwrap();
    let mut dense = Gemma2Model::load(
        cpu(),
        fixtures().join("gemma_io_model"),
        &LoadOptions::default(),
    )
    .unwrap();
    for layer in 0..q.config.num_hidden_layers {
        for t in Target::ALL {
            let name = ParamId::Weight { layer, target: t }.name();
            let (o, i) = t.dims(&q.config);
            let stored = afinar_gemma::bnb::read_bnb_nf4(&store, &name, &[o, i])
                .unwrap()
                .tensor;
            assert_eq!(
                q.nf4_weight(layer, t).unwrap().as_ref(),
                Some(&stored),
                "{name}"
            );
            dense
                .set_tensor(&name, &stored.dequantize().unwrap())
                .unwrap();
        }
    }
    Tolerance::F32.assert_close(
        "bnb logits",
        q.logits(&batch()).unwrap(),
        dense.logits(&batch()).unwrap(),
    );
    // Asking for NF4 again on a pre-quantized checkpoint keeps the stored codes.
    let again = Gemma2Model::load(
        cpu(),
        &dir,
        &LoadOptions {
            quantize: Quantization::Nf4 { double_quant: true },
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        again.nf4_weight(0, Target::DownProj).unwrap(),
        q.nf4_weight(0, Target::DownProj).unwrap()
    );
    // Full fine-tuning of a 4-bit checkpoint is refused with the tensor named.
    let msg = Gemma2Model::<Cpu>::load(
        cpu(),
        &dir,
        &LoadOptions {
            full_finetune: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.q_proj.weight"),
        "{msg}"
    );
}

#[test]
fn absurd_lora_rank_is_an_error_not_an_allocation() {
    use afinar_gemma::LoraConfig;
    let cfg = afinar_gemma::Gemma2Config::from_file(tiny_a().join("config.json")).unwrap();
    let (out_f, in_f) = Target::QProj.dims(&cfg);
    let min = out_f.min(in_f);
    for r in [min + 1, 100_000_000_000] {
        let lora = LoraConfig::new(r, 16.0, 0.0, false, &["q_proj"]).unwrap();
        let opts = LoadOptions {
            lora: Some(lora),
            ..LoadOptions::default()
        };
        let err = match Gemma2Model::load(cpu(), tiny_a(), &opts) {
            Ok(_) => panic!("r = {r} was accepted"),
            Err(e) => e,
        };
        assert!(matches!(err, GemmaError::LoraConfig(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("r = {r}")) && msg.contains("q_proj"),
            "{msg}"
        );
    }
    // The largest meaningful rank still loads.
    let lora = LoraConfig::new(min, 16.0, 0.0, false, &["q_proj"]).unwrap();
    let opts = LoadOptions {
        lora: Some(lora),
        ..LoadOptions::default()
    };
    Gemma2Model::load(cpu(), tiny_a(), &opts).unwrap();
}

// ---- The streamed load against the f32 host path ------------------------------------------------

/// Every field of two NF4 tensors, floats by bits.
fn assert_nf4_bits(got: &Nf4Tensor, want: &Nf4Tensor, what: &str) {
    let fb = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert!(got.packed == want.packed, "{what}: packed codes differ");
    match (&got.absmax, &want.absmax) {
        (Absmax::Plain(a), Absmax::Plain(b)) => assert!(fb(a) == fb(b), "{what}: absmax differs"),
        (
            Absmax::Nested {
                codes: c1,
                nested_absmax: n1,
                offset: o1,
                code8: m1,
            },
            Absmax::Nested {
                codes: c2,
                nested_absmax: n2,
                offset: o2,
                code8: m2,
            },
        ) => {
            assert!(c1 == c2, "{what}: absmax codes differ");
            assert!(fb(n1) == fb(n2), "{what}: nested absmax differs");
            assert_eq!(o1.to_bits(), o2.to_bits(), "{what}: offset");
            assert!(fb(&m1[..]) == fb(&m2[..]), "{what}: code8 differs");
        }
        _ => panic!("{what}: plain vs nested absmax"),
    }
}

/// Checks every base tensor of `m` against the path the loader took before streaming: the tensor read
/// as f32 on the host (`read_f32_shaped`), then `from_host_for` (dense) or `nf4::quantize` +
/// `nf4_from_host` (NF4). Bit for bit.
fn assert_equals_host_path<B: Backend>(
    m: &Gemma2Model<B>,
    store: &TensorStore,
    quant: Quantization,
) {
    let b = &**m.backend();
    let cfg = &m.config;
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let dense = |name: &str, shape: &[usize], got: &B::Buf| {
        let host = store.read_f32_shaped(name, shape).unwrap();
        let want = b
            .to_host(&b.from_host_for(&host, Storage::Activation).unwrap())
            .unwrap();
        assert!(
            bits(b.to_host(got).unwrap()) == bits(want),
            "{name} differs"
        );
    };
    let h = cfg.hidden_size;
    dense(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, h],
        &m.embed_tokens,
    );
    dense("model.norm.weight", &[h], &m.norm);
    for (li, layer) in m.layers.iter().enumerate() {
        for (kind, buf) in NormKind::ALL.iter().zip(&layer.norms) {
            dense(
                &ParamId::Norm {
                    layer: li,
                    kind: *kind,
                }
                .name(),
                &[h],
                buf,
            );
        }
        for lin in &layer.linears {
            let name = ParamId::Weight {
                layer: li,
                target: lin.target,
            }
            .name();
            let shape = [lin.out_features, lin.in_features];
            match (&lin.base, quant) {
                (LinearBase::Dense(buf), Quantization::None) => dense(&name, &shape, buf),
                (LinearBase::Nf4(q), Quantization::Nf4 { double_quant }) => {
                    let host = store.read_f32_shaped(&name, &shape).unwrap();
                    let want = afinar_kernels::nf4::quantize(&host, &shape, double_quant).unwrap();
                    assert_nf4_bits(&b.nf4_to_host(q).unwrap(), &want, &name);
                }
                _ => panic!("{name}: not stored as {quant:?}"),
            }
        }
    }
}

/// The streamed load (stored bytes to the backend, NF4 quantized from the bytes, pages released) gives
/// bit for bit the parameters of the f32 host path, for f32, bf16 and f16 shards, dense and NF4.
#[test]
fn streamed_load_equals_the_f32_host_path() {
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let tmp = tempfile::tempdir().unwrap();
        write_sharded(tmp.path(), dtype, 3, None);
        let store = TensorStore::open_dir(tmp.path()).unwrap();
        for quantize in [
            Quantization::None,
            Quantization::Nf4 {
                double_quant: false,
            },
            Quantization::Nf4 { double_quant: true },
        ] {
            let opts = LoadOptions {
                quantize,
                progress: true, // the plain progress lines and summary (stderr is not a terminal here)
                ..Default::default()
            };
            let m = Gemma2Model::load(cpu(), tmp.path(), &opts).unwrap();
            assert_equals_host_path(&m, &store, quantize);
        }
    }
}

/// The CUDA half: the model quantized on the device from bf16 shards equals the host quantizer's, and
/// its dense tensors equal an upload of the f32 values. Skips without a driver.
#[cfg(feature = "cuda")]
#[test]
fn streamed_load_on_cuda_equals_the_host_path() {
    let Some(cuda) = afinar_kernels::cuda::Cuda::try_new().unwrap() else {
        eprintln!("skipped: no CUDA driver");
        return;
    };
    let cuda = Arc::new(cuda);
    for dtype in [Dtype::BF16, Dtype::F32] {
        let tmp = tempfile::tempdir().unwrap();
        write_sharded(tmp.path(), dtype, 2, None);
        let store = TensorStore::open_dir(tmp.path()).unwrap();
        for quantize in [
            Quantization::None,
            Quantization::Nf4 {
                double_quant: false,
            },
            Quantization::Nf4 { double_quant: true },
        ] {
            let opts = LoadOptions {
                quantize,
                ..Default::default()
            };
            let m = Gemma2Model::load(cuda.clone(), tmp.path(), &opts).unwrap();
            assert_equals_host_path(&m, &store, quantize);
        }
    }
}

/// Bad input through the streamed load keeps its errors: a linear stored as I32 (dtype named, with
/// the tensor and file), and a shard cut short (the file named), for dense and NF4 loads.
#[test]
fn streamed_load_bad_input_errors() {
    let victim = "model.layers.1.self_attn.k_proj.weight";
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_a().join("config.json"), tmp.path().join("config.json")).unwrap();
    let src = TensorStore::open_dir(tiny_a()).unwrap();
    let outs: Vec<TensorOut> = src
        .names()
        .iter()
        .map(|n| {
            let mut t = TensorOut::f32(
                *n,
                src.info(n).unwrap().shape.clone(),
                &src.read_f32(n).unwrap(),
            );
            if *n == victim {
                t.dtype = Dtype::I32; // same byte size as F32
            }
            t
        })
        .collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &outs, None).unwrap();
    for quantize in [Quantization::None, Quantization::Nf4 { double_quant: true }] {
        let opts = LoadOptions {
            quantize,
            ..Default::default()
        };
        let err = Gemma2Model::load(cpu(), tmp.path(), &opts).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, GemmaError::Dtype { .. }), "{msg}");
        assert!(
            msg.contains(victim) && msg.contains("I32") && msg.contains("model.safetensors"),
            "{msg}"
        );
    }
    // A shard cut in its data section.
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path(), Dtype::BF16, 2, None);
    let shard = tmp.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 64]).unwrap();
    for quantize in [Quantization::None, Quantization::Nf4 { double_quant: true }] {
        let opts = LoadOptions {
            quantize,
            ..Default::default()
        };
        let err = Gemma2Model::load(cpu(), tmp.path(), &opts).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, GemmaError::Safetensors { .. }), "{msg}");
        assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
    }
}
