//! Reading (and a small writer for) safetensors checkpoints.
//!
//! A model directory holds either `model.safetensors`, or shards `model-0000x-of-0000y.safetensors` listed
//! by `model.safetensors.index.json` (`weight_map`: tensor name → shard file). Files are memory-mapped;
//! a tensor is converted to f32 only when asked for, one at a time, so loading streams layer by layer.
//!
//! File format (safetensors): u64 little-endian header length N, N bytes of JSON
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`, then the data region;
//! offsets are relative to the data region. Every header is validated when the file is opened, so a
//! truncated or corrupt file is an error at open time and later reads cannot go out of bounds. The checks
//! are those of the reference `safetensors` crate's `SafeTensors::read_metadata` (this reader does not go
//! through it, because it maps files itself and wants errors that name the file and the tensors):
//! - the header is at most 100 MB of JSON (`MAX_HEADER_SIZE`);
//! - each tensor's byte size is dtype size × Π shape, and its range lies inside the data region;
//! - the ranges, sorted by offset, tile the data region exactly: no two tensors overlap (an overlap would
//!   let two names alias the same bytes), no byte lies between two tensors or after the last one.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{GemmaError, Result};
use afinar_kernels::nf4::RawDtype;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// The safetensors spelling ("F32", "BF16", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into `TensorStore::files()`.
    pub file: usize,
    /// Absolute byte range in the file.
    begin: usize,
    end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct StFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: BTreeMap<String, String>,
}

/// A set of memory-mapped safetensors files seen as one name → tensor map.
pub struct TensorStore {
    files: Vec<StFile>,
    tensors: HashMap<String, TensorInfo>,
    /// Tensors the index names but whose shard does not hold them: kept to produce a precise error.
    dangling: HashMap<String, usize>,
}

/// Largest header accepted, in bytes (the reference `safetensors` crate's `MAX_HEADER_SIZE`).
pub const MAX_HEADER_SIZE: usize = 100_000_000;

const INDEX_NAME: &str = "model.safetensors.index.json";
const SINGLE_NAME: &str = "model.safetensors";

fn corrupt(path: &Path, msg: impl Into<String>) -> GemmaError {
    GemmaError::Safetensors {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl TensorStore {
    /// Opens the checkpoint of a model directory: `model.safetensors.index.json` (sharded) when present,
    /// else `model.safetensors`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join(INDEX_NAME);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_NAME);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(GemmaError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE_NAME} or {INDEX_NAME} in this directory (is it a Hugging Face model directory?)"),
            ),
        ))
    }

    /// Opens the shards listed by a `model.safetensors.index.json`.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| GemmaError::io(index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| GemmaError::Json {
            path: index.to_path_buf(),
            source: e,
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| corrupt(index, "no `weight_map` object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<String> = Vec::new();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                corrupt(index, format!("weight_map[{name:?}] is not a file name"))
            })?;
            if file.contains('/') || file.contains('\\') || file.contains("..") {
                return Err(corrupt(
                    index,
                    format!("weight_map[{name:?}] = {file:?} is not a plain file name"),
                ));
            }
            if !shard_names.iter().any(|s| s == file) {
                shard_names.push(file.to_string());
            }
            wanted.push((name.clone(), file.to_string()));
        }
        shard_names.sort();
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        let mut store = Self::open_files(&paths)?;
        // A name the index maps to a shard that does not contain it: remember it for the error message.
        for (name, file) in wanted {
            let fi = shard_names.iter().position(|s| *s == file).unwrap_or(0);
            match store.tensors.get(&name) {
                Some(info) if info.file == fi => {}
                Some(_) => {}
                None => {
                    store.dangling.insert(name, fi);
                }
            }
        }
        Ok(store)
    }

    /// Opens explicit safetensors files (later files do not override earlier ones: a duplicate name is an error).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let (file, infos) = open_one(path, fi)?;
            for (name, info) in infos {
                if tensors.contains_key(&name) {
                    return Err(corrupt(
                        path,
                        format!("tensor `{name}` is also stored in another shard"),
                    ));
                }
                tensors.insert(name, info);
            }
            files.push(file);
        }
        Ok(TensorStore {
            files,
            tensors,
            dangling: HashMap::new(),
        })
    }

    /// The files of this store, in index order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// `__metadata__` of file `i` (e.g. {"format": "pt"}).
    pub fn metadata(&self, file: usize) -> Option<&BTreeMap<String, String>> {
        self.files.get(file).map(|f| &f.metadata)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Dtype, shape and location of `name`, or `MissingTensor` naming the files searched.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            let files = match self.dangling.get(name) {
                Some(&fi) => vec![self.files[fi].path.clone()],
                None => self.files(),
            };
            GemmaError::MissingTensor {
                name: name.to_string(),
                files,
            }
        })
    }

    /// The file that holds `name` (None when no file does).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|info| self.files[info.file].path.as_path())
    }

    /// Raw little-endian bytes of `name` (for U8 NF4 payloads and the quant-state JSON blob).
    pub fn raw(&self, name: &str) -> Result<(&[u8], &TensorInfo)> {
        let info = self.info(name)?;
        let bytes = &self.files[info.file].mmap[info.begin..info.end];
        Ok((bytes, info))
    }

    /// `name` converted to f32 (from F32, F16, BF16 or F64), any shape.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (bytes, info) = self.raw(name)?;
        let path = &self.files[info.file].path;
        decode_f32(bytes, info.dtype).ok_or_else(|| GemmaError::Dtype {
            name: name.to_string(),
            path: path.clone(),
            dtype: info.dtype.as_str().to_string(),
            hint: "expected F32, F16, BF16 or F64".to_string(),
        })
    }

    /// `read_f32` after checking that the shape is `expected`.
    pub fn read_f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        self.check_shape(name, expected)?;
        self.read_f32(name)
    }

    /// The stored values of `name` (shape checked against `expected`) in the form the backends take
    /// without a host f32 copy: the mapped bytes of an F32, BF16 or F16 tensor, or (F64, which no
    /// backend takes as bytes) the decoded values. Other dtypes: the `Dtype` error of `read_f32`.
    pub fn stored_shaped(&self, name: &str, expected: &[usize]) -> Result<Stored<'_>> {
        self.check_shape(name, expected)?;
        let (bytes, info) = self.raw(name)?;
        Ok(match info.dtype {
            Dtype::F32 => Stored::Raw(bytes, RawDtype::F32),
            Dtype::BF16 => Stored::Raw(bytes, RawDtype::Bf16),
            Dtype::F16 => Stored::Raw(bytes, RawDtype::F16),
            _ => Stored::F32(self.read_f32(name)?),
        })
    }

    /// Byte size of `name` as stored (0 when absent).
    pub fn stored_bytes(&self, name: &str) -> usize {
        self.tensors.get(name).map_or(0, |i| i.end - i.begin)
    }

    /// Reads the pages of `name` into memory ahead of use, in parallel (rayon, 1 MiB pieces, one byte
    /// per 4 KiB page), after asking the kernel for read-ahead (`MADV_WILLNEED`). Run on another
    /// thread while the previous tensor is converted or uploaded, it overlaps disk reads and page
    /// faults with that work. Best effort: an absent name or a refused advice does nothing.
    pub fn prefetch(&self, name: &str) {
        use rayon::prelude::*;
        let Some(info) = self.tensors.get(name) else {
            return;
        };
        let map = &self.files[info.file].mmap;
        let _ = map.advise_range(memmap2::Advice::WillNeed, info.begin, info.end - info.begin);
        let touched = map[info.begin..info.end]
            .par_chunks(1 << 20)
            .map(|c| c.iter().step_by(4096).fold(0u8, |a, &b| a ^ b))
            .reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(touched);
    }

    /// Drops the pages of `name` from this process's mapping (`MADV_DONTNEED`): they stay in the page
    /// cache, but no longer count in the resident set, so a streamed load holds at most the tensors
    /// in flight. A later read of `name` maps them again (from the cache or the file). Best effort.
    pub fn release(&self, name: &str) {
        let Some(info) = self.tensors.get(name) else {
            return;
        };
        let map = &self.files[info.file].mmap;
        // The range is page-aligned outward by memmap2, so pages shared with a neighbouring tensor
        // are dropped too: harmless, they are read again from the page cache when needed.
        // SAFETY: the map is read-only and shared (MAP_SHARED, PROT_READ): MADV_DONTNEED only drops
        // page-table entries, and the next access faults the same file bytes back in. No data is
        // lost and every live `&[u8]` into the map stays valid.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                info.begin,
                info.end - info.begin,
            )
        };
    }

    /// `StoredShapeMismatch` (naming the tensor and its file) unless `name` has shape `expected`.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let info = self.info(name)?;
        if info.shape != expected {
            return Err(GemmaError::StoredShapeMismatch {
                name: name.to_string(),
                path: self.files[info.file].path.clone(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(())
    }
}

/// A float tensor as stored: see [`TensorStore::stored_shaped`].
pub enum Stored<'a> {
    /// The mapped little-endian bytes.
    Raw(&'a [u8], RawDtype),
    /// Decoded values (F64 checkpoints).
    F32(Vec<f32>),
}

/// Decodes little-endian F32/F16/BF16/F64 bytes to f32; None for other dtypes.
pub fn decode_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// Maps one file and validates its header.
fn open_one(path: &Path, fi: usize) -> Result<(StFile, Vec<(String, TensorInfo)>)> {
    let file = File::open(path).map_err(|e| GemmaError::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. Safetensors checkpoints are treated as
    // immutable while a model loads; if another process truncates the file concurrently, reads could fault —
    // the same contract every mmap-based checkpoint loader (safetensors, candle, llama.cpp) has.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| GemmaError::io(path, e))?;
    let len = mmap.len();
    if len < 8 {
        return Err(corrupt(
            path,
            format!("file is {len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let n = u64::from_le_bytes(
        mmap[..8]
            .try_into()
            .map_err(|_| corrupt(path, "unreadable header length"))?,
    );
    let n = usize::try_from(n)
        .map_err(|_| corrupt(path, format!("header length {n} does not fit in memory")))?;
    if n > MAX_HEADER_SIZE {
        return Err(corrupt(
            path,
            format!("header length {n} exceeds the safetensors limit of {MAX_HEADER_SIZE} bytes"),
        ));
    }
    if n > len - 8 {
        return Err(corrupt(
            path,
            format!("header length {n} exceeds the file size {len} (truncated file?)"),
        ));
    }
    let header: Value = serde_json::from_slice(&mmap[8..8 + n])
        .map_err(|e| corrupt(path, format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| corrupt(path, "header is not a JSON object"))?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut metadata = BTreeMap::new();
    let mut infos = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, val) in m {
                    metadata.insert(
                        k.clone(),
                        val.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| val.to_string()),
                    );
                }
            }
            continue;
        }
        let bad = |msg: String| corrupt(path, format!("tensor `{name}`: {msg}"));
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype".into()))?;
        let dtype =
            Dtype::parse(dtype_s).ok_or_else(|| bad(format!("unknown dtype {dtype_s:?}")))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape".into()))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| bad(format!("bad dimension {d}")))
            })
            .collect::<Result<Vec<usize>>>()?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no data_offsets".into()))?;
        if offs.len() != 2 {
            return Err(bad("data_offsets must have two entries".into()));
        }
        let o = |i: usize| {
            offs[i]
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| bad("bad data_offsets".into()))
        };
        let (b, e) = (o(0)?, o(1)?);
        if b > e || e > data_len {
            return Err(bad(format!("data_offsets [{b}, {e}] outside the data region of {data_len} bytes (truncated file?)")));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows".into()))?;
        let need = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| bad("shape overflows".into()))?;
        if e - b != need {
            return Err(bad(format!(
                "{} bytes stored but {dtype_s} {shape:?} needs {need}",
                e - b
            )));
        }
        infos.push((
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                file: fi,
                begin: data_start + b,
                end: data_start + e,
            },
        ));
    }
    check_tiling(path, data_start, data_len, &infos)?;
    Ok((
        StFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
        },
        infos,
    ))
}

/// The byte ranges of one file's tensors, sorted by offset, must cover its data region
/// [`data_start`, `data_start + data_len`) exactly once (the reference crate's `Metadata::validate` and its
/// `MetadataIncompleteBuffer` check). Errors name the file, the tensors involved and their `data_offsets`
/// (relative to the data region, as the header writes them). A zero-size tensor occupies no bytes and may
/// sit at any boundary between tensors.
fn check_tiling(
    path: &Path,
    data_start: usize,
    data_len: usize,
    infos: &[(String, TensorInfo)],
) -> Result<()> {
    // Sorted by (begin, end), as the reference crate sorts by `data_offsets`: zero-size tensors at a
    // boundary come before the tensor that starts there.
    let mut order: Vec<(usize, usize, &str)> = infos
        .iter()
        .map(|(name, i)| (i.begin - data_start, i.end - data_start, name.as_str()))
        .collect();
    order.sort_unstable();
    // `covered` = bytes [0, covered) are owned by the tensors seen so far; `owner` = the last non-empty
    // one, which ends at `covered`.
    let mut covered = 0usize;
    let mut owner: Option<(usize, usize, &str)> = None;
    for &(b, e, name) in &order {
        if b < covered {
            let (ob, oe, oname) = owner.unwrap_or((0, covered, "?"));
            return Err(corrupt(
                path,
                format!(
                    "tensors `{oname}` (data_offsets [{ob}, {oe}]) and `{name}` ([{b}, {e}]) overlap; \
                     safetensors gives every tensor its own bytes"
                ),
            ));
        }
        if b > covered {
            let after = owner.map_or("the start of the data region".to_string(), |o| {
                format!("tensor `{}` (data_offsets [{}, {}])", o.2, o.0, o.1)
            });
            return Err(corrupt(
                path,
                format!(
                    "bytes [{covered}, {b}) of the data region belong to no tensor (a hole between \
                     {after} and tensor `{name}` ([{b}, {e}]))"
                ),
            ));
        }
        if e > b {
            owner = Some((b, e, name));
            covered = e;
        }
    }
    if covered != data_len {
        let after = owner.map_or("a header that lists no non-empty tensor".to_string(), |o| {
            format!(
                "the last tensor `{}` (data_offsets [{}, {}])",
                o.2, o.0, o.1
            )
        });
        return Err(corrupt(
            path,
            format!(
                "bytes [{covered}, {data_len}) of the data region belong to no tensor (they follow {after})"
            ),
        ));
    }
    Ok(())
}

/// One tensor to write: name, dtype, shape and its little-endian bytes.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl<'a> TensorOut<'a> {
    /// An F32 tensor from host values.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> TensorOut<'static> {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        TensorOut {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: data.into(),
        }
    }
}

/// Writes a safetensors file (tensors in the order given; header padded with spaces to 8 bytes, as the
/// reference implementation does). Fails on a size that disagrees with dtype × shape.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        let mm: serde_json::Map<String, Value> = m
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(mm));
    }
    let mut off = 0usize;
    for t in tensors {
        let need = t.shape.iter().product::<usize>() * t.dtype.size();
        if need != t.data.len() {
            return Err(GemmaError::ShapeMismatch {
                name: t.name.clone(),
                expected: t.shape.clone(),
                found: vec![t.data.len() / t.dtype.size().max(1)],
            });
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape, "data_offsets": [off, off + need]}),
        );
        off += need;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).map_err(|e| GemmaError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(File::create(path).map_err(|e| GemmaError::io(path, e))?);
    let mut w = |b: &[u8]| f.write_all(b).map_err(|e| GemmaError::io(path, e));
    w(&(h.len() as u64).to_le_bytes())?;
    w(&h)?;
    for t in tensors {
        w(&t.data)?;
    }
    f.flush().map_err(|e| GemmaError::io(path, e))?;
    Ok(())
}
