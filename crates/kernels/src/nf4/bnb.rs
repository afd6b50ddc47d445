//! The bitsandbytes checkpoint form of an NF4 tensor: the `quant_state` JSON blob and reading the parts
//! back (`P.weight`, `.absmax`, `.quant_map`, `.nested_*`).

use super::quantize::checked_numel;
use super::{Absmax, Nf4Tensor, BLOCK, NESTED_BLOCK, NF4_CODE};
use crate::error::{check_len, ensure};
use crate::KernelError;

/// Python's `repr(float)` (shortest round-trip digits; scientific when the decimal exponent is < −4 or
/// ≥ 16, with a signed two-digit exponent; otherwise fixed with at least one fractional digit), as
/// `json.dumps` prints a float (non-finite values as `NaN`, `Infinity`, `-Infinity`).
pub fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits too: "d.ddde-5".
    let e = format!("{:e}", v.abs());
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if v < 0.0 { "-" } else { "" };
    let nd = digits.len() as i32;
    if !(-4..16).contains(&exp) {
        let frac = if nd > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let es = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{}{frac}e{es}{:02}", &digits[..1], exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
    } else if point >= nd {
        format!("{sign}{digits}{}.0", "0".repeat((point - nd) as usize))
    } else {
        format!(
            "{sign}{}.{}",
            &digits[..point as usize],
            &digits[point as usize..]
        )
    }
}

/// The parts of a bitsandbytes 4-bit weight as read from a checkpoint (`P.weight.absmax` is U8 when the
/// absmax is double-quantized, F32 otherwise).
#[derive(Clone, Copy, Debug)]
pub enum BnbAbsmax<'a> {
    U8(&'a [u8]),
    F32(&'a [f32]),
}

impl Nf4Tensor {
    /// The exact `P.weight.quant_state.bitsandbytes__nf4` JSON blob bitsandbytes writes
    /// (`QuantState.as_dict(packed=True)`, dict order, `json.dumps` default separators), e.g.
    /// `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 896], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.031807661056518555}`.
    /// `dtype` is the torch dtype name without `torch.` (`bfloat16`, `float16`, `float32`); the nested
    /// keys appear only for a double-quantized tensor, `nested_offset` printed as Python's repr of the
    /// f32 offset widened to a double.
    pub fn quant_state_json(&self, dtype: &str) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        // dtype names are plain identifiers; escape defensively so the blob is always valid JSON.
        let dtype_json: String = dtype
            .chars()
            .flat_map(|c| match c {
                '"' => vec!['\\', '"'],
                '\\' => vec!['\\', '\\'],
                c => vec![c],
            })
            .collect();
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {BLOCK}, \"dtype\": \"{dtype_json}\", \"shape\": [{}]",
            shape.join(", ")
        );
        if let Absmax::Nested { offset, .. } = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            ));
        }
        s.push('}');
        s
    }

    /// Builds a tensor from the parts of a bitsandbytes checkpoint, validating them:
    /// `packed` (`P.weight`, ceil(numel/2) bytes), `absmax` (`P.weight.absmax`: U8 codes when nested,
    /// F32 per block otherwise; ceil(numel/64) entries), `quant_map` (`P.weight.quant_map`, must equal
    /// [`NF4_CODE`] bit for bit — an FP4 weight is refused), and for a nested absmax
    /// `nested_absmax` (ceil(blocks/256) f32), `nested_quant_map` (256 f32) and `offset` (the JSON
    /// `nested_offset` rounded to f32, as bitsandbytes does when loading). Errors name the part at fault.
    pub fn from_bnb_parts(
        shape: &[usize],
        packed: &[u8],
        absmax: BnbAbsmax<'_>,
        quant_map: &[f32],
        nested_absmax: Option<&[f32]>,
        nested_quant_map: Option<&[f32]>,
        offset: Option<f32>,
    ) -> crate::Result<Nf4Tensor> {
        const OP: &str = "nf4_from_bnb";
        let numel = checked_numel(OP, shape)?;
        let blocks = numel.div_ceil(BLOCK);
        let sh = || format!("{shape:?}");
        check_len(OP, "weight (packed)", packed.len(), numel.div_ceil(2), sh)?;
        check_len(
            OP,
            "weight.quant_map",
            quant_map.len(),
            NF4_CODE.len(),
            || "[16]".into(),
        )?;
        if let Some(i) = (0..16).find(|&i| quant_map[i].to_bits() != NF4_CODE[i].to_bits()) {
            return Err(KernelError::Invalid {
                op: OP,
                arg: "weight.quant_map",
                msg: format!(
                    "entry {i} is {} but NF4 has {} (is this an fp4 weight? only nf4 is supported)",
                    quant_map[i], NF4_CODE[i]
                ),
            });
        }
        let absmax = match absmax {
            BnbAbsmax::F32(a) => {
                ensure(
                    OP,
                    "weight.nested_absmax",
                    nested_absmax.is_none() && nested_quant_map.is_none() && offset.is_none(),
                    || "nested parts given but weight.absmax is F32 (not double-quantized)".into(),
                )?;
                check_len(OP, "weight.absmax", a.len(), blocks, || {
                    format!("[blocks={blocks}] of {shape:?}")
                })?;
                if let Some(i) = a.iter().position(|v| !v.is_finite()) {
                    return Err(KernelError::Invalid {
                        op: OP,
                        arg: "weight.absmax",
                        msg: format!("entry {i} is {}", a[i]),
                    });
                }
                Absmax::Plain(a.to_vec())
            }
            BnbAbsmax::U8(codes) => {
                check_len(OP, "weight.absmax", codes.len(), blocks, || {
                    format!("[blocks={blocks}] of {shape:?}")
                })?;
                let missing = |arg: &'static str| {
                    KernelError::Invalid {
                    op: OP,
                    arg,
                    msg: "missing: weight.absmax is U8 (double-quantized), which needs nested_absmax, nested_quant_map and nested_offset".into(),
                }
                };
                let nested = nested_absmax.ok_or_else(|| missing("weight.nested_absmax"))?;
                let map = nested_quant_map.ok_or_else(|| missing("weight.nested_quant_map"))?;
                let offset = offset.ok_or_else(|| missing("nested_offset"))?;
                let nb = blocks.div_ceil(NESTED_BLOCK);
                check_len(OP, "weight.nested_absmax", nested.len(), nb, || {
                    format!("[ceil({blocks}/256)={nb}]")
                })?;
                check_len(OP, "weight.nested_quant_map", map.len(), 256, || {
                    "[256]".into()
                })?;
                if let Some(i) = nested.iter().position(|v| !v.is_finite()) {
                    return Err(KernelError::Invalid {
                        op: OP,
                        arg: "weight.nested_absmax",
                        msg: format!("entry {i} is {}", nested[i]),
                    });
                }
                if let Some(i) = map.iter().position(|v| !v.is_finite()) {
                    return Err(KernelError::Invalid {
                        op: OP,
                        arg: "weight.nested_quant_map",
                        msg: format!("entry {i} is {}", map[i]),
                    });
                }
                ensure(OP, "nested_offset", offset.is_finite(), || {
                    format!("{offset} is not finite")
                })?;
                let mut code8 = Box::new([0.0f32; 256]);
                code8.copy_from_slice(map);
                Absmax::Nested {
                    codes: codes.to_vec(),
                    nested_absmax: nested.to_vec(),
                    offset,
                    code8,
                }
            }
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            packed: packed.to_vec(),
            absmax,
        })
    }
}
