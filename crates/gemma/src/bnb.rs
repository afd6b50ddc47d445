//! bitsandbytes 4-bit checkpoints: reading pre-quantized weights into an [`Nf4Tensor`] and writing
//! the same layout back.
//!
//! A quantized linear `P` (e.g. `model.layers.0.self_attn.q_proj`) is stored by HF `save_pretrained`
//! of a bitsandbytes 4-bit model as
//!
//! ```text
//! P.weight                                  U8  [ceil(N·K/2), 1]   packed NF4, element 2j in the HIGH nibble
//! P.weight.absmax                           U8  [ceil(N·K/64)]      (F32 when not double-quantized)
//! P.weight.quant_map                        F32 [16]                the NF4 code table
//! P.weight.nested_absmax                    F32 [ceil(blocks/256)]  (double quant only)
//! P.weight.nested_quant_map                 F32 [256]               (double quant only) the dynamic 8-bit map
//! P.weight.quant_state.bitsandbytes__nf4    U8  [len(json)]         json.dumps of the non-tensor state
//! ```
//!
//! The JSON is `{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [N, K],
//! "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.77…}` (the last three only with
//! double quant), in that key order, with Python's default separators and `repr` for the offset.
//!
//! `dtype` is the dtype the weight is dequantized to. bitsandbytes computes code·absmax in f32 and then
//! rounds to that dtype; [`BnbWeight::dtype`] is returned so a caller can round the same way (with
//! "float32" there is nothing to round, which is what the golden tests use).
//!
//! With `bnb_4bit_quant_storage` other than uint8 the packed bytes are stored under another dtype
//! (e.g. BF16 [n/4, 1]); the bytes are the same, so the reader only checks the byte count.

use std::collections::BTreeMap;
use std::path::Path;

use afinar_kernels::nf4::{Absmax, BnbAbsmax, Nf4Tensor, BLOCK, NESTED_BLOCK, NF4_CODE};
use afinar_kernels::KernelError;
use serde_json::Value;

use crate::error::{GemmaError, Result};
use crate::safetensors_io::{decode_f32, Dtype, TensorOut, TensorStore};

/// Suffix of the quant-state JSON blob of an NF4 weight.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
/// Suffix of the quant-state JSON blob of an FP4 weight (recognised only to refuse it clearly).
pub const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";

/// The non-tensor part of a bitsandbytes `QuantState` (the JSON blob).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantStateJson {
    /// "nf4" (the only type read here).
    pub quant_type: String,
    /// 64 for every HF checkpoint.
    pub blocksize: usize,
    /// Dtype of the dequantized weight ("float32", "bfloat16", "float16").
    pub dtype: String,
    /// Logical shape of the dense weight, [out, in].
    pub shape: Vec<usize>,
    /// Double quantization: (nested_blocksize, nested_dtype, nested_offset).
    pub nested: Option<(usize, String, f64)>,
}

/// A pre-quantized weight read from a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbWeight {
    pub tensor: Nf4Tensor,
    /// `dtype` of the quant state: what bitsandbytes rounds the dequantized weight to.
    pub dtype: String,
}

/// An error about part `tensor` of a bitsandbytes weight, naming the file that holds it (or, for a part
/// that is absent, the file of `fallback`, the weight's own tensor).
fn bad_in(store: &TensorStore, tensor: &str, fallback: &str, msg: impl Into<String>) -> GemmaError {
    let path = store
        .path_of(tensor)
        .or_else(|| store.path_of(fallback))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| store.files().first().cloned().unwrap_or_default());
    GemmaError::Bnb {
        tensor: tensor.to_string(),
        path,
        msg: msg.into(),
    }
}

/// An error about a tensor that is not (yet) tied to a store, e.g. while parsing a quant-state blob.
fn bad(name: &str, msg: impl Into<String>) -> GemmaError {
    GemmaError::Invalid(format!(
        "bitsandbytes 4-bit tensor `{name}`: {}",
        msg.into()
    ))
}

/// Whether `weight_name` (e.g. `model.layers.0.mlp.up_proj.weight`) is stored as a bitsandbytes 4-bit
/// weight in `store` (its quant-state blob or its absmax is present).
pub fn is_bnb_4bit(store: &TensorStore, weight_name: &str) -> bool {
    store.contains(&format!("{weight_name}.{QUANT_STATE_NF4}"))
        || store.contains(&format!("{weight_name}.{QUANT_STATE_FP4}"))
        || store.contains(&format!("{weight_name}.absmax"))
}

/// Parses the quant-state JSON blob of tensor `name` (the blob's own tensor name, for errors).
pub fn parse_quant_state(name: &str, bytes: &[u8]) -> Result<QuantStateJson> {
    quant_state_from_json(bytes).map_err(|msg| bad(name, msg))
}

/// `parse_quant_state` with the reason as a plain message (the caller names the tensor and file).
fn quant_state_from_json(bytes: &[u8]) -> std::result::Result<QuantStateJson, String> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("the quant state is not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "the quant state is not a JSON object".to_string())?;
    let str_key = |k: &str| -> std::result::Result<String, String> {
        obj.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("quant state key `{k}` missing or not a string"))
    };
    let usize_key = |k: &str| -> std::result::Result<usize, String> {
        obj.get(k)
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| format!("quant state key `{k}` missing or not a non-negative integer"))
    };
    let quant_type = str_key("quant_type")?;
    let blocksize = usize_key("blocksize")?;
    let dtype = str_key("dtype")?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| "quant state key `shape` missing or not a list".to_string())?
        .iter()
        .map(|d| {
            d.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| format!("bad dimension {d} in `shape`"))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let nested = if obj.contains_key("nested_offset") || obj.contains_key("nested_blocksize") {
        let off = obj
            .get("nested_offset")
            .and_then(Value::as_f64)
            .ok_or_else(|| "quant state key `nested_offset` missing or not a number".to_string())?;
        Some((
            usize_key("nested_blocksize")?,
            str_key("nested_dtype")?,
            off,
        ))
    } else {
        None
    };
    Ok(QuantStateJson {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    })
}

/// The values of an F32 part (`.quant_map`, `.nested_absmax`, ...), any length: lengths are checked by
/// `Nf4Tensor::from_bnb_parts`. The parts are small, so they are copied (no mmap alignment is assumed).
fn read_f32_part(store: &TensorStore, name: &str, weight_name: &str) -> Result<Vec<f32>> {
    let (bytes, info) = store.raw(name)?;
    if info.dtype != Dtype::F32 {
        return Err(bad_in(
            store,
            name,
            weight_name,
            format!(
                "dtype {} where bitsandbytes stores F32",
                info.dtype.as_str()
            ),
        ));
    }
    decode_f32(bytes, Dtype::F32)
        .ok_or_else(|| bad_in(store, name, weight_name, "undecodable F32 data"))
}

/// The checkpoint tensor that argument `arg` of `Nf4Tensor::from_bnb_parts` was read from: `weight
/// (packed)` is the weight itself, `weight.<part>` is `<weight_name>.<part>`, and the JSON-only values
/// (`nested_offset`, `shape`) live in the quant-state blob `qs_name`.
fn part_tensor(arg: &str, weight_name: &str, qs_name: &str) -> String {
    if arg.starts_with("weight (") || arg == "weight" {
        weight_name.to_string()
    } else if let Some(part) = arg.strip_prefix("weight.") {
        format!("{weight_name}.{part}")
    } else {
        qs_name.to_string()
    }
}

/// Maps a validation error of `Nf4Tensor::from_bnb_parts` onto the checkpoint: the full tensor name and
/// its file, with the stored shape next to the count the quant-state shape needs.
fn map_kernel_error(
    store: &TensorStore,
    weight_name: &str,
    qs_name: &str,
    qs_shape: &[usize],
    e: KernelError,
) -> GemmaError {
    match e {
        KernelError::Shape {
            arg,
            shape,
            expected,
            found,
            ..
        } => {
            let tensor = part_tensor(arg, weight_name, qs_name);
            let stored = store
                .info(&tensor)
                .map(|i| format!("{} {:?}", i.dtype.as_str(), i.shape))
                .unwrap_or_else(|_| "absent".into());
            let unit = if tensor == weight_name {
                "bytes of packed codes"
            } else {
                "entries"
            };
            // Fixed-size parts (quant_map [16], nested_quant_map [256]) do not depend on the shape.
            let need = if shape == format!("[{expected}]") {
                format!("bitsandbytes stores [{expected}]")
            } else {
                format!("the quant-state shape {qs_shape:?} needs [{expected}] ({shape})")
            };
            bad_in(
                store,
                &tensor,
                weight_name,
                format!("{found} {unit} (stored as {stored}) but {need}"),
            )
        }
        KernelError::Invalid { arg, msg, .. } => {
            let tensor = part_tensor(arg, weight_name, qs_name);
            let what = if tensor == qs_name {
                format!("`{arg}`: {msg}")
            } else {
                msg
            };
            bad_in(store, &tensor, weight_name, what)
        }
        other => GemmaError::Kernel(other),
    }
}

/// Reads the pre-quantized bitsandbytes 4-bit weight `weight_name` (e.g.
/// `model.layers.3.self_attn.o_proj.weight`) into an [`Nf4Tensor`]. The quant-state JSON is checked here
/// (type, block sizes, shape = `expected_shape` ([out, in] from the model config)); the tensor parts
/// (packed length, quant_map = the NF4 code, absmax / nested lengths, finite values, offset) are checked
/// by `Nf4Tensor::from_bnb_parts`, whose errors are mapped onto the checkpoint tensor and file at fault.
/// FP4 checkpoints and block sizes other than 64 (and nested 256) are refused: they are not the QLoRA
/// layout and the kernels do not implement them.
pub fn read_bnb_nf4(
    store: &TensorStore,
    weight_name: &str,
    expected_shape: &[usize],
) -> Result<BnbWeight> {
    let fp4 = format!("{weight_name}.{QUANT_STATE_FP4}");
    if store.contains(&fp4) {
        return Err(GemmaError::NotSupported {
            what: format!("`{fp4}`: bitsandbytes FP4 weights"),
            hint: "re-quantize with bnb_4bit_quant_type=\"nf4\" (QLoRA's format)".into(),
        });
    }
    let qs_name = format!("{weight_name}.{QUANT_STATE_NF4}");
    let (qs_bytes, _) = store.raw(&qs_name)?;
    let qs =
        quant_state_from_json(qs_bytes).map_err(|m| bad_in(store, &qs_name, weight_name, m))?;
    if qs.quant_type != "nf4" {
        return Err(GemmaError::NotSupported {
            what: format!("`{qs_name}`: quant_type {:?}", qs.quant_type),
            hint: "only NF4 is supported".into(),
        });
    }
    if qs.blocksize != BLOCK {
        return Err(GemmaError::NotSupported {
            what: format!("`{qs_name}`: blocksize {}", qs.blocksize),
            hint: format!("only blocksize {BLOCK} (the HF default) is supported"),
        });
    }
    if qs.shape != expected_shape {
        return Err(GemmaError::StoredShapeMismatch {
            path: store
                .path_of(&qs_name)
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            name: qs_name,
            expected: expected_shape.to_vec(),
            found: qs.shape,
        });
    }
    if let Some((nb, ndtype, _)) = &qs.nested {
        if *nb != NESTED_BLOCK {
            return Err(GemmaError::NotSupported {
                what: format!("`{qs_name}`: nested_blocksize {nb}"),
                hint: format!("bitsandbytes always uses {NESTED_BLOCK}"),
            });
        }
        if ndtype != "float32" {
            return Err(bad_in(
                store,
                &qs_name,
                weight_name,
                format!("nested_dtype {ndtype:?}, expected \"float32\""),
            ));
        }
    }

    // Packed codes: any storage dtype (bnb_4bit_quant_storage), the bytes are what counts.
    let (packed, _) = store.raw(weight_name)?;
    let quant_map = read_f32_part(store, &format!("{weight_name}.quant_map"), weight_name)?;
    let abs_name = format!("{weight_name}.absmax");
    let (abytes, ainfo) = store.raw(&abs_name)?;
    let nested_name = format!("{weight_name}.nested_absmax");
    let nmap_name = format!("{weight_name}.nested_quant_map");
    // The absmax dtype says whether the weight is double-quantized (U8 codes) or not (F32). The nested
    // parts are read when the checkpoint has them, so that `from_bnb_parts` can refuse a mix (nested parts
    // with an F32 absmax, or U8 codes without them).
    let read_opt = |name: &str| -> Result<Option<Vec<f32>>> {
        if store.contains(name) || ainfo.dtype == Dtype::U8 {
            read_f32_part(store, name, weight_name).map(Some)
        } else {
            Ok(None)
        }
    };
    let nested_absmax = read_opt(&nested_name)?;
    let nested_quant_map = read_opt(&nmap_name)?;
    // The offset is a torch float32 scalar printed as a Python double: the cast back is exact.
    let offset = qs.nested.as_ref().map(|(_, _, off)| *off as f32);
    let absmax_f32;
    let absmax = match ainfo.dtype {
        Dtype::U8 => BnbAbsmax::U8(abytes),
        Dtype::F32 => {
            absmax_f32 = read_f32_part(store, &abs_name, weight_name)?;
            BnbAbsmax::F32(&absmax_f32)
        }
        other => {
            return Err(bad_in(
                store,
                &abs_name,
                weight_name,
                format!(
                    "dtype {} where bitsandbytes stores F32 (or U8 codes when double-quantized)",
                    other.as_str()
                ),
            ))
        }
    };
    let tensor = Nf4Tensor::from_bnb_parts(
        &qs.shape,
        packed,
        absmax,
        &quant_map,
        nested_absmax.as_deref(),
        nested_quant_map.as_deref(),
        offset,
    )
    .map_err(|e| map_kernel_error(store, weight_name, &qs_name, &qs.shape, e))?;
    Ok(BnbWeight {
        tensor,
        dtype: qs.dtype,
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The tensors that store NF4 weight `weight_name` in a bitsandbytes checkpoint (see the module docs),
/// in the order bitsandbytes' state dict lists them.
pub fn bnb_tensors(
    weight_name: &str,
    t: &Nf4Tensor,
    dtype: &str,
) -> Result<Vec<TensorOut<'static>>> {
    let numel = t.numel();
    if t.packed.len() != numel.div_ceil(2) {
        return Err(bad(
            weight_name,
            format!("{} packed bytes for shape {:?}", t.packed.len(), t.shape),
        ));
    }
    let u8t = |name: String, shape: Vec<usize>, data: Vec<u8>| TensorOut {
        name,
        dtype: Dtype::U8,
        shape,
        data: data.into(),
    };
    let f32t = |name: String, v: &[f32]| TensorOut {
        name,
        dtype: Dtype::F32,
        shape: vec![v.len()],
        data: f32_bytes(v).into(),
    };
    let mut out = vec![u8t(
        weight_name.to_string(),
        vec![t.packed.len(), 1],
        t.packed.clone(),
    )];
    match &t.absmax {
        Absmax::Plain(a) => {
            out.push(f32t(format!("{weight_name}.absmax"), a));
            out.push(f32t(format!("{weight_name}.quant_map"), &NF4_CODE));
        }
        Absmax::Nested {
            codes,
            nested_absmax,
            code8,
            ..
        } => {
            out.push(u8t(
                format!("{weight_name}.absmax"),
                vec![codes.len()],
                codes.clone(),
            ));
            out.push(f32t(format!("{weight_name}.quant_map"), &NF4_CODE));
            out.push(f32t(format!("{weight_name}.nested_absmax"), nested_absmax));
            out.push(f32t(format!("{weight_name}.nested_quant_map"), &code8[..]));
        }
    }
    let json = t.quant_state_json(dtype).into_bytes();
    out.push(u8t(
        format!("{weight_name}.{QUANT_STATE_NF4}"),
        vec![json.len()],
        json,
    ));
    Ok(out)
}

/// The `quantization_config` that transformers writes into config.json for an NF4 checkpoint
/// (keys sorted as `to_json_string` does). `compute_dtype` is e.g. "bfloat16" or "float32".
pub fn quantization_config_json(compute_dtype: &str, double_quant: bool) -> Value {
    let mut m = BTreeMap::new();
    m.insert("_load_in_4bit", Value::Bool(true));
    m.insert("_load_in_8bit", Value::Bool(false));
    m.insert(
        "bnb_4bit_compute_dtype",
        Value::String(compute_dtype.to_string()),
    );
    m.insert("bnb_4bit_quant_storage", Value::String("uint8".into()));
    m.insert("bnb_4bit_quant_type", Value::String("nf4".into()));
    m.insert("bnb_4bit_use_double_quant", Value::Bool(double_quant));
    m.insert("llm_int8_enable_fp32_cpu_offload", Value::Bool(false));
    m.insert("llm_int8_has_fp16_weight", Value::Bool(false));
    m.insert("llm_int8_skip_modules", Value::Null);
    m.insert("llm_int8_threshold", serde_json::json!(6.0));
    m.insert("load_in_4bit", Value::Bool(true));
    m.insert("load_in_8bit", Value::Bool(false));
    m.insert("quant_method", Value::String("bitsandbytes".into()));
    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The offset literal is Python's repr of an f32 widened to f64, as checkpoints print it.
    #[allow(clippy::excessive_precision)]
    fn quant_state_json_round_trips() {
        let t = Nf4Tensor {
            shape: vec![48, 32],
            packed: vec![0; 768],
            absmax: Absmax::Nested {
                codes: vec![0; 24],
                nested_absmax: vec![1.0],
                offset: 0.7723649144172668,
                code8: Box::new([0.0; 256]),
            },
        };
        let s = t.quant_state_json("float32");
        assert_eq!(
            s,
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [48, 32], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.7723649144172668}"
        );
        let q = parse_quant_state("x", s.as_bytes()).unwrap();
        assert_eq!(q.shape, vec![48, 32]);
        assert_eq!(
            q.nested,
            Some((256, "float32".to_string(), 0.7723649144172668f32 as f64))
        );
        assert!(parse_quant_state("blob", b"{\"quant_type\": 4}")
            .unwrap_err()
            .to_string()
            .contains("`blob`"));
    }
}
