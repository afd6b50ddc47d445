//! The bundle's `run.sh`, rendered from `xtask/gpu/run.sh.in` (a bash script kept as a file so it can be
//! read and linted as one) by filling in the test binaries and the default test filter.

/// The template; `@TESTS@` = space-separated test binaries in `bin/`, `@FILTER@` = default filter.
const TEMPLATE: &str = include_str!("../../gpu/run.sh.in");

/// Glob by which run.sh finds the bench binary in `bin/` (named `<package>-gpu_bench` by the builder).
pub const BENCH_GLOB_SUFFIX: &str = "-gpu_bench";

/// The script run on the GPU machine. Dependency-free: bash, coreutils, grep, awk, tar; python3 only
/// for the side-by-side stage.
pub fn render(tests: &[&str], all_tests: bool) -> String {
    TEMPLATE
        .replace("@TESTS@", &tests.join(" "))
        .replace("@FILTER@", if all_tests { "" } else { "cuda" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu_bundle::sbs::{SBS_FILES, WHEEL_DIR};
    use crate::gpu_bundle::BIN_ARCHIVE;
    use std::process::Command;

    #[test]
    fn lists_every_binary_and_the_default_filter() {
        let s = render(
            &["afinar-kernels-ops_linear", "afinar-kernels-afinar_kernels"],
            false,
        );
        assert!(s.contains("for t in afinar-kernels-ops_linear afinar-kernels-afinar_kernels; do"));
        assert!(s.contains("OUT=\"${OUT:-$PWD/results}\""));
        assert!(s.contains("AFINAR_TEST_FILTER-cuda}"));
        assert!(render(&["x"], true).contains("AFINAR_TEST_FILTER-}"));
        assert!(!s.contains('@'), "a placeholder was left unfilled");
    }

    #[test]
    fn bash_parses_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.sh");
        std::fs::write(&p, render(&["a", "b"], false)).unwrap();
        let out = Command::new("bash").arg("-n").arg(&p).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n run.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every `$HERE/…` path run.sh uses is one the bundle writes (`BUILD_INFO`, the packed binaries, a
    /// file of `sbs/`, the wheel), and every `$BIN/…` one a binary it packs (a test binary `$t`, the CLI,
    /// the bench). `$HERE/..` (a repo copy next to the bundle) is optional and guarded in the script.
    #[test]
    fn references_only_what_the_bundle_builds() {
        let s = render(&["t1"], false).replace('"', "");
        let mut here: Vec<String> = vec![
            "BUILD_INFO".into(),
            "bin".into(),
            BIN_ARCHIVE.into(),
            "sbs".into(),
            format!("{WHEEL_DIR}/bitsandbytes-*.whl"),
        ];
        here.extend(SBS_FILES.iter().map(|(name, _)| format!("sbs/{name}")));
        let bin: Vec<String> = vec![
            "$t".into(),
            "afinar".into(),
            format!("*{BENCH_GLOB_SUFFIX}"),
        ];
        let mut seen = 0;
        for (prefix, allowed) in [("$HERE/", &here), ("$BIN/", &bin)] {
            for (i, _) in s.match_indices(prefix) {
                let rest = &s[i + prefix.len()..];
                let end = rest
                    .find(|c: char| c.is_whitespace() || matches!(c, ')' | ';' | '|' | '>'))
                    .unwrap_or(rest.len());
                let path = &rest[..end];
                if path.starts_with("..") {
                    continue;
                }
                assert!(
                    allowed.iter().any(|a| a == path),
                    "run.sh uses {prefix}{path}, which the bundle does not build"
                );
                seen += 1;
            }
        }
        assert!(seen >= 10, "the scan found only {seen} bundle paths");
        for needed in [
            "$HERE/sbs/sbs.py",
            "$HERE/sbs/afinar-sbs.toml",
            "$BIN/afinar",
            "$HERE/bin.tar.xz",
        ] {
            assert!(s.contains(needed), "run.sh no longer uses {needed}");
        }
    }
}
