//! Training a small byte-level BPE tokenizer in-process (the project's test/demo tokenizer).
//!
//! Byte-level: every byte has a token, so any text encodes with no `<unk>`. The pre-tokenizer is
//! GPT-2's regex with `add_prefix_space = false` — no space is invented at the start of a text,
//! which matters here because every template segment is tokenized on its own and a prefix space
//! would change each segment's ids. Special tokens take ids 0.. in the order given.

use std::collections::HashSet;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};

/// The project's special tokens, in id order: Gemma's first four ids (`<pad>`=0, `<eos>`=1,
/// `<bos>`=2, `<unk>`=3), then Gemma's turn markers (4, 5) and the ChatML (6, 7) and Llama-3
/// (8..=11) markers, so one tokenizer serves every built-in template.
pub const PROJECT_SPECIAL_TOKENS: [&str; 12] = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// Trains a byte-level BPE tokenizer on `texts` with at most `vocab_size` ids (special tokens
/// and the 256 byte tokens included). Deterministic for the same inputs.
pub fn train_tokenizer<S: AsRef<str> + Send + Sync>(
    texts: &[S],
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<Tokenizer> {
    let min = special_tokens.len() + 256;
    if vocab_size < min {
        return Err(DataError::Option {
            option: "vocab_size".into(),
            problem: format!(
                "{vocab_size} < {min} (256 bytes + {} special tokens)",
                special_tokens.len()
            ),
        });
    }
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            special_tokens
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build();
    let mut trainer: TrainerWrapper = trainer.into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.train(&mut trainer, texts.iter().map(|t| t.as_ref()))
        .map_err(|e| DataError::TokenizerTraining {
            message: e.to_string(),
        })?;
    Ok(tok)
}

/// tokenizer_config.json for a tokenizer trained with [`PROJECT_SPECIAL_TOKENS`]: Gemma's
/// special tokens and its chat template (what the demo model is trained with).
pub fn project_tokenizer_config() -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "add_eos_token": false,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "clean_up_tokenization_spaces": false,
        "model_max_length": 8192,
        "padding_side": "right",
        "chat_template": GEMMA_CHAT_TEMPLATE,
    })
}

/// The Gemma-2 `chat_template` (gemma-2-*-it tokenizer_config.json), verbatim.
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

/// Makes `tok` add `bos` in front of every sequence encoded with `add_special_tokens = true`
/// (what Gemma's tokenizer does; `add_bos_token: true`). The pipeline itself always encodes
/// with `add_special_tokens = false` and places the single BOS through the template.
pub fn add_bos_post_processor(tok: &mut Tokenizer, bos: &str) -> Result<()> {
    let id = tok
        .token_to_id(bos)
        .ok_or_else(|| DataError::TokenizerTraining {
            message: format!("`{bos}` is not in the vocabulary"),
        })?;
    let bad = |e: String| DataError::TokenizerTraining { message: e };
    let mut b = tokenizers::processors::template::TemplateProcessing::builder();
    b.try_single(format!("{bos} $A"))
        .map_err(|e| bad(format!("{e:?}")))?;
    b.try_pair(format!("{bos} $A $B"))
        .map_err(|e| bad(format!("{e:?}")))?;
    b.special_tokens(vec![(bos.to_string(), id)]);
    let post = b.build().map_err(|e| bad(e.to_string()))?;
    tok.with_post_processor(Some(post));
    Ok(())
}
