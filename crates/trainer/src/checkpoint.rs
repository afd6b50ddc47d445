//! Checkpoints: everything an exact resume needs, written atomically.
//!
//! Layout of `RUN/checkpoints/step-00000042/`:
//! - `tensors.safetensors` — F32 tensors `param/<name>`, `adam_m/<name>`, `adam_v/<name>` for every
//!   trainable tensor (bit-exact: f32 bytes are copied, never converted);
//! - `trainer_state.json` — [`TrainerState`]: optimizer step, schedule, RNG state, data cursor, counters;
//! - `config.toml` — the resolved config of the run that wrote it (resume refuses a different one).
//!
//! Atomicity: the directory is first written as `.tmp-step-…-<pid>` (files fsynced), then renamed to
//! its final name, so a crash leaves either a complete checkpoint or a `.tmp-*` directory that is
//! ignored (and cleaned up by the next save). Only the last `keep` checkpoints are kept.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("no checkpoint in {0} (looked for checkpoints/step-*/)")]
    NoCheckpoint(PathBuf),
}

type Result<T> = std::result::Result<T, CheckpointError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A ChaCha RNG position: seed, stream and 128-bit word position (as a decimal string in JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &rand_chacha::ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> std::result::Result<rand_chacha::ChaCha8Rng, String> {
        use rand::SeedableRng;
        let pos: u128 = self
            .word_pos
            .parse()
            .map_err(|e| format!("rng.word_pos {:?}: {e}", self.word_pos))?;
        let mut rng = rand_chacha::ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// Where the data loader stands: `epoch` (0-based) and the next batch `position` in that epoch's order;
/// `fingerprint` identifies the dataset and loader settings (afinar-data's `LoaderCursor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
    pub fingerprint: u64,
}

/// The non-tensor state of a run at a step boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates attempted so far (skipped non-finite steps count: the schedule moves on).
    pub step: u64,
    /// AdamW's t: updates actually applied (bias correction uses it).
    pub adam_t: u64,
    /// Total optimizer steps of the run and the warmup, as resolved at the start.
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub cursor: Cursor,
    /// Dropout RNG.
    pub rng: RngState,
    /// Consecutive non-finite steps at this point.
    pub nonfinite_in_row: u32,
    /// Trained (scored) tokens seen so far.
    pub tokens: u64,
    /// Wall time spent training before this checkpoint (s), so tokens/s and elapsed continue.
    pub elapsed_s: f64,
    /// SHA-256 of the resolved config's resume-relevant keys.
    pub config_hash: String,
    /// The last eval loss, if any.
    pub last_eval_loss: Option<f64>,
    /// Dynamic loss scaler (scale, growth tracker) when the run scales its loss (`train.loss_scaling`);
    /// absent in checkpoints of runs without scaling and in those written before the field existed
    /// (such a run resumes at the initial scale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::loss_scale::LossScalerState>,
    /// Data-parallel ranks of the run (absent = 1): its loader's batches are world_size ·
    /// micro_batch_size rows, which the cursor counts in.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: u64,
    /// Where the cursor count starts when the run was resumed on another number of ranks (absent:
    /// step 0 at epoch 0, position 0). From there on the cursor moves grad_accum batches per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_origin: Option<CursorOrigin>,
}

fn one() -> u64 {
    1
}

fn is_one(x: &u64) -> bool {
    *x == 1
}

/// The step and cursor at which a run continued on a different number of ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorOrigin {
    pub step: u64,
    pub epoch: u64,
    pub position: u64,
}

/// One trainable tensor with its AdamW moments (all f32, same length).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorState {
    pub shape: Vec<usize>,
    pub param: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub state: TrainerState,
    /// Trainable tensors by name.
    pub tensors: BTreeMap<String, TensorState>,
    pub config_toml: String,
}

/// The directory name of the checkpoint taken after `step` updates.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints under `root` (= RUN/checkpoints), oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(CheckpointError::Io {
                path: root.into(),
                source: e,
            })
        }
    };
    for entry in rd {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().join("trainer_state.json").is_file() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Result<PathBuf> {
    list(root)?
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| CheckpointError::NoCheckpoint(root.to_path_buf()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes `ckpt` as `root/step-XXXXXXXX` atomically and deletes all but the newest `keep`
/// checkpoints (and stale `.tmp-*` directories). Returns the final directory.
pub fn save(root: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(io(root))?;
    let name = step_dir_name(ckpt.state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    // Tensors: bytes of the f32 vectors (little-endian on every supported target).
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for (n, t) in &ckpt.tensors {
        for (prefix, data) in [("param", &t.param), ("adam_m", &t.m), ("adam_v", &t.v)] {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytes,
            )
            .map_err(|e| CheckpointError::Format {
                path: tmp.clone(),
                message: format!("tensor {prefix}/{n}: {e}"),
            })?;
            views.push((format!("{prefix}/{n}"), view));
        }
    }
    let tpath = tmp.join("tensors.safetensors");
    let bytes = safetensors::tensor::serialize(
        views,
        Some(HashMap::from([(
            "format".to_string(),
            "afinar-checkpoint".to_string(),
        )])),
    )
    .map_err(|e| CheckpointError::Format {
        path: tpath.clone(),
        message: e.to_string(),
    })?;
    write_synced(&tpath, &bytes)?;
    let state = serde_json::to_vec_pretty(&ckpt.state).expect("trainer state serializes");
    write_synced(&tmp.join("trainer_state.json"), &state)?;
    write_synced(&tmp.join("config.toml"), ckpt.config_toml.as_bytes())?;

    if final_dir.exists() {
        // Same step written again (e.g. the final save right after a periodic one): replace it.
        fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    if let Ok(d) = fs::File::open(root) {
        let _ = d.sync_all(); // make the rename durable where the platform supports it
    }

    // Keep the newest `keep`; remove stale temporaries.
    let all = list(root)?;
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            fs::remove_dir_all(p).map_err(io(p))?;
        }
    }
    for entry in fs::read_dir(root).map_err(io(root))?.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.starts_with(".tmp-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(final_dir)
}

/// Reads a checkpoint directory written by [`save`].
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let spath = dir.join("trainer_state.json");
    let text = fs::read(&spath).map_err(io(&spath))?;
    let state: TrainerState =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Format {
            path: spath.clone(),
            message: e.to_string(),
        })?;
    let cpath = dir.join("config.toml");
    let config_toml = fs::read_to_string(&cpath).map_err(io(&cpath))?;
    let tpath = dir.join("tensors.safetensors");
    let bytes = fs::read(&tpath).map_err(io(&tpath))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Format {
            path: tpath.clone(),
            message: e.to_string(),
        })?;
    let fmt = |m: String| CheckpointError::Format {
        path: tpath.clone(),
        message: m,
    };
    // Per tensor name: (shape, values) of param, adam_m, adam_v as they are found.
    type Slot = Option<(Vec<usize>, Vec<f32>)>;
    let mut parts: BTreeMap<String, [Slot; 3]> = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(fmt(format!(
                "tensor {name}: dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let (prefix, n) = name.split_once('/').ok_or_else(|| {
            fmt(format!(
                "tensor {name}: expected param/, adam_m/ or adam_v/ prefix"
            ))
        })?;
        let slot = match prefix {
            "param" => 0,
            "adam_m" => 1,
            "adam_v" => 2,
            _ => return Err(fmt(format!("tensor {name}: unknown prefix {prefix}"))),
        };
        // Copy through a Vec<f32> (the mmap'd bytes need not be 4-byte aligned).
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        parts.entry(n.to_string()).or_default()[slot] = Some((view.shape().to_vec(), data));
    }
    let mut tensors = BTreeMap::new();
    for (n, [p, m, v]) in parts {
        let missing = |w: &str| fmt(format!("tensor {n}: {w} missing"));
        let (shape, param) = p.ok_or_else(|| missing("param"))?;
        let (ms, m) = m.ok_or_else(|| missing("adam_m"))?;
        let (vs, v) = v.ok_or_else(|| missing("adam_v"))?;
        if ms != shape || vs != shape {
            return Err(fmt(format!(
                "tensor {n}: shapes differ: param {shape:?}, adam_m {ms:?}, adam_v {vs:?}"
            )));
        }
        tensors.insert(n, TensorState { shape, param, m, v });
    }
    Ok(Checkpoint {
        state,
        tensors,
        config_toml,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn ckpt(step: u64) -> Checkpoint {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let _ = rng.next_u64();
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "layers.0.q_proj.lora_A".to_string(),
            TensorState {
                shape: vec![2, 3],
                param: vec![1.0, -2.5, f32::MIN_POSITIVE, 3.0e-39, 0.1, -0.0],
                m: vec![0.5; 6],
                v: vec![1e-12; 6],
            },
        );
        Checkpoint {
            state: TrainerState {
                step,
                adam_t: step,
                total_steps: 100,
                warmup_steps: 3,
                cursor: Cursor {
                    epoch: 1,
                    position: 17,
                    fingerprint: u64::MAX,
                },
                rng: RngState::capture(&rng),
                nonfinite_in_row: 0,
                tokens: 1234,
                elapsed_s: 1.5,
                config_hash: "abc".into(),
                last_eval_loss: Some(2.0),
                loss_scale: Some(crate::loss_scale::LossScalerState {
                    scale: 16384.0,
                    growth_tracker: 17,
                }),
                world_size: 1,
                cursor_origin: None,
            },
            tensors,
            config_toml: "[train]\nlr = 0.1\n".into(),
        }
    }

    #[test]
    fn round_trip_is_bit_exact_and_keeps_k() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        for s in [2, 4, 6, 8] {
            save(&root, &ckpt(s), 2).unwrap();
        }
        let l = list(&root).unwrap();
        assert_eq!(l.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6, 8]);
        let back = load(&latest(&root).unwrap()).unwrap();
        let orig = ckpt(8);
        assert_eq!(back.state, orig.state);
        assert_eq!(back.config_toml, orig.config_toml);
        let (a, b) = (
            &back.tensors["layers.0.q_proj.lora_A"],
            &orig.tensors["layers.0.q_proj.lora_A"],
        );
        assert_eq!(a.shape, b.shape);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.param), bits(&b.param));
        assert_eq!(bits(&a.m), bits(&b.m));
        assert_eq!(bits(&a.v), bits(&b.v));
        // The RNG continues where it was.
        let mut r1 = back.state.rng.restore().unwrap();
        let mut r0 = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let _ = r0.next_u64();
        assert_eq!(r1.next_u64(), r0.next_u64());
    }

    /// A trainer_state.json written before `loss_scale` existed still loads (as "no scaler state"),
    /// and a state without a scaler writes no `loss_scale` key.
    #[test]
    fn state_without_loss_scale_loads() {
        let mut st = ckpt(1).state;
        st.loss_scale = None;
        let json = serde_json::to_string(&st).unwrap();
        assert!(!json.contains("loss_scale"), "{json}");
        let back: TrainerState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn temporaries_are_ignored_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        fs::create_dir_all(root.join(".tmp-step-00000009-1")).unwrap();
        fs::create_dir_all(root.join("step-00000010")).unwrap(); // incomplete: no trainer_state.json
        assert!(matches!(
            latest(&root),
            Err(CheckpointError::NoCheckpoint(_))
        ));
        save(&root, &ckpt(3), 3).unwrap();
        assert!(!root.join(".tmp-step-00000009-1").exists());
        assert_eq!(list(&root).unwrap().len(), 1);
    }

    #[test]
    fn corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let p = save(&root, &ckpt(1), 1).unwrap();
        fs::write(p.join("tensors.safetensors"), b"garbage").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("tensors.safetensors"), "{e}");
        fs::write(p.join("trainer_state.json"), b"{").unwrap();
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("trainer_state.json"));
    }
}
