//! Shared helpers of the io_* integration tests: paths and readers for the fixtures written by
//! tests/golden/make_gemma_io.py.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use afinar_gemma::safetensors_io::{decode_f32, Dtype};
use afinar_gemma::{Gemma2Model, LoadOptions, TensorStore};
use afinar_kernels::cpu::Cpu;

/// tests/golden/fixtures at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/fixtures")
}

pub fn model_dir() -> PathBuf {
    fixtures().join("gemma_io_model")
}

pub fn adapter_a() -> PathBuf {
    fixtures().join("gemma_io_adapter_a")
}

pub fn adapter_b() -> PathBuf {
    fixtures().join("gemma_io_adapter_b")
}

pub fn bnb_dir() -> PathBuf {
    fixtures().join("gemma_io_bnb")
}

/// gemma_io_cases.safetensors.
pub fn cases() -> TensorStore {
    TensorStore::open_files(&[fixtures().join("gemma_io_cases.safetensors")])
        .expect("open gemma_io_cases.safetensors")
}

/// An integer tensor (I64 or I32) as i32.
pub fn ints(store: &TensorStore, name: &str) -> Vec<i32> {
    let (bytes, info) = store.raw(name).unwrap_or_else(|e| panic!("{e}"));
    match info.dtype {
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        d => panic!("{name}: integer tensor expected, found {d:?}"),
    }
}

/// A float tensor as f32, with its shape.
pub fn floats(store: &TensorStore, name: &str) -> (Vec<f32>, Vec<usize>) {
    let (bytes, info) = store.raw(name).unwrap_or_else(|e| panic!("{e}"));
    (
        decode_f32(bytes, info.dtype).unwrap_or_else(|| panic!("{name}: not a float tensor")),
        info.shape.clone(),
    )
}

pub fn backend() -> Arc<Cpu> {
    Arc::new(Cpu::new())
}

/// The dense f32 fixture model.
pub fn load_model(opts: &LoadOptions) -> Gemma2Model<Cpu> {
    Gemma2Model::load(backend(), model_dir(), opts)
        .unwrap_or_else(|e| panic!("load gemma_io_model: {e}"))
}
