//! Writing an adapter directory as peft's `save_pretrained` does, atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{PeftAdapter, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME};
use crate::error::{GemmaError, Result};
use crate::params::ParamId;
use crate::safetensors_io::TensorOut;

impl PeftAdapter {
    /// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir` atomically (a temporary
    /// sibling directory renamed over `dir`; an existing `dir` is replaced).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let r = self.config.r;
        let mut outs = Vec::with_capacity(self.tensors.len() * 2);
        for (&(layer, target), p) in &self.tensors {
            if p.a.len() != r * p.in_features {
                return Err(GemmaError::ShapeMismatch {
                    name: ParamId::LoraA { layer, target }.name(),
                    expected: vec![r, p.in_features],
                    found: vec![p.a.len()],
                });
            }
            if p.b.len() != p.out_features * r {
                return Err(GemmaError::ShapeMismatch {
                    name: ParamId::LoraB { layer, target }.name(),
                    expected: vec![p.out_features, r],
                    found: vec![p.b.len()],
                });
            }
            outs.push(TensorOut::f32(
                ParamId::LoraA { layer, target }.name(),
                vec![r, p.in_features],
                &p.a,
            ));
            outs.push(TensorOut::f32(
                ParamId::LoraB { layer, target }.name(),
                vec![p.out_features, r],
                &p.b,
            ));
        }
        outs.sort_by(|x, y| x.name.cmp(&y.name));
        let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let json = self.config.to_json_string();
        write_dir_atomically(dir, |tmp| {
            crate::safetensors_io::write_safetensors(
                &tmp.join(ADAPTER_WEIGHTS_NAME),
                &outs,
                Some(&meta),
            )?;
            let p = tmp.join(ADAPTER_CONFIG_NAME);
            std::fs::write(&p, json.as_bytes()).map_err(|e| GemmaError::io(&p, e))
        })
    }
}

/// Creates `dir` atomically: `fill` writes into a fresh temporary sibling directory, which is then renamed
/// to `dir` (an existing `dir` is moved aside first and removed after the rename). On error the temporary
/// directory is removed and `dir` is left as it was.
pub(crate) fn write_dir_atomically(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| GemmaError::io(&parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp = parent.join(format!(".{name}.tmp-{unique}"));
    std::fs::create_dir(&tmp).map_err(|e| GemmaError::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| {
        // Flush file contents before the rename makes them visible under the final name.
        for entry in std::fs::read_dir(&tmp).map_err(|e| GemmaError::io(&tmp, e))? {
            let p = entry.map_err(|e| GemmaError::io(&tmp, e))?.path();
            if p.is_file() {
                std::fs::File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| GemmaError::io(&p, e))?;
            }
        }
        if dir.exists() {
            let old = parent.join(format!(".{name}.old-{unique}"));
            std::fs::rename(dir, &old).map_err(|e| GemmaError::io(dir, e))?;
            if let Err(e) = std::fs::rename(&tmp, dir) {
                // Put the previous directory back.
                let _ = std::fs::rename(&old, dir);
                return Err(GemmaError::io(dir, e));
            }
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(|e| GemmaError::io(&old, e))
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| GemmaError::io(dir, e))
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
