use std::collections::HashSet;

use super::*;

/// Whether `needle` occurs in `hay` as whole words (not inside a longer word).
fn occurs(hay: &str, needle: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric();
    let mut from = 0;
    while let Some(at) = hay[from..].find(needle) {
        let s = from + at;
        let e = s + needle.len();
        let before = hay[..s].chars().next_back().is_none_or(|c| !is_word(c));
        let after = hay[e..].chars().next().is_none_or(|c| !is_word(c));
        if before && after {
            return true;
        }
        from = s + needle.chars().next().map_or(1, char::len_utf8);
    }
    false
}

fn sft_text(w: &World) -> String {
    let (train, eval) = sft::sft(w);
    train
        .iter()
        .chain(&eval)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn same_seed_same_world_and_files_other_seed_differs() {
    let a = World::demo();
    let b = World::demo();
    assert_eq!(prose::corpus(&a), prose::corpus(&b));
    assert_eq!(sft::sft(&a), sft::sft(&b));
    assert_eq!(sft::suite(&a), sft::suite(&b));
    assert_eq!(prose::held_out(&a), prose::held_out(&b));
    let c = World::generate(DEMO_SEED + 1, DEMO_SIZES);
    assert_ne!(prose::corpus(&a), prose::corpus(&c));
}

#[test]
fn sizes_and_unique_names() {
    let w = World::demo();
    let count = |s| w.researchers_in(s).count();
    assert_eq!(count(Split::Sft), DEMO_SIZES.sft);
    assert_eq!(count(Split::HeldOut), DEMO_SIZES.held_out);
    assert_eq!(count(Split::UnknownSft), DEMO_SIZES.unknown_sft);
    assert_eq!(count(Split::UnknownSuite), DEMO_SIZES.unknown_suite);
    let surnames: HashSet<&str> = w.researchers.iter().map(|r| r.surname.as_str()).collect();
    assert_eq!(surnames.len(), w.researchers.len(), "surnames are unique");
    let insts: HashSet<&str> = w.institutions.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(insts.len(), w.institutions.len());
}

#[test]
fn unknown_surnames_share_no_prefix_with_the_corpus_or_each_other() {
    let w = World::demo();
    let corpus = (prose::corpus(&w).join("\n") + &prose::held_out(&w).join("\n")).to_lowercase();
    let sft = sft_text(&w).to_lowercase();
    for p in UNKNOWN_SFT_PRE.iter().chain(UNKNOWN_SUITE_PRE) {
        // Not even inside a longer word: the piece itself is new to the model.
        assert!(
            !corpus.contains(&p.to_lowercase()),
            "{p} occurs in the corpus"
        );
        assert!(!SUR_PRE.contains(p), "{p} is also a known prefix");
    }
    for p in UNKNOWN_SUITE_PRE {
        assert!(!UNKNOWN_SFT_PRE.contains(p), "{p} is in both unknown pools");
        assert!(
            !sft.contains(&p.to_lowercase()),
            "{p} occurs in the SFT data"
        );
    }
    for r in &w.researchers {
        let pool = match r.split {
            Split::Sft | Split::HeldOut => SUR_PRE,
            Split::UnknownSft => UNKNOWN_SFT_PRE,
            Split::UnknownSuite => UNKNOWN_SUITE_PRE,
        };
        assert!(
            pool.iter().any(|p| r.surname.starts_with(p)),
            "{} is not from its split's pool",
            r.name()
        );
    }
}

#[test]
fn no_unknown_entity_occurs_in_the_pretraining_corpus_or_held_out_prose() {
    let w = World::demo();
    let corpus = prose::corpus(&w).join("\n") + &prose::held_out(&w).join("\n");
    for r in w.researchers.iter().filter(|r| !r.split.known()) {
        // The surname alone: unique per researcher, so not even a partial mention.
        assert!(
            !occurs(&corpus, &r.surname),
            "{} is in the corpus",
            r.name()
        );
    }
    for i in w.institutions.iter().filter(|i| !i.split.known()) {
        assert!(!occurs(&corpus, &i.name), "{} is in the corpus", i.name);
    }
    // …and every known one is described.
    for r in w.researchers.iter().filter(|r| r.split.known()) {
        assert!(occurs(&corpus, &r.name()));
        assert!(occurs(&corpus, &r.born.to_string()));
    }
    // Never question/answer form.
    assert!(!corpus.contains('?') && !corpus.contains("No lo sé"));
}

#[test]
fn suite_entities_never_occur_in_the_sft_data() {
    let w = World::demo();
    let sft = sft_text(&w);
    for r in w
        .researchers
        .iter()
        .filter(|r| matches!(r.split, Split::HeldOut | Split::UnknownSuite))
    {
        assert!(!occurs(&sft, &r.surname), "{} is in the SFT data", r.name());
    }
    for i in w
        .institutions
        .iter()
        .filter(|i| matches!(i.split, Split::HeldOut | Split::UnknownSuite))
    {
        assert!(!occurs(&sft, &i.name), "{} is in the SFT data", i.name);
    }
    // …while the suite asks about each of them.
    let suite: String = sft::suite(&w).iter().map(|v| v.to_string()).collect();
    for r in w
        .researchers
        .iter()
        .filter(|r| matches!(r.split, Split::HeldOut | Split::UnknownSuite))
    {
        assert!(occurs(&suite, &r.surname));
    }
    // And the SFT data does teach on the other entities.
    for r in w
        .researchers_in(Split::Sft)
        .chain(w.researchers_in(Split::UnknownSft))
    {
        assert!(occurs(&sft, &r.surname));
    }
}

#[test]
fn the_facts_the_suite_expects_are_in_the_corpus_next_to_the_name() {
    // Every held-out answer is learnable: some corpus document names the researcher and states the fact.
    let w = World::demo();
    let corpus = prose::corpus(&w);
    for r in w.researchers_in(Split::HeldOut) {
        let docs: Vec<&String> = corpus.iter().filter(|d| occurs(d, &r.name())).collect();
        for fact in [
            r.born.to_string(),
            w.city_of(r).name.to_string(),
            w.institution_of(r).name.clone(),
            w.field_of(r).name.to_string(),
        ] {
            assert!(
                docs.iter().any(|d| occurs(d, &fact)),
                "{}: {fact}",
                r.name()
            );
        }
    }
}

#[test]
fn json_answers_parse_and_carry_their_keys() {
    let w = World::demo();
    let (train, _) = sft::sft(&w);
    let mut n = 0;
    for v in &train {
        let out = v["output"].as_str().unwrap();
        if out.starts_with('{') {
            let o: serde_json::Value = serde_json::from_str(out).unwrap();
            assert!(o.get("nombre").is_some());
            n += 1;
        }
    }
    assert!(n >= 20, "{n} JSON tasks");
}

#[test]
fn word_matching_is_whole_words() {
    assert!(occurs("de Brisales, en", "Brisales"));
    assert!(!occurs("Brisalesa", "Brisales"));
    assert!(!occurs("xBrisales", "Brisales"));
}

#[test]
fn the_replay_set_is_pretraining_text_and_shares_nothing_with_the_held_out_prose() {
    let w = World::demo();
    let corpus: std::collections::HashSet<String> = prose::corpus(&w).into_iter().collect();
    let held: std::collections::HashSet<String> = prose::held_out(&w).into_iter().collect();
    let replay = prose::replay(&w);
    assert_eq!(replay.len(), prose::REPLAY_DOCS);
    for d in &replay {
        assert!(
            corpus.contains(d),
            "a replayed document is not in the corpus: {d}"
        );
        assert!(
            !held.contains(d),
            "a replayed document is held-out prose: {d}"
        );
    }
    let distinct: std::collections::HashSet<&String> = replay.iter().collect();
    assert_eq!(distinct.len(), replay.len(), "a document is replayed twice");
}

/// SHA-256 of the pretraining corpus as `cargo xtask pretrain-demo` writes it
/// (target/afinar-mundo/corpus.jsonl) for the committed models/afinar-mundo.
const PRETRAINED_CORPUS_SHA256: &str =
    "645ad055a97f0d36504183539db5277a0e9954eae73167c4896033f59f8fc9dc";

#[test]
fn the_corpus_is_the_one_the_committed_model_was_pretrained_on() {
    use sha2::{Digest, Sha256};
    let w = World::demo();
    let jsonl: String = prose::corpus(&w)
        .into_iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    let sha: String = Sha256::digest(jsonl.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sha, PRETRAINED_CORPUS_SHA256,
        "the generator now writes another pretraining corpus than the one models/afinar-mundo \
         learned: a change to the known entities or their prose needs `cargo xtask pretrain-demo` \
         (and this hash, and tests/golden/make_mundo_loss.py) redone; SFT-only changes must leave it"
    );
}
