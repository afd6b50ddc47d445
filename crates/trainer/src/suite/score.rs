//! The scoring rules. Each is a pure function of (expectation, generated answer, rules), so a greedy
//! generation always gets the same verdict.
//!
//! **Normalization** ([`normalize`]): lowercase; Spanish/Latin accents folded (á→a, ü→u, ñ→n, ç→c);
//! every character that is not a letter or digit separates words, except a `,` or `.` between two
//! digits, which becomes the decimal point (18,02 = 18.02), and trailing decimal zeros are dropped
//! (16,00 = 16). A phrase *occurs* in an answer when its normalized words appear contiguously.
//!
//! **answer.** A reference of at most [`SHORT_WORDS`] words must be matched *exactly*: the answer's
//! normalized words equal the reference's. Otherwise the answer must carry the reference's key facts:
//! the record's `key_facts` (all of them), or, when it gives none, facts derived from the reference —
//! its numbers and its words of five letters or more that are neither common function words nor in the
//! prompt (at most [`MAX_DERIVED_FACTS`], in order; the prompt's words are allowed back when that
//! leaves fewer than two, as in reading comprehension) — of which at least half must occur.
//! **refuse.** The refusal pattern (default «No lo sé») occurs. **premise.** One of the premise markers
//! occurs ("la premisa", "es falso", "mito", "en realidad", …), and every `key_facts` entry too.
//! **json.** The whole answer (trimmed) parses as JSON: an object with every key, or a non-empty list
//! whose elements are all objects with every key.
//!
//! **Limits, and the borderline flag.** Word matching cannot tell a fact asserted from a fact denied
//! ("no fue en 1921" carries "1921"), nor a refusal from a refusal pattern inside a long invented
//! answer, nor a rejected premise from a marker used for something else; derived facts can miss a
//! paraphrase (a synonym, 4.540 for 4540) or a fact of four letters or fewer. So a verdict that such a case
//! could flip is marked *borderline* with the reason: a passing answer that also declines or runs far
//! longer than the reference, a refusal or marker that is not at the start or sits in a long answer, a
//! failing answer that holds part of the facts or declines without the exact pattern, JSON that only
//! parses once stripped of the text around it. Reports list borderline answers for a human to read.

use serde::{Deserialize, Serialize};

use super::Expect;

/// References of at most this many normalized words are matched exactly.
pub const SHORT_WORDS: usize = 3;
/// Facts derived from a reference without `key_facts`.
pub const MAX_DERIVED_FACTS: usize = 8;
/// An answer longer than this many words is "long" (borderline for a refusal or premise marker).
pub const LONG_WORDS: usize = 40;
/// A pattern or marker is "at the start" when it begins within this many words.
pub const START_WORDS: usize = 6;
/// The default refusal pattern.
pub const DEFAULT_REFUSE: &str = "No lo sé";
/// The default premise markers (Spanish and English).
pub const DEFAULT_PREMISE_MARKERS: &[&str] = &[
    "premisa",
    "es falso",
    "es falsa",
    "no es cierto",
    "no es verdad",
    "incorrecto",
    "incorrecta",
    "mito",
    "en realidad",
    "false premise",
    "premise",
    "not true",
    "is false",
    "myth",
    "actually",
];

/// Ways of declining that are not the refusal pattern (a failing `refuse` answer holding one is
/// borderline).
const SOFT_REFUSALS: &[&str] = &[
    "no tengo constancia",
    "no conozco",
    "no puedo saber",
    "no se puede saber",
    "desconozco",
    "i don t know",
    "i do not know",
];

/// Common words never used as derived facts (after normalization).
const FUNCTION_WORDS: &[&str] = &[
    "aproximadamente",
    "segun",
    "texto",
    "entre",
    "sobre",
    "desde",
    "hasta",
    "durante",
    "porque",
    "cuando",
    "donde",
    "aunque",
    "tambien",
    "puede",
    "pueden",
    "tiene",
    "tienen",
    "fueron",
    "estan",
    "estaba",
    "habia",
    "otros",
    "otras",
    "mismo",
    "misma",
    "cada",
    "todos",
    "todas",
    "mucho",
    "muchos",
    "menos",
    "mayor",
    "menor",
    "parte",
    "forma",
    "manera",
    "decir",
    "siempre",
    "nunca",
    "ademas",
    "alrededor",
    "unos",
    "unas",
    "about",
    "which",
    "there",
    "their",
    "these",
    "those",
    "would",
    "could",
    "should",
    "other",
    "where",
];

/// Scoring settings (from `[eval]` or the CLI).
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub refuse_pattern: String,
    pub premise_markers: Vec<String>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            refuse_pattern: DEFAULT_REFUSE.into(),
            premise_markers: DEFAULT_PREMISE_MARKERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// The verdict on one answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub pass: bool,
    /// Why the verdict could be wrong, when a rule's known blind spot applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub borderline: Option<String>,
    /// What the rule found (facts matched, keys missing, …).
    pub detail: String,
}

impl Verdict {
    fn new(pass: bool, detail: String) -> Self {
        Verdict {
            pass,
            borderline: None,
            detail,
        }
    }
    fn borderline(mut self, cond: bool, why: &str) -> Self {
        if cond && self.borderline.is_none() {
            self.borderline = Some(why.into());
        }
        self
    }
}

fn fold(c: char) -> char {
    match c {
        'á' | 'à' | 'â' | 'ä' | 'ã' => 'a',
        'é' | 'è' | 'ê' | 'ë' => 'e',
        'í' | 'ì' | 'î' | 'ï' => 'i',
        'ó' | 'ò' | 'ô' | 'ö' | 'õ' => 'o',
        'ú' | 'ù' | 'û' | 'ü' => 'u',
        'ñ' => 'n',
        'ç' => 'c',
        c => c,
    }
}

/// Normalized words of `text` (see the module docs).
pub fn normalize(text: &str) -> Vec<String> {
    let chars: Vec<char> = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(fold)
        .collect();
    let mut words = Vec::new();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let decimal = (c == ',' || c == '.')
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit());
        if c.is_alphanumeric() {
            cur.push(c);
        } else if decimal {
            cur.push('.');
        } else if !cur.is_empty() {
            words.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    for w in &mut words {
        if w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.') {
            let t = w.trim_end_matches('0').trim_end_matches('.');
            *w = t.to_string();
        }
    }
    words
}

/// Index of the first occurrence of `phrase` (normalized words) in `words`.
fn find(words: &[String], phrase: &[String]) -> Option<usize> {
    if phrase.is_empty() || phrase.len() > words.len() {
        return None;
    }
    words.windows(phrase.len()).position(|w| w == phrase)
}

fn occurs(words: &[String], text: &str) -> bool {
    find(words, &normalize(text)).is_some()
}

/// Whether `phrase` occurs in `text`, both normalized.
pub fn contains_phrase(text: &str, phrase: &str) -> bool {
    occurs(&normalize(text), phrase)
}

fn is_number(w: &str) -> bool {
    w.chars().any(|c| c.is_ascii_digit()) && w.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// Facts derived from a reference: numbers, and words of ≥ 5 letters that are not function words and
/// not in the prompt; first [`MAX_DERIVED_FACTS`], without repeats. When fewer than two remain (a
/// reading-comprehension answer quotes its passage), words of the prompt are allowed back.
pub fn derived_facts(reference: &str, prompt: &str) -> Vec<String> {
    let in_prompt = normalize(prompt);
    let pick = |skip_prompt: bool| {
        let mut out: Vec<String> = Vec::new();
        for w in normalize(reference) {
            let keep = is_number(&w)
                || (w.chars().count() >= 5
                    && !FUNCTION_WORDS.contains(&w.as_str())
                    && !(skip_prompt && in_prompt.contains(&w)));
            if keep && !out.contains(&w) {
                out.push(w);
                if out.len() == MAX_DERIVED_FACTS {
                    break;
                }
            }
        }
        out
    };
    let facts = pick(true);
    if facts.len() >= 2 {
        facts
    } else {
        pick(false)
    }
}

/// Scores one answer. `prompt` is the prompt's text (derived facts leave out its words).
pub fn score(expect: &Expect, answer: &str, prompt: &str, rules: &Rules) -> Verdict {
    let words = normalize(answer);
    let refusal = normalize(&rules.refuse_pattern);
    let declines = find(&words, &refusal);
    let long = words.len() > LONG_WORDS;
    match expect {
        Expect::Answer {
            reference,
            key_facts,
        } => {
            let ref_words = normalize(reference);
            if key_facts.is_none() && ref_words.len() <= SHORT_WORDS {
                let exact = words == ref_words;
                return Verdict::new(
                    exact,
                    if exact {
                        "exact match".into()
                    } else {
                        format!("not exactly «{reference}»")
                    },
                )
                .borderline(
                    !exact && find(&words, &ref_words).is_some(),
                    "the reference is there, with other words around it",
                )
                .borderline(exact && declines.is_some(), "also declines");
            }
            let (facts, need_all) = match key_facts {
                Some(k) => (k.clone(), true),
                None => (derived_facts(reference, prompt), false),
            };
            if facts.is_empty() {
                return Verdict::new(
                    false,
                    "no key facts could be derived from the reference".into(),
                )
                .borderline(true, "no key facts to check: read it");
            }
            let found: Vec<&String> = facts.iter().filter(|f| occurs(&words, f)).collect();
            let missing: Vec<&String> = facts.iter().filter(|f| !occurs(&words, f)).collect();
            let pass = if need_all {
                missing.is_empty()
            } else {
                2 * found.len() >= facts.len()
            };
            let detail = format!(
                "{}/{} key facts{}",
                found.len(),
                facts.len(),
                if missing.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; missing: {}",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            Verdict::new(pass, detail)
                .borderline(
                    pass && declines.is_some(),
                    "has the facts but also declines",
                )
                .borderline(
                    pass && words.len() > (3 * ref_words.len()).max(ref_words.len() + LONG_WORDS),
                    "facts found inside a much longer answer",
                )
                .borderline(
                    !pass && 4 * found.len() >= facts.len() && !found.is_empty(),
                    "holds part of the key facts",
                )
        }
        Expect::Refuse => {
            let pass = declines.is_some();
            let soft = SOFT_REFUSALS.iter().any(|s| occurs(&words, s));
            Verdict::new(
                pass,
                if pass {
                    format!("declines («{}»)", rules.refuse_pattern)
                } else {
                    format!("no «{}»", rules.refuse_pattern)
                },
            )
            .borderline(
                declines.is_some_and(|i| i >= START_WORDS),
                "the refusal is not at the start",
            )
            .borderline(pass && long, "the refusal sits in a long answer")
            .borderline(!pass && soft, "declines without the exact pattern")
        }
        Expect::Premise { key_facts } => {
            let marker = rules
                .premise_markers
                .iter()
                .filter_map(|m| find(&words, &normalize(m)).map(|i| (i, m)))
                .min();
            let missing: Vec<&String> = key_facts.iter().filter(|f| !occurs(&words, f)).collect();
            let pass = marker.is_some() && missing.is_empty();
            let detail = match (marker, missing.is_empty()) {
                (Some((_, m)), true) => format!("rejects («{m}»)"),
                (Some((_, m)), false) => format!(
                    "rejects («{m}») but misses {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (None, _) => "no premise marker".into(),
            };
            let negates = words
                .iter()
                .take(START_WORDS)
                .any(|w| w == "no" || w == "not");
            Verdict::new(pass, detail)
                .borderline(
                    marker.is_some_and(|(i, _)| i >= START_WORDS) && long,
                    "the marker sits late in a long answer",
                )
                .borderline(pass && declines.is_some(), "rejects but also declines")
                .borderline(
                    marker.is_none() && negates && declines.is_none(),
                    "opens with a negation but names no marker",
                )
        }
        Expect::Json { keys } => {
            let check = |v: &serde_json::Value| -> Result<(), String> {
                let objs: Vec<&serde_json::Map<String, serde_json::Value>> = match v {
                    serde_json::Value::Object(o) => vec![o],
                    serde_json::Value::Array(a) if !a.is_empty() => {
                        let o: Vec<_> = a.iter().filter_map(|x| x.as_object()).collect();
                        if o.len() != a.len() {
                            return Err("a list whose elements are not all objects".into());
                        }
                        o
                    }
                    _ => return Err("JSON but not an object or a non-empty list".into()),
                };
                let missing: Vec<&String> = keys
                    .iter()
                    .filter(|k| objs.iter().any(|o| !o.contains_key(k.as_str())))
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "missing keys: {}",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            };
            match serde_json::from_str::<serde_json::Value>(answer.trim()) {
                Ok(v) => match check(&v) {
                    Ok(()) => Verdict::new(true, "valid JSON with every key".into()),
                    Err(e) => Verdict::new(false, e),
                },
                Err(e) => {
                    let inner = embedded_json(answer);
                    Verdict::new(false, format!("not JSON: {e}")).borderline(
                        inner.is_some_and(|v| check(&v).is_ok()),
                        "valid JSON with every key, but inside other text",
                    )
                }
            }
        }
    }
}

/// The JSON value between the first `{`/`[` and the last `}`/`]` (a fenced or commented answer).
fn embedded_json(answer: &str) -> Option<serde_json::Value> {
    let start = answer.find(['{', '['])?;
    let end = answer.rfind(['}', ']'])?;
    (end > start)
        .then(|| serde_json::from_str(&answer[start..=end]).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(reference: &str, facts: Option<&[&str]>) -> Expect {
        Expect::Answer {
            reference: reference.into(),
            key_facts: facts.map(|f| f.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn s(e: &Expect, a: &str) -> Verdict {
        score(e, a, "¿Cuál es la masa molar del agua?", &Rules::default())
    }

    #[test]
    fn normalization_folds_case_accents_punctuation_and_decimals() {
        assert_eq!(
            normalize("«Según» el TEXTO, 18,02 g/mol; 16,00 y 3.50. ¡Año!"),
            ["segun", "el", "texto", "18.02", "g", "mol", "16", "y", "3.5", "ano"]
        );
        assert_eq!(normalize("No lo sé."), ["no", "lo", "se"]);
        assert_eq!(normalize("1, 2"), ["1", "2"]);
    }

    #[test]
    fn short_answers_must_match_exactly() {
        let e = answer("París.", None);
        assert!(s(&e, "parís").pass);
        let v = s(&e, "Creo que es París, la capital");
        assert!(!v.pass);
        assert!(v.borderline.is_some(), "{v:?}");
        let v = s(&e, "Madrid");
        assert!(!v.pass && v.borderline.is_none());
    }

    #[test]
    fn explicit_key_facts_must_all_occur() {
        let e = answer(
            "Einstein recibió el Nobel de 1921.",
            Some(&["1921", "efecto fotoeléctrico"]),
        );
        assert!(s(&e, "En 1921, por el efecto fotoelectrico.").pass);
        let v = s(&e, "En 1921.");
        assert!(!v.pass);
        assert!(
            v.detail.contains("missing: efecto fotoeléctrico"),
            "{}",
            v.detail
        );
        assert_eq!(v.borderline.as_deref(), Some("holds part of the key facts"));
    }

    #[test]
    fn derived_facts_skip_prompt_words_and_need_half() {
        let reference = "Aproximadamente 18,02 g/mol: 2 × 1,008 (hidrógeno) + 16,00 (oxígeno).";
        let f = derived_facts(reference, "¿Cuál es la masa molar del agua?");
        assert_eq!(f, ["18.02", "2", "1.008", "hidrogeno", "16", "oxigeno"]);
        let e = answer(reference, None);
        assert!(s(&e, "Unos 18,02 g/mol, sumando hidrógeno y oxígeno.").pass);
        assert!(!s(&e, "Unos 20 gramos.").pass);
    }

    #[test]
    fn derived_facts_fall_back_to_prompt_words_for_comprehension() {
        let passage =
            "Texto: La Alhambra se construyó durante la dinastía nazarí, en los siglos XIII y XV.";
        let reference = "Según el texto, durante la dinastía nazarí, entre los siglos XIII y XV.";
        assert_eq!(
            derived_facts(reference, passage),
            ["dinastia", "nazari", "siglos"]
        );
        let e = answer(reference, None);
        let v = score(
            &e,
            "Según el texto, la dinastía nazarí.",
            passage,
            &Rules::default(),
        );
        assert!(v.pass, "{v:?}");
    }

    #[test]
    fn answer_borderlines() {
        let e = answer(
            "La fotosíntesis produce oxígeno y glucosa a partir de luz.",
            None,
        );
        let v = s(&e, "No lo sé, pero produce oxígeno y glucosa con luz.");
        assert!(v.pass);
        assert_eq!(
            v.borderline.as_deref(),
            Some("has the facts but also declines")
        );
        let long = format!("{} oxígeno glucosa fotosíntesis", "bla ".repeat(60));
        let v = s(&e, &long);
        assert!(v.pass);
        assert_eq!(
            v.borderline.as_deref(),
            Some("facts found inside a much longer answer")
        );
        let v = s(&e, "Produce agua.");
        assert!(!v.pass && v.borderline.is_none(), "{v:?}");
    }

    #[test]
    fn refusal_rules_and_their_borderlines() {
        let e = Expect::Refuse;
        let v = s(&e, "No lo sé: no tengo constancia de ese artículo.");
        assert!(v.pass && v.borderline.is_none(), "{v:?}");
        // A refusal pattern inside a long invented answer passes, but is flagged.
        let invented = format!(
            "El artículo lo escribió Pérez en 1987 y demostró {} aunque no lo sé con certeza.",
            "que la hipótesis es cierta ".repeat(10)
        );
        let v = s(&e, &invented);
        assert!(v.pass);
        assert_eq!(
            v.borderline.as_deref(),
            Some("the refusal is not at the start")
        );
        let v = s(&e, "No tengo constancia de ese autor.");
        assert!(!v.pass);
        assert_eq!(
            v.borderline.as_deref(),
            Some("declines without the exact pattern")
        );
        let v = s(&e, "Lo escribió Pérez en 1987.");
        assert!(!v.pass && v.borderline.is_none());
        // The pattern is configurable.
        let r = Rules {
            refuse_pattern: "I don't know".into(),
            ..Rules::default()
        };
        assert!(score(&e, "I don't know.", "", &r).pass);
        assert!(!score(&e, "No lo sé.", "", &r).pass);
    }

    #[test]
    fn premise_rules_and_their_borderlines() {
        let e = Expect::Premise { key_facts: vec![] };
        assert!(s(&e, "La premisa es falsa: no es visible desde la Luna.").pass);
        assert!(s(&e, "Es un mito. Los peces recuerdan durante meses.").pass);
        let v = s(&e, "No escribió esa novela; es de García Márquez.");
        assert!(!v.pass);
        assert_eq!(
            v.borderline.as_deref(),
            Some("opens with a negation but names no marker")
        );
        let v = s(&e, "Porque el vidrio fluye despacio.");
        assert!(!v.pass && v.borderline.is_none());
        let e = Expect::Premise {
            key_facts: vec!["1921".into()],
        };
        let v = s(&e, "En realidad lo ganó en 1922.");
        assert!(!v.pass && v.detail.contains("misses 1921"), "{v:?}");
        assert!(s(&e, "En realidad lo ganó en 1921.").pass);
        let v = s(&e, "No lo sé, pero en realidad fue en 1921.");
        assert!(v.pass);
        assert_eq!(v.borderline.as_deref(), Some("rejects but also declines"));
    }

    #[test]
    fn json_rules_and_their_borderlines() {
        let e = Expect::Json {
            keys: vec!["fecha".into(), "hora".into()],
        };
        assert!(s(&e, r#" {"fecha": "14 de junio", "hora": null} "#).pass);
        assert!(s(&e, r#"[{"fecha": 1, "hora": 2}, {"fecha": 3, "hora": 4}]"#).pass);
        let v = s(&e, r#"[{"fecha": 1, "hora": 2}, {"fecha": 3}]"#);
        assert!(!v.pass && v.detail == "missing keys: hora", "{v:?}");
        let v = s(&e, r#"{"fecha": 1}"#);
        assert!(!v.pass && v.borderline.is_none());
        assert!(!s(&e, "[]").pass);
        assert!(!s(&e, "[1, 2]").pass);
        let v = s(&e, "Aquí tienes: ```json\n{\"fecha\": 1, \"hora\": 2}\n```");
        assert!(!v.pass);
        assert!(v.detail.starts_with("not JSON"));
        assert_eq!(
            v.borderline.as_deref(),
            Some("valid JSON with every key, but inside other text")
        );
        assert!(s(&e, "fecha: hoy").borderline.is_none());
    }

    #[test]
    fn verdicts_are_deterministic() {
        let e = answer(
            "La fotosíntesis produce oxígeno y glucosa a partir de luz.",
            None,
        );
        let a = "Produce oxígeno.";
        assert_eq!(s(&e, a), s(&e, a));
    }
}
