//! Kernel signatures, read from the embedded `kernels/*.cu` sources, and a check of each launch's
//! [`Arg`] list against them (issue 6: a wrong argument count, order or kind is undefined behaviour
//! on the GPU, and nothing else catches it: the CPU emulator calls the kernels from C++).
//!
//! - [`signatures`] parses every `extern "C" __global__` kernel of every embedded file once (cached in
//!   a `OnceLock`): comments are dropped, line continuations joined, function-like macros whose body
//!   declares a kernel (`ATTN_FWD_MMA(DIM)` in attention.cu) expanded with `##` pasting, and the
//!   `typedef`s of common.cuh and the file (`i64`, `u8`, `bf16_t`, ...) resolved.
//! - [`check`] matches a launch's argument kinds slot by slot: a tagged buffer (`Arg::Buf`, `BufAt`,
//!   `NullBuf`) must meet `void*` followed by `int`; `Arg::Null` a typed (non-`void`) pointer;
//!   `I32s`/`U8s`/`F32s`/`F64s` an `int*`/`unsigned char*`/`float*`/`double*`; `I32` an `int`, `I64` a
//!   `long long`, `F32` a `float`; and the counts must agree. `Cuda::launch` calls it before every
//!   launch (one hash lookup and a pass over ~20 slots). Any other parameter type (e.g. a struct
//!   passed by value) is parsed as `Other` and no argument matches it.
//! - The tests also check every `.launch(` call site in `cuda/*.rs` statically (module `callsites`),
//!   so a mismatch fails `cargo test --features cuda` on a machine without a GPU.
//!
//! What is not checked: constness (a read-only buffer passed where the kernel writes; `Arg` carries
//! no mutability), and the dtype *values* (the tag always matches the buffer it travels with).

use super::compile::{COMMON, SOURCES};
use super::Arg;
use crate::error::{KernelError, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

/// The type of one kernel parameter, after typedef resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ParamTy {
    Int,
    LongLong,
    Float,
    /// A pointer (one level) to the element type.
    Ptr(Elem),
    /// Anything else (struct by value, `unsigned`, `double`, pointer to pointer, ...), spelled as
    /// written after typedef resolution. No `Arg` kind matches it.
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    Void,
    Int,
    UChar,
    Float,
    Double,
    Other(String),
}

impl fmt::Display for ParamTy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamTy::Int => write!(f, "int"),
            ParamTy::LongLong => write!(f, "long long"),
            ParamTy::Float => write!(f, "float"),
            ParamTy::Ptr(e) => {
                let s = match e {
                    Elem::Void => "void",
                    Elem::Int => "int",
                    Elem::UChar => "unsigned char",
                    Elem::Float => "float",
                    Elem::Double => "double",
                    Elem::Other(o) => o,
                };
                write!(f, "{s}*")
            }
            ParamTy::Other(o) => write!(f, "{o}"),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Param {
    pub(crate) ty: ParamTy,
    pub(crate) name: String,
}

#[derive(Clone, Debug)]
pub(crate) struct Signature {
    pub(crate) name: String,
    pub(crate) params: Vec<Param>,
}

/// What one [`Arg`] pushes, as far as the ABI is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ArgKind {
    /// Pointer + `int` dtype tag: `Buf`, `BufAt`, `NullBuf`.
    TaggedBuf,
    /// A null pointer for a typed pointer parameter: `Null`.
    NullPtr,
    /// `I32s`, `I32sAt`.
    I32Ptr,
    U8Ptr,
    F32Ptr,
    F64Ptr,
    I32,
    I64,
    F32,
}

impl ArgKind {
    fn describe(self) -> &'static str {
        match self {
            ArgKind::TaggedBuf => "a tagged buffer (void* + int tag)",
            ArgKind::NullPtr => "a null typed pointer (Arg::Null)",
            ArgKind::I32Ptr => "an int* (Arg::I32s)",
            ArgKind::U8Ptr => "an unsigned char* (Arg::U8s)",
            ArgKind::F32Ptr => "a float* (Arg::F32s)",
            ArgKind::F64Ptr => "a double* (Arg::F64s)",
            ArgKind::I32 => "an int (Arg::I32)",
            ArgKind::I64 => "a long long (Arg::I64)",
            ArgKind::F32 => "a float (Arg::F32)",
        }
    }
}

impl Arg<'_> {
    pub(crate) fn kind(&self) -> ArgKind {
        match self {
            Arg::Buf(_) | Arg::BufAt(..) | Arg::NullBuf => ArgKind::TaggedBuf,
            Arg::Null => ArgKind::NullPtr,
            Arg::I32s(_) | Arg::I32sAt(..) => ArgKind::I32Ptr,
            Arg::U8s(_) => ArgKind::U8Ptr,
            Arg::F32s(_) => ArgKind::F32Ptr,
            Arg::F64s(_) => ArgKind::F64Ptr,
            Arg::I32(_) => ArgKind::I32,
            Arg::I64(_) => ArgKind::I64,
            Arg::F32(_) => ArgKind::F32,
        }
    }
}

/// file name → kernel name → signature, for every embedded source.
type SigMap = HashMap<&'static str, HashMap<String, Signature>>;

/// All kernel signatures, parsed once. An error here means an embedded source could not be parsed
/// (a bug caught by the unit tests), reported at the first launch.
pub(crate) fn signatures() -> std::result::Result<&'static SigMap, &'static str> {
    static SIGS: OnceLock<std::result::Result<SigMap, String>> = OnceLock::new();
    SIGS.get_or_init(|| {
        let mut all = HashMap::new();
        for (file, src) in SOURCES {
            let sigs = parse_file(file, src)?;
            let mut m = HashMap::new();
            for s in sigs {
                if m.contains_key(&s.name) {
                    return Err(format!("{file}: kernel `{}` is declared twice", s.name));
                }
                m.insert(s.name.clone(), s);
            }
            all.insert(*file, m);
        }
        Ok(all)
    })
    .as_ref()
    .map_err(|e| e.as_str())
}

fn sig_err(msg: String) -> KernelError {
    KernelError::Backend {
        backend: "cuda",
        msg: format!("kernel argument check: {msg}"),
    }
}

/// Looks up `file`'s kernel `name`.
pub(crate) fn lookup(file: &str, name: &str) -> std::result::Result<&'static Signature, String> {
    let sigs = signatures().map_err(|e| format!("parsing the embedded kernel sources: {e}"))?;
    let f = sigs
        .get(file)
        .ok_or_else(|| format!("no embedded kernel source named {file}"))?;
    f.get(name)
        .ok_or_else(|| format!("{file} declares no extern \"C\" __global__ kernel `{name}`"))
}

/// Matches argument `kind` (argument number `ai` of the launch) against `sig`'s parameters from
/// index `at`; returns how many parameters it fills (2 for a tagged buffer, else 1).
pub(crate) fn match_slot(
    file: &str,
    sig: &Signature,
    at: usize,
    ai: usize,
    kind: ArgKind,
) -> std::result::Result<usize, String> {
    let param = |i: usize| -> std::result::Result<&Param, String> {
        sig.params.get(i).ok_or_else(|| {
            format!(
                "{file}: kernel `{}` takes {} parameters, but argument {ai} ({}) would fill parameter {i}",
                sig.name,
                sig.params.len(),
                kind.describe()
            )
        })
    };
    let mismatch = |i: usize, p: &Param, want: &str| {
        format!(
            "{file}: kernel `{}`: parameter {i} `{}` has type `{}` ({want}), but argument {ai} is {}",
            sig.name,
            p.name,
            p.ty,
            kind.describe()
        )
    };
    let p = param(at)?;
    let ok = match kind {
        ArgKind::TaggedBuf => {
            if p.ty != ParamTy::Ptr(Elem::Void) {
                return Err(mismatch(at, p, "a tagged buffer needs `void*`"));
            }
            let tag = param(at + 1)?;
            if tag.ty != ParamTy::Int {
                return Err(mismatch(
                    at + 1,
                    tag,
                    "the dtype tag after a tagged buffer needs `int`",
                ));
            }
            return Ok(2);
        }
        ArgKind::NullPtr => matches!(&p.ty, ParamTy::Ptr(e) if *e != Elem::Void),
        ArgKind::I32Ptr => p.ty == ParamTy::Ptr(Elem::Int),
        ArgKind::U8Ptr => p.ty == ParamTy::Ptr(Elem::UChar),
        ArgKind::F32Ptr => p.ty == ParamTy::Ptr(Elem::Float),
        ArgKind::F64Ptr => p.ty == ParamTy::Ptr(Elem::Double),
        ArgKind::I32 => p.ty == ParamTy::Int,
        ArgKind::I64 => p.ty == ParamTy::LongLong,
        ArgKind::F32 => p.ty == ParamTy::Float,
    };
    if ok {
        Ok(1)
    } else {
        Err(mismatch(at, p, "see kernels/README.md, ABI conventions"))
    }
}

/// The error for a launch that fills `filled` of `sig`'s parameters and then runs out of arguments.
pub(crate) fn check_complete(
    file: &str,
    sig: &Signature,
    filled: usize,
    given: usize,
) -> std::result::Result<(), String> {
    match sig.params.get(filled) {
        None => Ok(()),
        Some(p) => Err(format!(
            "{file}: kernel `{}` takes {} parameters but the {given} arguments fill {filled}: parameter {filled} `{} {}` is missing",
            sig.name,
            sig.params.len(),
            p.ty,
            p.name
        )),
    }
}

/// Checks argument kinds against `file`'s kernel `name`: count and kind per slot.
pub(crate) fn check_kinds(
    file: &str,
    name: &str,
    kinds: impl IntoIterator<Item = ArgKind>,
) -> std::result::Result<(), String> {
    let sig = lookup(file, name)?;
    let mut at = 0;
    let mut given = 0;
    for (ai, k) in kinds.into_iter().enumerate() {
        at += match_slot(file, sig, at, ai, k)?;
        given = ai + 1;
    }
    check_complete(file, sig, at, given)
}

/// The check `Cuda::launch` runs before each launch.
pub(crate) fn check(file: &str, name: &str, args: &[Arg<'_>]) -> Result<()> {
    check_kinds(file, name, args.iter().map(Arg::kind)).map_err(sig_err)
}

// ---- parsing the CUDA sources ------------------------------------------------------------------

/// Replaces `//` and `/* */` comments by spaces (newlines kept), leaving string literals alone.
fn strip_c_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let start = i;
            i = closing_quote(b, i, b.len());
            i = (i + 1).min(b.len());
            out.extend_from_slice(&b[start..i]);
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            out.push(b' ');
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                if b[i] == b'\n' {
                    out.push(b'\n');
                }
                i += 1;
            }
            i = (i + 2).min(b.len());
            out.push(b' ');
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    // Only whole comments (which start and end on ASCII bytes) were removed.
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Index of the `"` closing the string literal opened at `open` (backslash escapes skipped); `end`
/// (or one past it, after a trailing backslash) when the literal is not closed before `end`.
fn closing_quote(b: &[u8], open: usize, end: usize) -> usize {
    let mut i = open + 1;
    while i < end && b[i] != b'"' {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    i
}

/// Byte index of the bracket closing the one at `open` (`(`, `[`, `{`, `<` not handled), skipping
/// string literals.
fn close_of(s: &str, open: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0i32;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = closing_quote(b, i, b.len());
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Byte positions of the commas of `s` outside brackets and string literals.
fn top_level_commas(s: &str) -> Vec<usize> {
    let b = s.as_bytes();
    let mut commas = Vec::new();
    let (mut depth, mut i) = (0i32, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = closing_quote(b, i, b.len());
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => commas.push(i),
            _ => {}
        }
        i += 1;
    }
    commas
}

/// Splits at commas outside brackets and string literals; trims; drops a trailing empty piece.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for c in top_level_commas(s) {
        parts.push(s[start..c].trim());
        start = c + 1;
    }
    let last = s[start.min(s.len())..].trim();
    if !last.is_empty() {
        parts.push(last);
    }
    parts
}

/// `typedef A B;` lines: B → A.
fn typedefs(text: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("typedef ") {
            let rest = rest.trim_end_matches(';').trim();
            if let Some((ty, name)) = rest.rsplit_once(char::is_whitespace) {
                m.insert(name.trim().to_string(), ty.trim().to_string());
            }
        }
    }
    m
}

/// A function-like macro: name, parameter names, body.
struct Macro {
    name: String,
    params: Vec<String>,
    body: String,
}

/// Replaces each identifier of `body` that is a macro parameter by its argument, then applies `##`.
fn expand(m: &Macro, args: &[&str]) -> String {
    let b = m.body.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if is_ident_byte(b[i]) && (i == 0 || !is_ident_byte(b[i - 1])) {
            let mut j = i;
            while j < b.len() && is_ident_byte(b[j]) {
                j += 1;
            }
            let word = &m.body[i..j];
            match m.params.iter().position(|p| p == word) {
                Some(k) => out.push_str(args.get(k).copied().unwrap_or("")),
                None => out.push_str(word),
            }
            i = j;
        } else {
            let c = m.body[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    // Token pasting: `a ## b` → `ab`.
    let mut pasted = String::new();
    let mut rest = out.as_str();
    while let Some(p) = rest.find("##") {
        pasted.push_str(rest[..p].trim_end());
        rest = rest[p + 2..].trim_start();
    }
    pasted.push_str(rest);
    pasted
}

/// The kernel signatures of one source file (common.cuh's typedefs apply).
pub(crate) fn parse_file(file: &str, src: &str) -> std::result::Result<Vec<Signature>, String> {
    let text = strip_c_comments(src).replace("\\\n", " ");
    let mut defs = typedefs(&strip_c_comments(COMMON));
    defs.extend(typedefs(&text));
    // Function-like macros that declare kernels, and the text without preprocessor lines.
    let mut macros = Vec::new();
    let mut body = String::new();
    for line in text.lines() {
        let l = line.trim_start();
        if let Some(def) = l.strip_prefix("#define ") {
            let def = def.trim_start();
            let name_end = def.bytes().take_while(|&c| is_ident_byte(c)).count();
            if def[name_end..].starts_with('(') && def.contains("__global__") {
                let close = close_of(def, name_end)
                    .ok_or_else(|| format!("{file}: unbalanced macro {}", &def[..name_end]))?;
                macros.push(Macro {
                    name: def[..name_end].to_string(),
                    params: split_top(&def[name_end + 1..close])
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    body: def[close + 1..].to_string(),
                });
            }
            body.push('\n');
        } else if l.starts_with('#') {
            body.push('\n');
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    let mut scan = body.clone();
    for m in &macros {
        let mut from = 0;
        while let Some(p) = body[from..].find(m.name.as_str()) {
            let at = from + p;
            from = at + m.name.len();
            let bb = body.as_bytes();
            if at > 0 && is_ident_byte(bb[at - 1]) {
                continue;
            }
            let after = body[from..].trim_start();
            if !after.starts_with('(') {
                continue;
            }
            let open = body.len() - after.len();
            let close =
                close_of(&body, open).ok_or_else(|| format!("{file}: unbalanced {}(", m.name))?;
            let args = split_top(&body[open + 1..close]);
            scan.push('\n');
            scan.push_str(&expand(m, &args));
            from = close;
        }
    }
    let mut sigs = Vec::new();
    let mut from = 0;
    while let Some(p) = scan[from..].find("__global__") {
        let at = from + p;
        from = at + "__global__".len();
        if !scan[..at].trim_end().ends_with("extern \"C\"") {
            return Err(format!(
                "{file}: a __global__ function is not extern \"C\" (near `{}`)",
                scan[at..].chars().take(80).collect::<String>()
            ));
        }
        let mut rest = scan[from..].trim_start();
        rest = rest
            .strip_prefix("void")
            .ok_or_else(|| format!("{file}: a kernel does not return void"))?
            .trim_start();
        if let Some(lb) = rest.strip_prefix("__launch_bounds__") {
            let lb = lb.trim_start();
            let close =
                close_of(lb, 0).ok_or_else(|| format!("{file}: unbalanced __launch_bounds__"))?;
            rest = lb[close + 1..].trim_start();
        }
        let name_len = rest.bytes().take_while(|&c| is_ident_byte(c)).count();
        let name = rest[..name_len].to_string();
        let after = rest[name_len..].trim_start();
        if name.is_empty() || !after.starts_with('(') {
            return Err(format!(
                "{file}: cannot read the kernel name after __global__"
            ));
        }
        let close = close_of(after, 0)
            .ok_or_else(|| format!("{file}: kernel `{name}`: unbalanced parameter list"))?;
        let mut params = Vec::new();
        let plist = after[1..close].trim();
        if !plist.is_empty() && plist != "void" {
            for (i, p) in split_top(plist).into_iter().enumerate() {
                params.push(
                    parse_param(p, &defs).map_err(|e| {
                        format!("{file}: kernel `{name}`: parameter {i} `{p}`: {e}")
                    })?,
                );
            }
        }
        sigs.push(Signature { name, params });
    }
    Ok(sigs)
}

/// One declaration `const void* x` → type and name (typedefs resolved, `const` and
/// `__restrict__` dropped).
fn parse_param(p: &str, defs: &HashMap<String, String>) -> std::result::Result<Param, String> {
    let spaced = p.replace('*', " * ");
    let mut toks: Vec<&str> = spaced
        .split_whitespace()
        .filter(|t| !matches!(*t, "const" | "__restrict__" | "volatile"))
        .collect();
    let name = match toks.pop() {
        Some(n) if n.bytes().all(is_ident_byte) => n.to_string(),
        _ => return Err("no parameter name".into()),
    };
    let stars = toks.iter().filter(|t| **t == "*").count();
    let base: Vec<String> = toks
        .iter()
        .filter(|t| **t != "*")
        .map(|t| {
            // Resolve typedef chains (bounded, in case of a cycle).
            let mut t = t.to_string();
            for _ in 0..8 {
                match defs.get(&t) {
                    Some(d) => t = d.clone(),
                    None => break,
                }
            }
            t
        })
        .collect();
    if base.is_empty() {
        return Err("no type".into());
    }
    let base = base.join(" ");
    let ty = match (stars, base.as_str()) {
        (0, "int") => ParamTy::Int,
        (0, "long long") | (0, "long long int") => ParamTy::LongLong,
        (0, "float") => ParamTy::Float,
        (1, b) => ParamTy::Ptr(match b {
            "void" => Elem::Void,
            "int" => Elem::Int,
            "unsigned char" => Elem::UChar,
            "float" => Elem::Float,
            "double" => Elem::Double,
            other => Elem::Other(other.to_string()),
        }),
        (n, b) => ParamTy::Other(format!("{b}{}", "*".repeat(n))),
    };
    Ok(Param { ty, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(file: &str, name: &str) -> &'static Signature {
        lookup(file, name).unwrap()
    }

    #[test]
    fn every_kernel_in_every_file_parses() {
        let sigs = signatures().unwrap();
        assert_eq!(sigs.len(), SOURCES.len());
        let mut total = 0;
        for (file, src) in SOURCES {
            let kernels = &sigs[file];
            // Every `__global__` in the raw text is either a kernel line or inside a macro whose
            // expansions were found: the counts of names agree with an independent look at the text.
            let direct = src
                .lines()
                .filter(|l| l.contains("__global__") && !l.trim_end().ends_with('\\'))
                .count();
            assert!(
                kernels.len() >= direct,
                "{file}: {direct} kernel lines, {} parsed",
                kernels.len()
            );
            assert!(!kernels.is_empty(), "{file}: no kernel parsed");
            for s in kernels.values() {
                total += 1;
                assert!(
                    s.name.ends_with("_k"),
                    "{file}: `{}` does not end in _k",
                    s.name
                );
                for (i, p) in s.params.iter().enumerate() {
                    // README "ABI conventions": only these types, and every void* is followed by
                    // its int dtype tag.
                    assert!(
                        !matches!(p.ty, ParamTy::Other(_) | ParamTy::Ptr(Elem::Other(_))),
                        "{file}: `{}` parameter {i} `{}` has type {}",
                        s.name,
                        p.name,
                        p.ty
                    );
                    if p.ty == ParamTy::Ptr(Elem::Void) {
                        assert_eq!(
                            s.params.get(i + 1).map(|q| &q.ty),
                            Some(&ParamTy::Int),
                            "{file}: `{}`: buffer `{}` has no int dtype tag after it",
                            s.name,
                            p.name
                        );
                    }
                }
            }
        }
        // 36 kernels written out, plus 5 + 15 attention kernels from ATTN_FWD_MMA / ATTN_BWD_MMA.
        assert_eq!(total, 56, "kernel count changed: update this test");
    }

    #[test]
    fn macro_kernels_and_typedefs_are_resolved() {
        let s = sig("attention.cu", "attn_bwd_dv_mma_d256_k");
        assert_eq!(s.params.len(), 23);
        assert_eq!(s.params[6].name, "seg");
        assert_eq!(s.params[6].ty, ParamTy::Ptr(Elem::Int));
        assert_eq!(s.params[10].ty, ParamTy::Ptr(Elem::Float));
        let f = sig("attention.cu", "attn_fwd_mma_d16_k");
        assert_eq!(
            f.params.len(),
            sig("attention.cu", "attn_fwd_k").params.len()
        );
        let d = sig("nf4_dequant.cu", "nf4_dequant_k");
        let tys: Vec<String> = d.params.iter().map(|p| p.ty.to_string()).collect();
        assert_eq!(
            tys,
            [
                "unsigned char*",
                "unsigned char*",
                "float*",
                "float*",
                "float",
                "int",
                "long long",
                "void*",
                "int"
            ]
        );
        assert_eq!(
            sig("reduce.cu", "reduce_final_k").params[0].ty,
            ParamTy::Ptr(Elem::Double)
        );
    }

    #[test]
    fn parser_handles_structs_launch_bounds_and_macros() {
        let src = "#define K(N) \\\n extern \"C\" __global__ void m_##N##_k(const i64* p, long long q) {}\n\
                   K(a) K(b)\n\
                   /* __global__ in a comment */\n\
                   extern \"C\" __global__ void __launch_bounds__(32 * W<4>::X) s_k(Nf4Args w, const bf16_t* __restrict__ h, unsigned u) {}\n\
                   extern \"C\" __global__ void e_k() {}\n";
        let sigs = parse_file("t.cu", src).unwrap();
        let names: Vec<&str> = sigs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s_k", "e_k", "m_a_k", "m_b_k"]);
        assert_eq!(sigs[0].params[0].ty, ParamTy::Other("Nf4Args".into()));
        assert_eq!(
            sigs[0].params[1].ty,
            ParamTy::Ptr(Elem::Other("unsigned short".into()))
        );
        assert_eq!(sigs[0].params[2].ty, ParamTy::Other("unsigned".into()));
        assert!(sigs[1].params.is_empty());
        assert_eq!(
            sigs[2].params[0].ty,
            ParamTy::Ptr(Elem::Other("long long".into()))
        );
        assert_eq!(sigs[2].params[1].ty, ParamTy::LongLong);
        assert!(parse_file("t.cu", "__global__ void x_k(int a) {}").is_err());
    }

    use ArgKind::*;

    #[test]
    fn known_good_argument_lists_pass() {
        check_kinds("elementwise.cu", "copy_k", [TaggedBuf, TaggedBuf, I64]).unwrap();
        check_kinds("elementwise.cu", "axpy_k", [F32, TaggedBuf, TaggedBuf, I64]).unwrap();
        check_kinds("reduce.cu", "reduce_final_k", [F64Ptr, I32, F64Ptr]).unwrap();
        check_kinds("embedding.cu", "ids_check_k", [I32Ptr, I64, I32, I32Ptr]).unwrap();
        let nf4_plain = [U8Ptr, NullPtr, F32Ptr, NullPtr, F32, I32];
        let mut dq = nf4_plain.to_vec();
        dq.extend([I64, TaggedBuf]);
        check_kinds("nf4_dequant.cu", "nf4_dequant_k", dq).unwrap();
        let nested = [U8Ptr, U8Ptr, F32Ptr, F32Ptr, F32, I32];
        let mut gemv = vec![TaggedBuf];
        gemv.extend(nested);
        gemv.extend([
            TaggedBuf, I32, I32, I32, I32, TaggedBuf, TaggedBuf, I32, F32,
        ]);
        check_kinds("nf4_gemv.cu", "nf4_gemv_k", gemv.clone()).unwrap();
        check_kinds("nf4_gemm.cu", "nf4_gemm_xwt_k", gemv).unwrap();
    }

    fn err(file: &str, name: &str, k: &[ArgKind]) -> String {
        check_kinds(file, name, k.iter().copied()).unwrap_err()
    }

    #[test]
    fn known_bad_argument_lists_name_the_parameter() {
        // i64 where an int is declared (fill_k's n is `i64`, so give I32 there).
        let e = err("elementwise.cu", "fill_k", &[TaggedBuf, I32, F32]);
        assert!(
            e.contains("parameter 2 `n`") && e.contains("long long"),
            "{e}"
        );
        // Too few.
        let e = err("elementwise.cu", "copy_k", &[TaggedBuf, TaggedBuf]);
        assert!(e.contains("parameter 4 `long long n` is missing"), "{e}");
        // Too many.
        let e = err(
            "elementwise.cu",
            "copy_k",
            &[TaggedBuf, TaggedBuf, I64, F32],
        );
        assert!(e.contains("takes 5 parameters"), "{e}");
        // A typed pointer where a tagged buffer goes, and the other way round.
        let e = err("reduce.cu", "reduce_partial_k", &[F32Ptr, I64, I32, F64Ptr]);
        assert!(e.contains("parameter 0 `x`") && e.contains("void*"), "{e}");
        let e = err(
            "embedding.cu",
            "ids_check_k",
            &[TaggedBuf, I64, I32, I32Ptr],
        );
        assert!(e.contains("parameter 0 `ids`"), "{e}");
        // A null for a tagged buffer must be NullBuf (pointer + tag), not Null.
        let e = err("elementwise.cu", "scale_k", &[NullPtr, I64, F32]);
        assert!(e.contains("parameter 0 `x`"), "{e}");
        // Swapped scalars.
        let e = err("softcap.cu", "softcap_fwd_k", &[TaggedBuf, F32, I64]);
        assert!(e.contains("parameter 2 `n`"), "{e}");
        // Unknown kernel / file.
        assert!(err("elementwise.cu", "nope_k", &[]).contains("nope_k"));
        assert!(err("nope.cu", "fill_k", &[]).contains("nope.cu"));
    }

    #[test]
    fn the_launch_check_reports_a_kernel_error() {
        let e = check("softcap.cu", "softcap_fwd_k", &[Arg::I32(1)]).unwrap_err();
        match e {
            KernelError::Backend { backend, msg } => {
                assert_eq!(backend, "cuda");
                assert!(
                    msg.contains("softcap.cu") && msg.contains("softcap_fwd_k"),
                    "{msg}"
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
        check(
            "softcap.cu",
            "softcap_fwd_k",
            &[Arg::NullBuf, Arg::I64(0), Arg::F32(1.0)],
        )
        .unwrap();
    }

    /// Static check of every `Cuda::launch` call site in `cuda/*.rs`, read as text: the kernel name
    /// (a literal, or a local bound to literals / to names returned by `launch::` planners) and the
    /// argument list (an array literal, or a local `[..]` / `vec![..]` plus `.extend`/`.push`), each
    /// argument resolved to its `Arg` kind(s): constructors, helper functions (`n64`), locals bound
    /// by tuple/array patterns (`let (mask_arg, has) = match .. { .. => (Arg::Buf(..), 1), .. }`),
    /// functions returning such tuples/arrays (`nf4_args`, `seg_arg`), closures, and parameters of
    /// wrappers (`launch_adamw(p, ..)` is resolved at each of its callers). Every candidate kind of
    /// every argument is checked against every candidate kernel.
    ///
    /// Limits (documented, not guessed around): a local's binding is the nearest `let`/`for`/`if let`
    /// before the use in the same function (no block-scope analysis); an argument or name that
    /// cannot be resolved makes the site "unresolvable", and the test fails unless the site is listed
    /// in `UNRESOLVABLE` with a reason.
    mod callsites {
        use super::super::*;
        use std::collections::{BTreeSet, HashSet};

        /// Call sites that cannot be resolved statically: (file, enclosing fn, reason). Empty: every
        /// site is covered. A new unresolvable site fails the test; so does a stale entry.
        const UNRESOLVABLE: &[(&str, &str, &str)] = &[];

        /// Every .rs file of cuda/ except this one (which holds the checker and test strings).
        const FILES: &[(&str, &str)] = &[
            ("compile.rs", include_str!("compile.rs")),
            ("gemm.rs", include_str!("gemm.rs")),
            ("gpu_tests.rs", include_str!("gpu_tests.rs")),
            ("mod.rs", include_str!("mod.rs")),
            ("ops.rs", include_str!("ops.rs")),
            ("paged.rs", include_str!("paged.rs")),
        ];
        const LAUNCH_RS: &str = include_str!("../launch.rs");

        /// Comments blanked (byte positions kept), char literals' contents replaced by `x` (so a
        /// `'('` cannot unbalance brackets); string literals kept (kernel names live there).
        fn mask_rust(src: &str) -> String {
            let b = src.as_bytes();
            let mut out = b.to_vec();
            let mut i = 0;
            while i < b.len() {
                let c = b[i];
                if c == b'"' {
                    i = closing_quote(b, i, b.len());
                    i += 1;
                } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
                    while i < b.len() && b[i] != b'\n' {
                        out[i] = b' ';
                        i += 1;
                    }
                } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
                    while i < b.len() && !b[i..].starts_with(b"*/") {
                        if b[i] != b'\n' {
                            out[i] = b' ';
                        }
                        i += 1;
                    }
                    let close_end = (i + 2).min(b.len());
                    out[i..close_end].fill(b' ');
                    i += 2;
                } else if c == b'\'' {
                    // A char literal ('x', '\n', '\''), or a lifetime ('a) which is left alone.
                    let end = if b.get(i + 1) == Some(&b'\\') {
                        (i + 2..b.len().min(i + 12)).find(|&k| b[k] == b'\'')
                    } else {
                        let len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                        (b.get(i + 1 + len) == Some(&b'\'')).then_some(i + 1 + len)
                    };
                    match end {
                        Some(e) => {
                            for o in out.iter_mut().take(e).skip(i + 1) {
                                *o = b'x';
                            }
                            i = e + 1;
                        }
                        None => i += 1,
                    }
                } else {
                    i += 1;
                }
            }
            String::from_utf8(out).expect("masking replaces whole characters only")
        }

        /// Ranges (relative to `s`) of the comma-separated, trimmed, non-empty top-level pieces of `s`.
        fn split_ranges(s: &str) -> Vec<(usize, usize)> {
            let mut parts = Vec::new();
            let mut push = |a: usize, e: usize| {
                let piece = &s[a..e];
                let lead = piece.len() - piece.trim_start().len();
                let t = piece.trim();
                if !t.is_empty() {
                    parts.push((a + lead, a + lead + t.len()));
                }
            };
            let mut start = 0;
            for c in top_level_commas(s) {
                push(start, c);
                start = c + 1;
            }
            push(start, s.len());
            parts
        }

        fn is_ident(s: &str) -> bool {
            !s.is_empty()
                && s.bytes().all(is_ident_byte)
                && !s.as_bytes()[0].is_ascii_digit()
                && !matches!(s, "true" | "false" | "self" | "None")
        }

        fn word_at(s: &str, at: usize, w: &str) -> bool {
            let b = s.as_bytes();
            s[at..].starts_with(w)
                && (at == 0 || !is_ident_byte(b[at - 1]))
                && b.get(at + w.len()).is_none_or(|&c| !is_ident_byte(c))
        }

        /// Positions of whole-word `w` in `s[from..to]`, outside string literals.
        fn words(s: &str, from: usize, to: usize, w: &str) -> Vec<usize> {
            let b = s.as_bytes();
            let mut v = Vec::new();
            let mut i = from;
            while i < to {
                if b[i] == b'"' {
                    i = closing_quote(b, i, to);
                } else if word_at(s, i, w) {
                    v.push(i);
                    i += w.len();
                    continue;
                }
                i += 1;
            }
            v
        }

        /// First byte in `s[from..]` at bracket depth 0 that satisfies `stop`.
        fn find_top(s: &str, from: usize, stop: impl Fn(&[u8], usize) -> bool) -> Option<usize> {
            let b = s.as_bytes();
            let mut depth = 0i32;
            let mut i = from;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = closing_quote(b, i, b.len());
                    }
                    b'(' | b'[' => depth += 1,
                    b'{' if depth > 0 || !stop(b, i) => depth += 1,
                    b')' | b']' | b'}' if depth > 0 => depth -= 1,
                    _ if depth == 0 && stop(b, i) => return Some(i),
                    _ => {}
                }
                i += 1;
            }
            None
        }

        #[derive(Clone, Copy, Debug)]
        struct Span {
            file: usize,
            start: usize,
            end: usize,
        }

        struct FnDef {
            file: usize,
            name: String,
            params: Span,
            body: Span,
        }

        struct Binding {
            pat: String,
            init: Span,
            end: usize,
        }

        enum PatPos {
            Whole,
            Index(usize, usize),
            Nested,
        }

        pub(super) struct Analyzer {
            files: Vec<(String, String)>,
            fns: Vec<FnDef>,
            launch_rs: String,
        }

        #[derive(Debug)]
        pub(super) struct Site {
            pub(super) file: String,
            pub(super) line: usize,
            pub(super) func: String,
            pub(super) kernels: Vec<String>,
            /// Ok: checked; Err((unresolvable?, message)).
            pub(super) result: std::result::Result<(), (bool, String)>,
        }

        type R<T> = std::result::Result<T, String>;

        impl Analyzer {
            pub(super) fn new(files: &[(&str, &str)], launch_rs: &str) -> Analyzer {
                let files: Vec<(String, String)> = files
                    .iter()
                    .map(|(n, s)| (n.to_string(), mask_rust(s)))
                    .collect();
                let mut fns = Vec::new();
                for (fi, (_, text)) in files.iter().enumerate() {
                    fns.extend(Self::fn_defs(fi, text));
                }
                Analyzer {
                    files,
                    fns,
                    launch_rs: mask_rust(launch_rs),
                }
            }

            fn fn_defs(fi: usize, text: &str) -> Vec<FnDef> {
                let mut out = Vec::new();
                for at in words(text, 0, text.len(), "fn") {
                    let rest = &text[at + 2..];
                    let name_off = rest.len() - rest.trim_start().len();
                    let name: String = rest[name_off..]
                        .bytes()
                        .take_while(|&c| is_ident_byte(c))
                        .map(char::from)
                        .collect();
                    if name.is_empty() {
                        continue;
                    }
                    let mut p = at + 2 + name_off + name.len();
                    if text[p..].starts_with('<') {
                        // Generics: skip to the matching '>'.
                        let mut depth = 0;
                        for (k, c) in text[p..].bytes().enumerate() {
                            match c {
                                b'<' => depth += 1,
                                b'>' => {
                                    depth -= 1;
                                    if depth == 0 {
                                        p += k + 1;
                                        break;
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    if !text[p..].starts_with('(') {
                        continue;
                    }
                    let Some(pc) = close_of(text, p) else {
                        continue;
                    };
                    let Some(open) = find_top(text, pc + 1, |b, i| b[i] == b'{' || b[i] == b';')
                    else {
                        continue;
                    };
                    if text.as_bytes()[open] != b'{' {
                        continue;
                    }
                    let Some(close) = close_of(text, open) else {
                        continue;
                    };
                    out.push(FnDef {
                        file: fi,
                        name,
                        params: Span {
                            file: fi,
                            start: p + 1,
                            end: pc,
                        },
                        body: Span {
                            file: fi,
                            start: open + 1,
                            end: close,
                        },
                    });
                }
                out
            }

            fn text(&self, s: Span) -> &str {
                &self.files[s.file].1[s.start..s.end]
            }

            fn trim(&self, s: Span) -> Span {
                let t = self.text(s);
                let lead = t.len() - t.trim_start().len();
                Span {
                    file: s.file,
                    start: s.start + lead,
                    end: s.start + lead + t.trim().len(),
                }
            }

            /// Strips `&`, `&mut`, `*` in front and `?` behind.
            fn strip(&self, s: Span) -> Span {
                let mut s = self.trim(s);
                loop {
                    let t = self.text(s);
                    let skip = if t.starts_with("&mut ") {
                        5
                    } else if t.starts_with('&') || t.starts_with('*') {
                        1
                    } else if t.ends_with('?') {
                        s.end -= 1;
                        s = self.trim(s);
                        continue;
                    } else {
                        return s;
                    };
                    s.start += skip;
                    s = self.trim(s);
                }
            }

            fn line_of(&self, file: usize, pos: usize) -> usize {
                self.files[file].1[..pos]
                    .bytes()
                    .filter(|&c| c == b'\n')
                    .count()
                    + 1
            }

            fn enclosing_fn(&self, file: usize, pos: usize) -> Option<&FnDef> {
                self.fns
                    .iter()
                    .filter(|f| f.file == file && f.body.start <= pos && pos <= f.body.end)
                    .min_by_key(|f| f.body.end - f.body.start)
            }

            fn fn_named(&self, name: &str) -> Option<&FnDef> {
                self.fns.iter().find(|f| f.name == name)
            }

            /// `let`, `if let`, `while let` and `for` bindings in `f`'s body that end before `pos`.
            fn bindings(&self, f: &FnDef, pos: usize) -> Vec<Binding> {
                let text = &self.files[f.file].1;
                let mut out = Vec::new();
                for at in words(text, f.body.start, pos, "let") {
                    let before = text[f.body.start..at].trim_end();
                    let cond = before.ends_with("if") || before.ends_with("while");
                    let Some(eq) = find_top(text, at + 3, |b, i| {
                        b[i] == b'='
                            && !matches!(b.get(i + 1), Some(b'=') | Some(b'>'))
                            && !matches!(b[i - 1], b'=' | b'!' | b'<' | b'>')
                    }) else {
                        continue;
                    };
                    let end = if cond {
                        find_top(text, eq + 1, |b, i| b[i] == b'{')
                    } else {
                        find_top(text, eq + 1, |b, i| b[i] == b';')
                    };
                    let Some(end) = end else { continue };
                    if end > pos {
                        continue;
                    }
                    let mut pat = text[at + 3..eq].trim().to_string();
                    if let Some(c) = find_top(&pat, 0, |b, i| {
                        b[i] == b':' && b.get(i + 1) != Some(&b':') && b[i - 1] != b':'
                    }) {
                        pat.truncate(c);
                    }
                    out.push(Binding {
                        pat: pat.trim().to_string(),
                        init: Span {
                            file: f.file,
                            start: eq + 1,
                            end,
                        },
                        end,
                    });
                }
                for at in words(text, f.body.start, pos, "for") {
                    let Some(inw) = words(text, at, pos, "in").first().copied() else {
                        continue;
                    };
                    let Some(end) = find_top(text, inw + 2, |b, i| b[i] == b'{') else {
                        continue;
                    };
                    if end > pos {
                        continue;
                    }
                    out.push(Binding {
                        pat: text[at + 3..inw].trim().to_string(),
                        init: Span {
                            file: f.file,
                            start: inw + 2,
                            end,
                        },
                        end,
                    });
                }
                out.sort_by_key(|b| b.end);
                out
            }

            /// The nearest binding of `id` before `pos` in the enclosing function.
            fn binding(&self, id: &str, file: usize, pos: usize) -> Option<(Binding, PatPos)> {
                let f = self.enclosing_fn(file, pos)?;
                let b = self
                    .bindings(f, pos)
                    .into_iter()
                    .rev()
                    .find(|b| !words(&b.pat, 0, b.pat.len(), id).is_empty())?;
                let strip_mut = |s: &str| s.trim().trim_start_matches("mut ").trim().to_string();
                let p = strip_mut(&b.pat);
                let pos = if p == id {
                    PatPos::Whole
                } else if (p.starts_with('(') || p.starts_with('['))
                    && close_of(&p, 0) == Some(p.len() - 1)
                {
                    let elems = split_top(&p[1..p.len() - 1]);
                    match elems.iter().position(|e| strip_mut(e) == id) {
                        Some(i) => PatPos::Index(i, elems.len()),
                        None => PatPos::Nested,
                    }
                } else {
                    PatPos::Nested
                };
                Some((b, pos))
            }

            /// `Arg::Variant` or `Arg::Variant(..)` spanning all of `t`.
            fn arg_ctor(t: &str) -> Option<R<ArgKind>> {
                let rest = t.strip_prefix("Arg::")?;
                let n = rest.bytes().take_while(|&c| is_ident_byte(c)).count();
                let tail = &rest[n..];
                if !(tail.is_empty()
                    || (tail.starts_with('(') && close_of(tail, 0) == Some(tail.len() - 1)))
                {
                    return None;
                }
                Some(match &rest[..n] {
                    "Buf" | "BufAt" | "NullBuf" => Ok(ArgKind::TaggedBuf),
                    "Null" => Ok(ArgKind::NullPtr),
                    "I32s" | "I32sAt" => Ok(ArgKind::I32Ptr),
                    "U8s" => Ok(ArgKind::U8Ptr),
                    "F32s" => Ok(ArgKind::F32Ptr),
                    "F64s" => Ok(ArgKind::F64Ptr),
                    "I32" => Ok(ArgKind::I32),
                    "I64" => Ok(ArgKind::I64),
                    "F32" => Ok(ArgKind::F32),
                    v => Err(format!("unknown Arg variant `{v}`: add it to the analyzer")),
                })
            }

            /// `path::name(args)` spanning all of `t`: (name, offset of '(').
            fn as_call(t: &str) -> Option<(&str, usize)> {
                let open = t.find('(')?;
                let path = &t[..open];
                if path.is_empty()
                    || !path.bytes().all(|c| is_ident_byte(c) || c == b':')
                    || close_of(t, open) != Some(t.len() - 1)
                {
                    return None;
                }
                Some((path.rsplit("::").next().unwrap_or(path), open))
            }

            /// Every `Arg::X` constructor in `s`.
            fn ctors(&self, s: Span) -> R<BTreeSet<ArgKind>> {
                let t = self.text(s);
                let mut set = BTreeSet::new();
                for at in words(t, 0, t.len(), "Arg") {
                    if !t[at..].starts_with("Arg::") {
                        continue;
                    }
                    let n = t[at + 5..]
                        .bytes()
                        .take_while(|&c| is_ident_byte(c))
                        .count();
                    let piece = &t[at..at + 5 + n];
                    match Self::arg_ctor(piece) {
                        Some(k) => {
                            set.insert(k?);
                        }
                        None => return Err(format!("cannot read `{piece}`")),
                    }
                }
                if set.is_empty() {
                    Err(format!("no Arg constructor in `{}`", t.trim()))
                } else {
                    Ok(set)
                }
            }

            /// The kinds one argument expression can have.
            fn kinds(&self, e: Span, depth: usize) -> R<BTreeSet<ArgKind>> {
                if depth > 12 {
                    return Err("resolution too deep".into());
                }
                let s = self.strip(e);
                let t = self.text(s);
                if let Some(k) = Self::arg_ctor(t) {
                    return Ok([k?].into());
                }
                if is_ident(t) {
                    return self.ident_kinds(t, s, depth);
                }
                if let Some((name, _)) = Self::as_call(t) {
                    if let Some((b, PatPos::Whole)) = self.binding(name, s.file, s.start) {
                        return self.ctors(b.init); // a closure bound to a local
                    }
                    if let Some(f) = self.fn_named(name) {
                        return self.ctors(f.body); // a helper such as n64
                    }
                }
                Err(format!("cannot resolve the argument `{t}`"))
            }

            fn ident_kinds(&self, id: &str, at: Span, depth: usize) -> R<BTreeSet<ArgKind>> {
                if let Some((b, pos)) = self.binding(id, at.file, at.start) {
                    return match pos {
                        PatPos::Whole => {
                            let init = self.strip(b.init);
                            let t = self.text(init);
                            if Self::arg_ctor(t).is_some()
                                || is_ident(t)
                                || Self::as_call(t).is_some()
                            {
                                self.kinds(init, depth + 1)
                            } else {
                                self.ctors(init)
                            }
                        }
                        PatPos::Index(i, n) => self.positional(b.init, i, n, depth + 1),
                        PatPos::Nested => {
                            Err(format!("`{id}` is bound by the nested pattern `{}`", b.pat))
                        }
                    };
                }
                // A parameter of the enclosing function: resolve at each caller.
                let f = self
                    .enclosing_fn(at.file, at.start)
                    .ok_or_else(|| format!("`{id}` outside any function"))?;
                let params: Vec<String> = split_top(self.text(f.params))
                    .into_iter()
                    .filter(|p| {
                        !p.trim_start_matches('&')
                            .trim_start_matches("mut ")
                            .starts_with("self")
                    })
                    .map(|p| {
                        p.split(':')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .trim_start_matches("mut ")
                            .to_string()
                    })
                    .collect();
                let pi = params.iter().position(|p| p == id).ok_or_else(|| {
                    format!("`{id}` is neither a local nor a parameter of `{}`", f.name)
                })?;
                let mut set = BTreeSet::new();
                let mut callers = 0;
                for (fi, (_, text)) in self.files.iter().enumerate() {
                    for at in words(text, 0, text.len(), &f.name) {
                        let b = text.as_bytes();
                        let dotted =
                            at > 0 && (b[at - 1] == b'.' || (at > 1 && &text[at - 2..at] == "::"));
                        let open = at + f.name.len();
                        if !dotted || b.get(open) != Some(&b'(') {
                            continue;
                        }
                        let close = close_of(text, open).ok_or("unbalanced call")?;
                        let args = split_ranges(&text[open + 1..close]);
                        let (a0, a1) = *args.get(pi).ok_or_else(|| {
                            format!("a call of `{}` has no argument {pi}", f.name)
                        })?;
                        let arg = Span {
                            file: fi,
                            start: open + 1 + a0,
                            end: open + 1 + a1,
                        };
                        set.extend(self.kinds(arg, depth + 1)?);
                        callers += 1;
                    }
                }
                if callers == 0 {
                    return Err(format!("`{}` (parameter `{id}`) has no caller", f.name));
                }
                Ok(set)
            }

            /// Element `i` of the n-tuples / n-arrays `init` evaluates to.
            fn positional(
                &self,
                init: Span,
                i: usize,
                n: usize,
                depth: usize,
            ) -> R<BTreeSet<ArgKind>> {
                if depth > 12 {
                    return Err("resolution too deep".into());
                }
                let s = self.strip(init);
                let t = self.text(s);
                if is_ident(t) {
                    return match self.binding(t, s.file, s.start) {
                        Some((b, PatPos::Whole)) => self.positional(b.init, i, n, depth + 1),
                        _ => Err(format!("cannot resolve `{t}`")),
                    };
                }
                if let Some((name, _)) = Self::as_call(t) {
                    if let Some(f) = self.fn_named(name) {
                        return self.positional(f.body, i, n, depth + 1);
                    }
                }
                // Tuple and array literals: a bracket not preceded by an identifier, `!`, `)` or
                // `]` (which would make it a call, macro or index).
                let b = t.as_bytes();
                let mut set = BTreeSet::new();
                let mut found = 0;
                for (k, &c) in b.iter().enumerate() {
                    if c != b'(' && c != b'[' {
                        continue;
                    }
                    let prev = t[..k].trim_end().bytes().last();
                    if prev.is_some_and(|p| is_ident_byte(p) || matches!(p, b'!' | b')' | b']')) {
                        continue;
                    }
                    let Some(close) = close_of(t, k) else {
                        continue;
                    };
                    // A match arm's pattern (`Some((xa, b)) =>`) binds, it does not evaluate.
                    let after =
                        t[close + 1..].trim_start_matches(|c: char| c == ')' || c.is_whitespace());
                    if after.starts_with("=>") || after.starts_with("if ") {
                        continue;
                    }
                    let elems = split_ranges(&t[k + 1..close]);
                    if elems.len() != n {
                        continue;
                    }
                    let (a, e) = elems[i];
                    set.extend(self.kinds(
                        Span {
                            file: s.file,
                            start: s.start + k + 1 + a,
                            end: s.start + k + 1 + e,
                        },
                        depth + 1,
                    )?);
                    found += 1;
                }
                if found == 0 {
                    return Err(format!("no {n}-tuple/array in `{}`", t.trim()));
                }
                Ok(set)
            }

            /// Kernel names in the `_k"` literals of `launch.rs`'s function `name`.
            fn planner_names(&self, name: &str, out: &mut BTreeSet<String>) {
                let t = &self.launch_rs;
                for f in Self::fn_defs(0, t) {
                    if f.name == name {
                        Self::literal_names(&t[f.body.start..f.body.end], out);
                    }
                }
            }

            fn literal_names(t: &str, out: &mut BTreeSet<String>) {
                let mut rest = t;
                while let Some(p) = rest.find('"') {
                    let after = &rest[p + 1..];
                    let Some(q) = after.find('"') else { break };
                    let lit = &after[..q];
                    if lit.ends_with("_k") && lit.bytes().all(is_ident_byte) {
                        out.insert(lit.to_string());
                    }
                    rest = &after[q + 1..];
                }
            }

            /// Candidate kernel names of an expression: its literals, names from `launch::` planners
            /// it calls, and (recursively) those of the locals it mentions.
            fn names(
                &self,
                e: Span,
                depth: usize,
                seen: &mut HashSet<usize>,
                out: &mut BTreeSet<String>,
            ) {
                if depth > 8 {
                    return;
                }
                let t = self.text(e);
                Self::literal_names(t, out);
                let b = t.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if is_ident_byte(b[i]) && (i == 0 || !is_ident_byte(b[i - 1])) {
                        let n = t[i..].bytes().take_while(|&c| is_ident_byte(c)).count();
                        let w = &t[i..i + n];
                        let after = &t[i + n..];
                        let member = i > 0 && (b[i - 1] == b'.' || (i > 1 && &t[i - 2..i] == "::"));
                        if t[..i].ends_with("launch::") && after.starts_with('(') {
                            self.planner_names(w, out);
                        } else if !member
                            && !after.starts_with('(')
                            && !after.starts_with("::")
                            && is_ident(w)
                        {
                            if let Some((bnd, _)) = self.binding(w, e.file, e.start + i) {
                                if seen.insert(bnd.init.start) {
                                    self.names(bnd.init, depth + 1, seen, out);
                                }
                            }
                        }
                        i += n;
                    } else {
                        i += 1;
                    }
                }
            }

            /// The argument list: elements with a flag "passed through clone_scalar".
            fn arg_list(&self, e: Span, call: usize, depth: usize) -> R<Vec<(Span, bool)>> {
                if depth > 4 {
                    return Err("argument list resolution too deep".into());
                }
                let s = self.strip(e);
                let t = self.text(s);
                let elems_of = |s: Span| -> R<Vec<(Span, bool)>> {
                    let t = self.text(s);
                    let t2 = t.strip_prefix("vec!").unwrap_or(t);
                    let off = t.len() - t2.len();
                    if !t2.starts_with('[') || close_of(t2, 0) != Some(t2.len() - 1) {
                        return Err(format!(
                            "the argument list `{}` is not an array literal",
                            t.trim()
                        ));
                    }
                    Ok(split_ranges(&t2[1..t2.len() - 1])
                        .into_iter()
                        .map(|(a, b)| {
                            (
                                Span {
                                    file: s.file,
                                    start: s.start + off + 1 + a,
                                    end: s.start + off + 1 + b,
                                },
                                false,
                            )
                        })
                        .collect())
                };
                if t.starts_with('[') || t.starts_with("vec!") {
                    return elems_of(s);
                }
                if !is_ident(t) {
                    return Err(format!("cannot resolve the argument list `{t}`"));
                }
                let Some((b, PatPos::Whole)) = self.binding(t, s.file, s.start) else {
                    return Err(format!("no plain binding of the argument list `{t}`"));
                };
                let mut list = elems_of(self.strip(b.init))?;
                // Mutations between the binding and the launch.
                let text = &self.files[s.file].1;
                for at in words(text, b.end, call, t) {
                    let rest = &text[at + t.len()..];
                    if !rest.starts_with('.') {
                        continue;
                    }
                    let m: String = rest[1..]
                        .bytes()
                        .take_while(|&c| is_ident_byte(c))
                        .map(char::from)
                        .collect();
                    let open = at + t.len() + 1 + m.len();
                    match m.as_str() {
                        "iter" | "len" | "is_empty" => {}
                        "push" | "extend" => {
                            let close = close_of(text, open).ok_or("unbalanced call")?;
                            let inner = self.trim(Span {
                                file: s.file,
                                start: open + 1,
                                end: close,
                            });
                            if m == "push" {
                                list.push((inner, false));
                            } else {
                                let it = self.text(inner);
                                let src = it
                                    .strip_suffix(".iter().map(clone_scalar)")
                                    .ok_or_else(|| format!("cannot read `{t}.extend({it})`"))?;
                                let inner = Span {
                                    end: inner.start + src.len(),
                                    ..inner
                                };
                                list.extend(
                                    self.arg_list(inner, call, depth + 1)?
                                        .into_iter()
                                        .map(|(sp, _)| (sp, true)),
                                );
                            }
                        }
                        other => {
                            return Err(format!("`{t}.{other}(..)` changes the argument list"))
                        }
                    }
                }
                Ok(list)
            }

            fn check_site(
                &self,
                file: usize,
                open: usize,
                close: usize,
            ) -> std::result::Result<Vec<String>, (bool, String, Vec<String>)> {
                let text = &self.files[file].1;
                let args: Vec<Span> = split_ranges(&text[open + 1..close])
                    .into_iter()
                    .map(|(a, b)| Span {
                        file,
                        start: open + 1 + a,
                        end: open + 1 + b,
                    })
                    .collect();
                let unres = |m: String| (true, m, Vec::new());
                if args.len() != 4 {
                    return Err(unres(format!(
                        "{} arguments, expected (file, name, launch, args)",
                        args.len()
                    )));
                }
                let ft = self.text(args[0]);
                let kfile = ft
                    .strip_prefix('"')
                    .and_then(|f| f.strip_suffix('"'))
                    .ok_or_else(|| unres(format!("the file `{ft}` is not a string literal")))?;
                let mut names = BTreeSet::new();
                let nt = self.text(args[1]);
                if nt.starts_with('"') {
                    Self::literal_names(nt, &mut names);
                } else if is_ident(nt) {
                    match self.binding(nt, file, args[1].start) {
                        Some((b, _)) => self.names(b.init, 0, &mut HashSet::new(), &mut names),
                        None => {
                            return Err(unres(format!(
                                "the kernel name `{nt}` has no local binding"
                            )))
                        }
                    }
                }
                if names.is_empty() {
                    return Err(unres(format!("no kernel name found for `{nt}`")));
                }
                let names: Vec<String> = names.into_iter().collect();
                let list = self.arg_list(args[3], args[3].start, 0).map_err(unres)?;
                let mut kinds = Vec::new();
                for (sp, cloned) in &list {
                    let mut ks = self.kinds(*sp, 0).map_err(unres)?;
                    if *cloned {
                        // clone_scalar keeps I32/I64/F32 and turns anything else into Arg::Null.
                        ks = ks
                            .into_iter()
                            .map(|k| {
                                if matches!(k, ArgKind::I32 | ArgKind::I64 | ArgKind::F32) {
                                    k
                                } else {
                                    ArgKind::NullPtr
                                }
                            })
                            .collect();
                    }
                    kinds.push(ks);
                }
                for name in &names {
                    let sig = lookup(kfile, name).map_err(|e| (false, e, names.clone()))?;
                    let mut at = 0;
                    for (ai, ks) in kinds.iter().enumerate() {
                        let mut width = None;
                        for &k in ks {
                            let w = match_slot(kfile, sig, at, ai, k)
                                .map_err(|e| (false, e, names.clone()))?;
                            if width.is_some_and(|x| x != w) {
                                return Err((
                                    true,
                                    format!("argument {ai} may push 1 or 2 values ({ks:?})"),
                                    names.clone(),
                                ));
                            }
                            width = Some(w);
                        }
                        at += width.unwrap_or(0);
                    }
                    check_complete(kfile, sig, at, kinds.len())
                        .map_err(|e| (false, e, names.clone()))?;
                }
                Ok(names)
            }

            pub(super) fn sites(&self) -> Vec<Site> {
                let mut out = Vec::new();
                for (fi, (fname, text)) in self.files.iter().enumerate() {
                    for at in words(text, 0, text.len(), "launch") {
                        let b = text.as_bytes();
                        let open = at + "launch".len();
                        if at == 0 || b[at - 1] != b'.' || b.get(open) != Some(&b'(') {
                            continue;
                        }
                        let Some(close) = close_of(text, open) else {
                            continue;
                        };
                        // cudarc's LaunchArgs::launch(cfg) inside Cuda::launch itself.
                        if text[open + 1..close].trim() == "cfg" {
                            continue;
                        }
                        let func = self
                            .enclosing_fn(fi, at)
                            .map_or_else(|| "?".to_string(), |f| f.name.clone());
                        let (kernels, result) = match self.check_site(fi, open, close) {
                            Ok(k) => (k, Ok(())),
                            Err((u, m, k)) => (k, Err((u, m))),
                        };
                        out.push(Site {
                            file: fname.clone(),
                            line: self.line_of(fi, at),
                            func,
                            kernels,
                            result,
                        });
                    }
                }
                out
            }
        }

        #[test]
        fn every_launch_call_site_matches_its_kernel() {
            let a = Analyzer::new(FILES, LAUNCH_RS);
            let sites = a.sites();
            let mut failures = Vec::new();
            let mut unresolved = Vec::new();
            let mut kernels = BTreeSet::new();
            for s in &sites {
                match &s.result {
                    Ok(()) => kernels.extend(s.kernels.iter().cloned()),
                    Err((true, m)) => {
                        if UNRESOLVABLE
                            .iter()
                            .any(|(f, func, _)| *f == s.file && *func == s.func)
                        {
                            unresolved.push((s.file.clone(), s.func.clone()));
                        } else {
                            failures.push(format!(
                                "{}:{} in `{}`: UNRESOLVABLE: {m}",
                                s.file, s.line, s.func
                            ));
                        }
                    }
                    Err((false, m)) => failures.push(format!(
                        "{}:{} in `{}`: MISMATCH: {m}",
                        s.file, s.line, s.func
                    )),
                }
            }
            for (f, func, why) in UNRESOLVABLE {
                assert!(
                    unresolved.iter().any(|(a, b)| a == f && b == func),
                    "UNRESOLVABLE lists {f} `{func}` ({why}), which is now resolved: remove it"
                );
            }
            assert!(
                failures.is_empty(),
                "kernel argument mismatches:\n{}",
                failures.join("\n")
            );
            // Not vacuous: the sites of all of cuda/ were found and checked (41 when written).
            assert!(sites.len() >= 41, "only {} launch sites found", sites.len());
            eprintln!(
                "{} launch sites checked against {} kernels",
                sites.len(),
                kernels.len()
            );
            // Every kernel is launched from somewhere (a kernel no site reaches is dead code or a
            // site the analyzer silently missed).
            let sigs = signatures().unwrap();
            for (file, ks) in sigs {
                for k in ks.keys() {
                    assert!(
                        kernels.contains(k),
                        "{file}: kernel `{k}` is launched by no checked site"
                    );
                }
            }
        }

        #[test]
        fn every_rust_file_of_cuda_is_scanned() {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda");
            let Ok(entries) = std::fs::read_dir(dir) else {
                eprintln!("skipped: no source tree at {dir}");
                return;
            };
            let mut on_disk: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".rs") && n != "signature.rs")
                .collect();
            on_disk.sort();
            let listed: Vec<&str> = FILES.iter().map(|(n, _)| *n).collect();
            assert_eq!(
                listed, on_disk,
                "FILES in signature.rs must list every cuda/*.rs (sorted)"
            );
        }

        /// Single-token mutations of the real sources, each a bug the GPU would not report: the
        /// analyzer must flag the site it breaks (and only sites in the mutated function).
        #[test]
        fn mutations_of_the_real_sources_are_caught() {
            let cases: &[(&str, &str, &str, &str)] = &[
                // (file, from, to, the functions whose sites may fail: at least one must)
                ("ops.rs", "Arg::F32(sc.w1),", "Arg::I32(0),", "launch_adamw"),
                ("paged.rs", "Arg::BufAt(g, off),", "Arg::F32s(&delta),", "launch_adamw"),
                ("ops.rs", "Some(sg) => Arg::I32s(&sg.data),\n                    None => Arg::Null,\n                };\n                for", "Some(sg) => Arg::I32s(&sg.data),\n                    None => Arg::NullBuf,\n                };\n                for", "attn_bwd"),
                ("ops.rs", "Arg::F32(0.0),\n                Arg::I32(0),", "Arg::F32(0.0),\n                Arg::I64(0),", "nf4_forward nf4_backward nf4_dequantize"),
                ("ops.rs", "&[Arg::Buf(x), n64(x.len), Arg::F32(alpha)]", "&[Arg::Buf(x), Arg::F32(alpha), n64(x.len)]", "scale"),
                ("gemm.rs", "Arg::I64(lda as i64),", "Arg::I32(lda as i32),", "gemm"),
                ("ops.rs", "\"attn_fwd_k\")", "\"attn_bwd_dq_k\")", "attn_fwd"),
            ];
            for (file, from, to, func) in cases {
                let files: Vec<(&str, String)> = FILES
                    .iter()
                    .map(|(n, s)| {
                        let s = if n == file {
                            assert!(
                                s.contains(from),
                                "{file} no longer contains `{from}`: update this test"
                            );
                            s.replacen(from, to, 1)
                        } else {
                            s.to_string()
                        };
                        (*n, s)
                    })
                    .collect();
                let refs: Vec<(&str, &str)> = files.iter().map(|(n, s)| (*n, s.as_str())).collect();
                let sites = Analyzer::new(&refs, LAUNCH_RS).sites();
                let bad: Vec<&Site> = sites.iter().filter(|s| s.result.is_err()).collect();
                assert!(!bad.is_empty(), "{file}: `{from}` -> `{to}` was not caught");
                for s in bad {
                    assert!(
                        func.split(' ').any(|f| f == s.func),
                        "{file}: `{from}` -> `{to}` flagged {s:?}"
                    );
                }
            }
        }

        fn analyze(src: &str) -> Vec<Site> {
            Analyzer::new(&[("t.rs", src)], LAUNCH_RS).sites()
        }

        #[test]
        fn the_analyzer_finds_planted_mismatches() {
            let good = r#"
                fn n64(n: usize) -> Arg<'static> { Arg::I64(n as i64) }
                impl Cuda {
                    fn wrap(&self, x: Arg<'_>, n: usize) -> Result<()> {
                        self.launch("elementwise.cu", "fill_k", l, &[x, n64(n), Arg::F32(0.0)])
                    }
                    fn a(&self, b: &CudaBuf, flag: bool) -> Result<()> {
                        let k = if flag { "scale_k" } else { "fill_k" };
                        let (p, _) = match b { _ => (Arg::Buf(b), 1) };
                        self.launch("elementwise.cu", k, l, &[p, n64(3), Arg::F32(1.0)])?;
                        let mut args = vec![Arg::Buf(b), Arg::Buf(b)];
                        let tail = [Arg::I64(1)];
                        args.extend(tail.iter().map(clone_scalar));
                        self.launch("elementwise.cu", "copy_k", l, &args)?;
                        self.wrap(Arg::NullBuf, 4)
                    }
                }"#;
            let sites = analyze(good);
            assert_eq!(sites.len(), 3);
            for s in &sites {
                assert!(s.result.is_ok(), "{s:?}");
            }
            assert_eq!(sites[1].kernels, ["fill_k", "scale_k"]);

            // The wrapper called with a non-buffer; a tuple element of the wrong kind; a scalar
            // list one short; an unknown local.
            let bad = good
                .replace("self.wrap(Arg::NullBuf, 4)", "self.wrap(Arg::I32(0), 4)")
                .replace("(Arg::Buf(b), 1)", "(Arg::F32s(b), 1)")
                .replace("[Arg::I64(1)]", "[]")
                .replace("Arg::F32(1.0)]", "mystery]");
            let sites = analyze(&bad);
            let msgs: Vec<String> = sites.iter().map(|s| format!("{:?}", s.result)).collect();
            assert!(
                msgs[0].contains("false") && msgs[0].contains("parameter 0 `x`"),
                "{}",
                msgs[0]
            );
            assert!(
                msgs[1].contains("true") && msgs[1].contains("mystery"),
                "{}",
                msgs[1]
            );
            assert!(
                msgs[2].contains("parameter 4 `long long n` is missing"),
                "{}",
                msgs[2]
            );
            let bad2 = good.replace("(Arg::Buf(b), 1)", "(Arg::F32s(b), 1)");
            let s = &analyze(&bad2)[1];
            assert!(
                format!("{:?}", s.result).contains("float* (Arg::F32s)"),
                "{s:?}"
            );
        }
    }
}
