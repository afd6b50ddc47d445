//! Deterministic synthetic conversations for the data-pipeline benchmarks (shared by
//! benches/pipeline.rs and examples/bench_pipeline.rs): messages JSONL, two exchanges,
//! ~340 tokens per sample with the project tokenizer.

const WORDS: &[&str] = &[
    "el",
    "la",
    "los",
    "las",
    "un",
    "una",
    "de",
    "del",
    "en",
    "con",
    "por",
    "para",
    "según",
    "sobre",
    "entre",
    "sin",
    "estudio",
    "resultado",
    "hipótesis",
    "método",
    "datos",
    "muestra",
    "análisis",
    "teoría",
    "evidencia",
    "autor",
    "texto",
    "pregunta",
    "respuesta",
    "fuente",
    "artículo",
    "experimento",
    "medida",
    "error",
    "valor",
    "media",
    "proceso",
    "célula",
    "energía",
    "agua",
    "temperatura",
    "presión",
    "historia",
    "siglo",
    "país",
    "ciudad",
    "muestra",
    "indica",
    "sugiere",
    "confirma",
    "contradice",
    "explica",
    "describe",
    "compara",
    "mide",
    "calcula",
    "no",
    "sí",
    "también",
    "además",
    "sin embargo",
    "porque",
    "aunque",
    "cuando",
    "donde",
    "como",
    "más",
    "menos",
    "importante",
    "preciso",
    "riguroso",
    "incierto",
    "probable",
    "posible",
    "claro",
    "breve",
    "largo",
    "nuevo",
    "the",
    "study",
    "result",
    "evidence",
    "data",
    "is",
    "was",
    "not",
    "and",
    "or",
    "but",
    "of",
    "in",
    "to",
];

/// Deterministic text of about `words` words.
fn sentence(rng: &mut u64, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = WORDS[(*rng >> 33) as usize % WORDS.len()];
        if i > 0 {
            s.push(' ');
        }
        if i == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push_str(w);
        }
        if i % 11 == 10 {
            s.push_str(if i % 3 == 0 { "." } else { "," });
        }
    }
    s.push('.');
    s
}

pub fn generate(n: usize) -> String {
    let mut rng = 42u64;
    let mut out = String::with_capacity(n * 1500);
    for _ in 0..n {
        let msgs = serde_json::json!({"messages": [
            {"role": "user", "content": sentence(&mut rng, 40)},
            {"role": "assistant", "content": sentence(&mut rng, 80)},
            {"role": "user", "content": sentence(&mut rng, 30)},
            {"role": "assistant", "content": sentence(&mut rng, 80)},
        ]});
        out.push_str(&msgs.to_string());
        out.push('\n');
    }
    out
}
