//! Safetensors checkpoints: `TensorStore::open_dir` on a directory holding either one
//! `model.safetensors` or a `model.safetensors.index.json` with up to three shards, then every
//! tensor read as f32 (and raw), and every bitsandbytes 4-bit weight through `read_bnb_nf4`.
//!
//! Input: byte 0 = mode (bit 0: sharded); single: rest = the file; sharded: rest = index JSON,
//! SEP, `s1.safetensors`, SEP, `s2.safetensors`, SEP, `s3.safetensors`.
#![no_main]

use afinar_fuzz::{put, scratch, split};
use afinar_gemma::bnb::{is_bnb_4bit, parse_quant_state, read_bnb_nf4, QUANT_STATE_NF4};
use afinar_gemma::TensorStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch("st");
    if mode & 1 == 0 {
        put(&dir, "model.safetensors", rest);
    } else {
        let parts = split(rest, 4);
        put(&dir, "model.safetensors.index.json", parts[0]);
        for (i, p) in parts[1..].iter().enumerate() {
            put(&dir, &format!("s{}.safetensors", i + 1), p);
        }
    }
    let Ok(store) = TensorStore::open_dir(&dir) else {
        return;
    };
    let _ = store.files();
    let _ = store.metadata(0);
    let names: Vec<String> = store.names().iter().map(|s| s.to_string()).collect();
    for name in &names {
        let info = store.info(name).expect("a listed name has info");
        let shape = info.shape.clone();
        let _ = store.raw(name);
        let _ = store.path_of(name);
        let _ = store.read_f32_shaped(name, &shape);
        let _ = store.check_shape(name, &[1]);
        if is_bnb_4bit(&store, name) {
            // The shape a model config would ask for: the quant state's own (so the parts are
            // checked), else [1, 64].
            let qs = format!("{name}.{QUANT_STATE_NF4}");
            let want = store
                .raw(&qs)
                .ok()
                .and_then(|(b, _)| parse_quant_state(&qs, b).ok())
                .map(|q| q.shape)
                .unwrap_or_else(|| vec![1, 64]);
            let _ = read_bnb_nf4(&store, name, &want);
        }
    }
    let _ = store.info("model.embed_tokens.weight");
});
