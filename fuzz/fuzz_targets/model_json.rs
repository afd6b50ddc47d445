//! Model-side JSON and adapters: `Gemma2Config::from_json_str` (+ the derived sizes),
//! `AdapterConfig::from_json_str`, `parse_quant_state`, and `PeftAdapter::load` of an adapter
//! directory (then `save` of what loaded, into another directory).
//!
//! Input: byte 0 % 4 = which; rest = the JSON text, or for the adapter: adapter_config.json, SEP,
//! adapter_model.safetensors.
#![no_main]

use std::path::Path;

use afinar_fuzz::{put, scratch, split};
use afinar_gemma::bnb::parse_quant_state;
use afinar_gemma::peft::{AdapterConfig, PeftAdapter};
use afinar_gemma::Gemma2Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(c) = Gemma2Config::from_json_str(text, Path::new("config.json")) {
                let _ = c.check_trainable(Path::new("config.json"));
                let _ = c.q_dim();
                let _ = c.kv_dim();
                let _ = c.attn_scale();
                let _ = c.embed_scale();
                for l in 0..c.num_hidden_layers.min(64) {
                    let _ = c.window(l);
                }
                let _ = c.num_parameters();
                let j = c.to_json();
                let again = Gemma2Config::from_value(j, Path::new("config.json (written)"));
                assert!(again.is_ok(), "a loaded config re-reads: {again:?}");
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(a) = AdapterConfig::from_json_str(text, Path::new("adapter_config.json")) {
                let _ = a.scale();
                let out = a.to_json_string();
                let again = AdapterConfig::from_json_str(&out, Path::new("(written)"));
                assert!(again.is_ok(), "a loaded adapter config re-reads: {again:?}");
            }
        }
        2 => {
            let _ = parse_quant_state("w.quant_state.bitsandbytes__nf4", rest);
        }
        _ => {
            let parts = split(rest, 2);
            let dir = scratch("peft");
            let adir = dir.join("adapter");
            std::fs::create_dir_all(&adir).expect("mkdir");
            put(&adir, "adapter_config.json", parts[0]);
            if let Some(w) = parts.get(1) {
                put(&adir, "adapter_model.safetensors", w);
            }
            if let Ok(a) = PeftAdapter::load(&adir) {
                let _ = a.targets();
                let _ = a.num_layers();
                let _ = a.lora_config();
                let out = dir.join("out");
                if a.save(&out).is_ok() {
                    let again = PeftAdapter::load(&out);
                    assert!(again.is_ok(), "a saved adapter re-loads: {:?}", again.err());
                }
            }
        }
    }
});
