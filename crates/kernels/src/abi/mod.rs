//! Every CUDA kernel of `kernels/*.cu`, declared once: its file, its name and its parameter list.
//!
//! The [`kernels!`] table below is the only place a kernel's parameters are written on the Rust side.
//! With the `cuda` feature it generates one typed launch method per kernel on `Cuda` (e.g.
//! `cu.rmsnorm_fwd_k(geometry, x, w, y, rstd, h, eps)`), so rustc checks every call site's argument
//! count and types; the test `every_declaration_matches_its_cu_signature` checks every declaration
//! against the `extern "C" __global__` parameter list parsed from the .cu text (parse.rs), and that every
//! kernel in the sources is declared. The table and the test compile without the `cuda` feature.
//!
//! Parameter kinds (the ABI of kernels/README.md):
//! - `buf`: a dtype-tagged buffer, two C parameters `const void* x, int xdt`: the pointer, then the
//!   tag (`DT_F32 = 0`, `DT_BF16 = 1`, `DT_F16 = 2`). The launch method takes anything that converts
//!   into a `BufArg` (`&CudaBuf`, `BufArg::at(buf, offset)`, `None` / `BufArg::Null` for an unused
//!   optional buffer: a null pointer with tag 0).
//! - `i32s`, `u8s`, `f32s`, `f64s`: an `int*`, `unsigned char*` (`u8*`), `float*`, `double*` (a
//!   `PtrArg`: a device slice, a slice at an offset, or null).
//! - `i32`, `i64`, `f32`: an `int`, a `long long` (`i64`), a `float`.
//!
//! Each Rust parameter carries the name of its C parameter (the pointer's, for a `buf`), and the test
//! compares names too, so two parameters of the same kind cannot be swapped in the declaration.
//! A group entry declares several kernels with one parameter list (the attention kernels specialized
//! per head dim, the NF4 GEMV and GEMM that take the same arguments); its launch method takes the
//! kernel's name first and refuses a name outside the group.

#[cfg(test)]
mod parse;

/// `kernels/common.cuh`, prepended to every kernel file when it is compiled.
pub(crate) const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// (file name, source) of every kernel family.
pub(crate) const SOURCES: &[(&str, &str)] = &[
    ("adamw.cu", include_str!("../../../../kernels/adamw.cu")),
    (
        "attention.cu",
        include_str!("../../../../kernels/attention.cu"),
    ),
    (
        "attention_flash.cu",
        include_str!("../../../../kernels/attention_flash.cu"),
    ),
    (
        "cross_entropy.cu",
        include_str!("../../../../kernels/cross_entropy.cu"),
    ),
    ("dropout.cu", include_str!("../../../../kernels/dropout.cu")),
    (
        "elementwise.cu",
        include_str!("../../../../kernels/elementwise.cu"),
    ),
    (
        "embedding.cu",
        include_str!("../../../../kernels/embedding.cu"),
    ),
    ("geglu.cu", include_str!("../../../../kernels/geglu.cu")),
    ("gemm.cu", include_str!("../../../../kernels/gemm.cu")),
    ("lora.cu", include_str!("../../../../kernels/lora.cu")),
    (
        "nf4_dequant.cu",
        include_str!("../../../../kernels/nf4_dequant.cu"),
    ),
    (
        "nf4_gemm.cu",
        include_str!("../../../../kernels/nf4_gemm.cu"),
    ),
    (
        "nf4_gemv.cu",
        include_str!("../../../../kernels/nf4_gemv.cu"),
    ),
    (
        "nf4_quant.cu",
        include_str!("../../../../kernels/nf4_quant.cu"),
    ),
    ("reduce.cu", include_str!("../../../../kernels/reduce.cu")),
    ("rmsnorm.cu", include_str!("../../../../kernels/rmsnorm.cu")),
    ("rope.cu", include_str!("../../../../kernels/rope.cu")),
    ("softcap.cu", include_str!("../../../../kernels/softcap.cu")),
];

/// The kind of one declared parameter (see the module docs).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    Buf,
    I32Ptr,
    U8Ptr,
    F32Ptr,
    F64Ptr,
    I32,
    I64,
    F32,
}

/// One declaration of the table: the launch method's name, the (file, kernel) pairs it launches and
/// their common parameter list.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct KernelDecl {
    pub(crate) method: &'static str,
    pub(crate) kernels: &'static [(&'static str, &'static str)],
    pub(crate) params: &'static [(&'static str, Param)],
}

#[cfg(test)]
macro_rules! param_kind {
    (buf) => {
        Param::Buf
    };
    (i32s) => {
        Param::I32Ptr
    };
    (u8s) => {
        Param::U8Ptr
    };
    (f32s) => {
        Param::F32Ptr
    };
    (f64s) => {
        Param::F64Ptr
    };
    (i32) => {
        Param::I32
    };
    (i64) => {
        Param::I64
    };
    (f32) => {
        Param::F32
    };
}

/// The Rust type a launch method takes for a parameter kind.
#[cfg(feature = "cuda")]
macro_rules! arg_ty {
    ($a:lifetime, buf) => { impl Into<crate::cuda::args::BufArg<$a>> };
    ($a:lifetime, i32s) => { impl Into<crate::cuda::args::PtrArg<$a, i32>> };
    ($a:lifetime, u8s) => { impl Into<crate::cuda::args::PtrArg<$a, u8>> };
    ($a:lifetime, f32s) => { impl Into<crate::cuda::args::PtrArg<$a, f32>> };
    ($a:lifetime, f64s) => { impl Into<crate::cuda::args::PtrArg<$a, f64>> };
    ($a:lifetime, i32) => { i32 };
    ($a:lifetime, i64) => { i64 };
    ($a:lifetime, f32) => { f32 };
}

/// Turns an argument into what is pushed: a device view (pointer) and, for a buffer, its tag.
#[cfg(feature = "cuda")]
macro_rules! arg_hold {
    ($a:lifetime, buf, $p:ident) => {
        Into::<crate::cuda::args::BufArg<$a>>::into($p).view()
    };
    ($a:lifetime, i32s, $p:ident) => {
        Into::<crate::cuda::args::PtrArg<$a, i32>>::into($p).view()
    };
    ($a:lifetime, u8s, $p:ident) => {
        Into::<crate::cuda::args::PtrArg<$a, u8>>::into($p).view()
    };
    ($a:lifetime, f32s, $p:ident) => {
        Into::<crate::cuda::args::PtrArg<$a, f32>>::into($p).view()
    };
    ($a:lifetime, f64s, $p:ident) => {
        Into::<crate::cuda::args::PtrArg<$a, f64>>::into($p).view()
    };
    ($a:lifetime, $scalar:ident, $p:ident) => {
        $p
    };
}

/// Pushes one held argument: a buffer as its pointer then its `int` dtype tag (the order every
/// kernel declares them in), a typed pointer as itself, a scalar by reference.
#[cfg(feature = "cuda")]
macro_rules! arg_push {
    (buf, $args:ident, $p:ident) => {{
        $p.0.push(&mut $args);
        cudarc::driver::PushKernelArg::arg(&mut $args, $p.1);
    }};
    (i32s, $args:ident, $p:ident) => {
        $p.push(&mut $args)
    };
    (u8s, $args:ident, $p:ident) => {
        $p.push(&mut $args)
    };
    (f32s, $args:ident, $p:ident) => {
        $p.push(&mut $args)
    };
    (f64s, $args:ident, $p:ident) => {
        $p.push(&mut $args)
    };
    ($scalar:ident, $args:ident, $p:ident) => {
        cudarc::driver::PushKernelArg::arg(&mut $args, &$p)
    };
}

/// Declares kernels: `"file.cu" { name(param: kind, ...); ... }` for one launch method per kernel,
/// then `groups { method["file.cu": name, ...](param: kind, ...); ... }`.
macro_rules! kernels {
    (
        $( $file:literal { $( $kname:ident ( $( $p:ident : $k:ident ),* $(,)? ); )* } )*
        groups {
            $( $gname:ident [ $( $gfile:literal : $gk:ident ),+ $(,)? ]
                ( $( $gp:ident : $gkind:ident ),* $(,)? ); )*
        }
    ) => {
        /// Every declared kernel (see the module docs).
        #[cfg(test)]
        pub(crate) const KERNELS: &[KernelDecl] = &[
            $( $( KernelDecl {
                method: stringify!($kname),
                kernels: &[($file, stringify!($kname))],
                params: &[ $( (stringify!($p), param_kind!($k)) ),* ],
            }, )* )*
            $( KernelDecl {
                method: stringify!($gname),
                kernels: &[ $( ($gfile, stringify!($gk)) ),+ ],
                params: &[ $( (stringify!($gp), param_kind!($gkind)) ),* ],
            }, )*
        ];

        #[cfg(feature = "cuda")]
        #[allow(clippy::too_many_arguments)]
        impl crate::cuda::Cuda {
            $( $(
                pub(crate) fn $kname<'a>(
                    &self,
                    geometry: crate::launch::Launch,
                    $( $p: arg_ty!('a, $k) ),*
                ) -> crate::error::Result<()> {
                    let func = self.function($file, stringify!($kname))?;
                    crate::cuda::args::allow_dynamic_smem(&func, geometry, stringify!($kname))?;
                    $( let $p = arg_hold!('a, $k, $p); )*
                    let mut args = self.stream().launch_builder(&func);
                    $( arg_push!($k, args, $p); )*
                    // SAFETY: the arguments were pushed in the order and kinds of this declaration,
                    // which the test `every_declaration_matches_its_cu_signature` checks against the
                    // kernel's parameter list in its .cu file (count, kind and name of every
                    // parameter); the ops check buffer lengths against the dims before launching and
                    // the kernels bound every access by those dims.
                    unsafe { crate::cuda::args::launch(args, geometry, stringify!($kname)) }
                }
            )* )*
            $(
                pub(crate) fn $gname<'a>(
                    &self,
                    kernel: &str,
                    geometry: crate::launch::Launch,
                    $( $gp: arg_ty!('a, $gkind) ),*
                ) -> crate::error::Result<()> {
                    const GROUP: &[(&str, &str)] = &[ $( ($gfile, stringify!($gk)) ),+ ];
                    let file = crate::cuda::args::group_file(GROUP, stringify!($gname), kernel)?;
                    let func = self.function(file, kernel)?;
                    crate::cuda::args::allow_dynamic_smem(&func, geometry, kernel)?;
                    $( let $gp = arg_hold!('a, $gkind, $gp); )*
                    let mut args = self.stream().launch_builder(&func);
                    $( arg_push!($gkind, args, $gp); )*
                    // SAFETY: as for the single-kernel methods; every kernel of the group is checked
                    // against this one parameter list, and `group_file` refused any other kernel.
                    unsafe { crate::cuda::args::launch(args, geometry, kernel) }
                }
            )*
        }
    };
}

kernels! {
    "adamw.cu" {
        adamw_k(p: buf, g: buf, m: buf, v: buf, n: i64, has_decay: i32, decay: f32, w1_small: i32,
            w1: f32, w1m1: f32, b2: f32, one_minus_b2: f32, neg_step: f32, bc2_sqrt: f32, eps: f32);
    }
    "attention.cu" {
        attn_bwd_delta_k(out: buf, dout: buf, delta: f32s, b: i32, t: i32, nh: i32, d: i32);
        attn_bwd_dq_k(q: buf, k: buf, v: buf, seg: i32s, has_seg: i32, lse: buf, delta: f32s,
            dout: buf, dq: buf, b: i32, t: i32, nh: i32, nkv: i32, d: i32, scale: f32, cap: f32,
            window: i32);
        attn_bwd_dkv_k(q: buf, k: buf, v: buf, seg: i32s, has_seg: i32, lse: buf, delta: f32s,
            dout: buf, dk: buf, dv: buf, b: i32, t: i32, nh: i32, nkv: i32, d: i32, scale: f32,
            cap: f32, window: i32);
    }
    "cross_entropy.cu" {
        ce_row_k(logits: buf, labels: i32s, v: i32, cap: f32, grad_scale: f32, dlogits: buf,
            want_grad: i32, row_loss: f32s);
    }
    "dropout.cu" {
        dropout_mask_k(out: buf, n: i64, key: i64, thr: i64, keep: f32);
    }
    "elementwise.cu" {
        fill_k(x: buf, n: i64, v: f32);
        copy_k(src: buf, dst: buf, n: i64);
        axpy_k(alpha: f32, x: buf, y: buf, n: i64);
        scale_k(x: buf, n: i64, alpha: f32);
        mul_k(x: buf, m: buf, out: buf, n: i64);
    }
    "embedding.cu" {
        embedding_fwd_k(ids: i32s, table: buf, out: buf, v: i32, h: i32, scale: f32);
        embedding_bwd_k(ids: i32s, dout: buf, dtable: buf, v: i32, h: i32, scale: f32);
    }
    "geglu.cu" {
        geglu_fwd_k(gate: buf, up: buf, out: buf, n: i64);
        geglu_bwd_k(dout: buf, gate: buf, up: buf, dgate: buf, dup: buf, n: i64);
    }
    "gemm.cu" {
        gemm_fallback_k(a: buf, lda: i64, ta: i32, b: buf, ldb: i64, tb: i32, c: buf, m: i32, n: i32,
            k: i32, alpha: f32, beta: f32);
    }
    "lora.cu" {
        lora_proj_k(x: buf, mask: buf, has_mask: i32, w: buf, sj: i64, sk: i64, out: buf, kdim: i32,
            r: i32);
        lora_add_k(y: buf, xa: buf, b: buf, m: i64, n: i32, r: i32, s: f32);
        lora_dx_k(dx: buf, dyb: buf, a: buf, mask: buf, has_mask: i32, m: i64, k: i32, r: i32, s: f32);
        lora_da_k(dyb: buf, x: buf, mask: buf, has_mask: i32, da: buf, m: i64, k: i32, r: i32, s: f32);
        lora_db_k(dy: buf, xa: buf, db: buf, m: i64, n: i32, r: i32, s: f32);
    }
    "nf4_dequant.cu" {
        nf4_dequant_k(packed: u8s, codes: u8s, absmax: f32s, code8: f32s, offset: f32, nested: i32,
            numel: i64, out: buf);
    }
    "nf4_gemm.cu" {
        nf4_gemm_dyw_k(dy: buf, packed: u8s, codes: u8s, absmax: f32s, code8: f32s, offset: f32,
            nested: i32, dx: buf, acc_out: i32, m: i32, n: i32, k: i32, dyb: buf, la: buf, r: i32,
            lscale: f32);
    }
    "nf4_quant.cu" {
        nf4_quant_k(x: buf, numel: i64, packed: u8s, absmax: f32s, bad: i32s);
        nf4_quant_nested_k(absmax: f32s, blocks: i64, offset: f32, map8: f32s, codes: u8s,
            nested: f32s);
    }
    "reduce.cu" {
        reduce_partial_k(x: buf, n: i64, mode: i32, partial: f64s);
        reduce_final_k(partial: f64s, count: i32, out: f64s);
    }
    "rmsnorm.cu" {
        rmsnorm_fwd_k(x: buf, w: buf, y: buf, rstd: buf, h: i32, eps: f32);
        rmsnorm_bwd_k(dy: buf, x: buf, w: buf, rstd: buf, dx: buf, h: i32);
        rmsnorm_dw_k(dy: buf, x: buf, rstd: buf, dw: buf, n: i64, h: i32);
    }
    "rope.cu" {
        rope_k(x: buf, pos: i32s, n: i64, heads: i32, d: i32, theta: f32, inverse: i32);
    }
    "softcap.cu" {
        softcap_fwd_k(x: buf, n: i64, cap: f32);
        softcap_bwd_k(y: buf, dy: buf, n: i64, cap: f32);
    }
    groups {
        attn_fwd_any_k[
            "attention.cu": attn_fwd_k,
            "attention.cu": attn_fwd_mma_d16_k,
            "attention.cu": attn_fwd_mma_d32_k,
            "attention.cu": attn_fwd_mma_d64_k,
            "attention.cu": attn_fwd_mma_d128_k,
            "attention.cu": attn_fwd_mma_d256_k,
            "attention_flash.cu": attn_fwd_flash_d128_k,
            "attention_flash.cu": attn_fwd_flash_d256_k,
        ](q: buf, k: buf, v: buf, seg: i32s, has_seg: i32, out: buf, lse: buf, b: i32, t: i32,
            tk: i32, nh: i32, nkv: i32, d: i32, scale: f32, cap: f32, window: i32);
        attn_bwd_mma_k[
            "attention.cu": attn_bwd_dq_mma_d16_k,
            "attention.cu": attn_bwd_dk_mma_d16_k,
            "attention.cu": attn_bwd_dv_mma_d16_k,
            "attention.cu": attn_bwd_dq_mma_d32_k,
            "attention.cu": attn_bwd_dk_mma_d32_k,
            "attention.cu": attn_bwd_dv_mma_d32_k,
            "attention.cu": attn_bwd_dq_mma_d64_k,
            "attention.cu": attn_bwd_dk_mma_d64_k,
            "attention.cu": attn_bwd_dv_mma_d64_k,
            "attention.cu": attn_bwd_dq_mma_d128_k,
            "attention.cu": attn_bwd_dk_mma_d128_k,
            "attention.cu": attn_bwd_dv_mma_d128_k,
            "attention.cu": attn_bwd_dq_mma_d256_k,
            "attention.cu": attn_bwd_dk_mma_d256_k,
            "attention.cu": attn_bwd_dv_mma_d256_k,
        ](q: buf, k: buf, v: buf, seg: i32s, has_seg: i32, lse: buf, delta: f32s, dout: buf,
            grad: buf, b: i32, t: i32, nh: i32, nkv: i32, d: i32, scale: f32, cap: f32, window: i32);
        attn_bwd_dq_flash_k[
            "attention_flash.cu": attn_bwd_dq_flash_d128_k,
            "attention_flash.cu": attn_bwd_dq_flash_d256_k,
            "attention_flash.cu": attn_bwd_dq_flash_s_d128_k,
            "attention_flash.cu": attn_bwd_dq_flash_s_d256_k,
        ](q: buf, k: buf, v: buf, seg: i32s, has_seg: i32, lse: buf, delta: f32s, dout: buf,
            dq: buf, b: i32, t: i32, nh: i32, nkv: i32, d: i32, scale: f32, cap: f32, window: i32);
        attn_bwd_dkv_flash_k[
            "attention_flash.cu": attn_bwd_dkv_flash_d128_k,
            "attention_flash.cu": attn_bwd_dkv_flash_d256_k,
            "attention_flash.cu": attn_bwd_dkv_flash_s_d128_k,
            "attention_flash.cu": attn_bwd_dkv_flash_s_d256_k,
        ](q: buf, k: buf, v: buf, seg: i32s, has_seg: i32, lse: buf, delta: f32s, dout: buf,
            dk: buf, dv: buf, b: i32, t: i32, nh: i32, nkv: i32, d: i32, scale: f32, cap: f32,
            window: i32);
        nf4_xwt_k[
            "nf4_gemv.cu": nf4_gemv_k,
            "nf4_gemm.cu": nf4_gemm_xwt_k,
        ](x: buf, packed: u8s, codes: u8s, absmax: f32s, code8: f32s, offset: f32, nested: i32,
            y: buf, acc_out: i32, m: i32, n: i32, k: i32, xa: buf, lb: buf, r: i32, lscale: f32);
    }
}

#[cfg(test)]
mod tests {
    use super::parse::{parse_file, Elem, ParamTy};
    use super::*;
    use std::collections::BTreeSet;

    /// Each declaration against the kernels' parameter lists in the .cu text (after comment removal,
    /// macro expansion and typedef resolution: parse.rs): same count, and per parameter the same
    /// kind and name; a `buf` is a `void*` followed by an `int` tag. Every `extern "C" __global__`
    /// kernel of every source is declared exactly once.
    #[test]
    fn every_declaration_matches_its_cu_signature() {
        let mut parsed = std::collections::HashMap::new();
        for (file, src) in SOURCES {
            for sig in parse_file(file, src).unwrap_or_else(|e| panic!("{e}")) {
                assert!(
                    parsed.insert((*file, sig.name.clone()), sig).is_none(),
                    "{file}: a kernel is defined twice"
                );
            }
        }
        let mut declared = BTreeSet::new();
        for decl in KERNELS {
            for &(file, name) in decl.kernels {
                assert!(
                    declared.insert((file, name)),
                    "{file}: kernel `{name}` is declared twice in abi/mod.rs"
                );
                let sig = parsed.get(&(file, name.to_string())).unwrap_or_else(|| {
                    panic!("abi/mod.rs declares `{name}` in {file}, which defines no such extern \"C\" __global__ kernel")
                });
                let mut c = sig.params.iter();
                for (i, &(pname, kind)) in decl.params.iter().enumerate() {
                    let at = format!("{file}: kernel `{name}`, declared parameter {i} `{pname}`");
                    let p = c.next().unwrap_or_else(|| {
                        panic!(
                            "{at}: the kernel has only {} C parameters",
                            sig.params.len()
                        )
                    });
                    assert_eq!(p.name, pname, "{at}: the C parameter is named `{}`", p.name);
                    let want = match kind {
                        Param::Buf => ParamTy::Ptr(Elem::Void),
                        Param::I32Ptr => ParamTy::Ptr(Elem::Int),
                        Param::U8Ptr => ParamTy::Ptr(Elem::UChar),
                        Param::F32Ptr => ParamTy::Ptr(Elem::Float),
                        Param::F64Ptr => ParamTy::Ptr(Elem::Double),
                        Param::I32 => ParamTy::Int,
                        Param::I64 => ParamTy::LongLong,
                        Param::F32 => ParamTy::Float,
                    };
                    assert_eq!(p.ty, want, "{at}: the C parameter has type `{}`", p.ty);
                    if kind == Param::Buf {
                        let tag = c.next().unwrap_or_else(|| {
                            panic!("{at}: the buffer pointer has no `int` dtype tag after it")
                        });
                        assert_eq!(
                            tag.ty,
                            ParamTy::Int,
                            "{at}: `{}` after the buffer pointer must be its `int` dtype tag",
                            tag.name
                        );
                    }
                }
                let rest: Vec<String> = c.map(|p| format!("{} {}", p.ty, p.name)).collect();
                assert!(
                    rest.is_empty(),
                    "{file}: kernel `{name}` has C parameters the declaration lacks: {rest:?}"
                );
            }
        }
        let undeclared: Vec<_> = parsed
            .keys()
            .filter(|(f, n)| !declared.contains(&(*f, n.as_str())))
            .collect();
        assert!(
            undeclared.is_empty(),
            "kernels defined in kernels/*.cu but not declared in abi/mod.rs: {undeclared:?}"
        );
    }

    /// The launch methods' names are unique (a group's name is not also a kernel's).
    #[test]
    fn method_names_are_unique() {
        let mut seen = BTreeSet::new();
        for d in KERNELS {
            assert!(seen.insert(d.method), "two declarations of `{}`", d.method);
        }
    }
}
