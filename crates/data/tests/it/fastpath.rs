//! The cached piece-wise encoder gives exactly the ids of the `tokenizers` crate.

use crate::common;

#[test]
fn piece_cache_matches_tokenizers_exactly() {
    let tok = common::project_tokenizer();
    assert!(tok.uses_piece_cache());
    // Every corpus line and the shipped dataset text.
    let corpus = common::tokenizer_dir().join("corpus");
    let mut n = 0;
    for f in std::fs::read_dir(corpus).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        for line in text.lines() {
            assert_eq!(
                tok.encode(line).unwrap(),
                tok.encode_uncached(line).unwrap(),
                "{line:?}"
            );
            n += 1;
        }
        // Whole files too (newlines, runs of blank lines).
        assert_eq!(
            tok.encode(&text).unwrap(),
            tok.encode_uncached(&text).unwrap()
        );
    }
    assert!(n > 500);
    // Random strings over the characters where the regex classes are subtle.
    let alphabet: Vec<char> =
        "aZñÉs'tredlmv  \n\t\r0123456789²¼ªº.,«»¿?!-\"\u{85}\u{a0}\u{1f}\u{7f}ǅƻ≈😀"
            .chars()
            .collect();
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..3000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (x >> 59) as usize + 1;
        let s: String = (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                alphabet[(x >> 33) as usize % alphabet.len()]
            })
            .collect();
        assert_eq!(
            tok.encode(&s).unwrap(),
            tok.encode_uncached(&s).unwrap(),
            "{s:?}"
        );
    }
}
