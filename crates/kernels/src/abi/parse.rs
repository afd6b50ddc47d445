//! A reader of the kernels' parameter lists in the .cu text, for the test that checks abi/mod.rs's
//! declarations against them (test-only: nothing reads the sources at run time).
//!
//! `parse_file` finds every `extern "C" __global__` kernel of one source: comments are dropped, line
//! continuations joined, function-like macros whose body declares a kernel (`ATTN_FWD_MMA(DIM)` in
//! attention.cu) expanded with `##` pasting, `__launch_bounds__(…)` skipped, and the `typedef`s of
//! common.cuh and the file (`i64`, `u8`, `bf16_t`, ...) resolved. A parameter type outside the ABI
//! (e.g. a struct passed by value) is parsed as `Other`, which no declared kind matches.

use super::COMMON;
use std::collections::HashMap;
use std::fmt;

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
pub(crate) struct CParam {
    pub(crate) ty: ParamTy,
    pub(crate) name: String,
}

#[derive(Clone, Debug)]
pub(crate) struct Signature {
    pub(crate) name: String,
    pub(crate) params: Vec<CParam>,
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
fn parse_param(p: &str, defs: &HashMap<String, String>) -> std::result::Result<CParam, String> {
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
    Ok(CParam { ty, name })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::SOURCES;

    fn sig(file: &str, name: &str) -> Signature {
        let src = SOURCES.iter().find(|(f, _)| *f == file).unwrap().1;
        parse_file(file, src)
            .unwrap()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
    }

    #[test]
    fn every_kernel_in_every_file_parses() {
        let mut total = 0;
        for (file, src) in SOURCES {
            let kernels = parse_file(file, src).unwrap();
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
            for s in &kernels {
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
        // 36 kernels written out, plus 5 + 15 attention kernels from ATTN_FWD_MMA / ATTN_BWD_MMA and
        // 2 + 8 from ATTN_FWD_FLASH / ATTN_BWD_FLASH (attention_flash.cu).
        assert_eq!(total, 66, "kernel count changed: update this test");
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
}
