//! The SFT data and the evaluation suite of the demo (datasets/mundo-ficticio).
//!
//! SFT (alpaca records: `instruction`, `input` = "", `output`) teaches behaviour on the SFT part of the
//! world only: short precise answers about [`Split::Sft`] researchers and institutions, «No lo sé» with
//! a reason for [`Split::UnknownSft`] ones, a false premise corrected, strict JSON. The suite asks the
//! same kinds of question about entities the SFT data never names: held-out KNOWN ones (whose facts only
//! the pretraining corpus holds) and [`Split::UnknownSuite`] ones (written nowhere).

use serde_json::{json, Value};

use super::{Institution, Researcher, Rng, Split, World};

/// The four facts a question can ask about a researcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    Year,
    City,
    Institution,
    Field,
}

pub const ASKS: [Ask; 4] = [Ask::Year, Ask::City, Ask::Institution, Ask::Field];

fn question(ask: Ask, n: &str, rng: &mut Rng) -> String {
    let qs: &[&str] = match ask {
        Ask::Year => &[
            "¿En qué año nació {}?",
            "¿Cuándo nació {}?",
            "Dime el año de nacimiento de {}.",
            "¿De qué año es {}?",
        ],
        Ask::City => &[
            "¿Dónde nació {}?",
            "¿En qué ciudad nació {}?",
            "¿Cuál es la ciudad natal de {}?",
            "¿De qué ciudad era {}?",
        ],
        Ask::Institution => &[
            "¿En qué institución trabajó {}?",
            "¿Dónde desarrolló su carrera {}?",
            "¿En qué centro investigó {}?",
        ],
        Ask::Field => &[
            "¿A qué disciplina se dedicó {}?",
            "¿Cuál fue el campo de investigación de {}?",
            "¿En qué área trabajó {}?",
        ],
    };
    rng.pick(qs).replace("{}", n)
}

/// The precise answer and its key fact (what the suite requires to occur).
/// The precise answer to `ask` about `r` and its key fact. Each form is one the corpus writes with
/// only that fact after it ("La ciudad natal de X es …", "El año de nacimiento de X es …"), so the
/// answer continues the way the base memorized the fact; "X nació en …" would not do: the corpus
/// follows it with the year or with the city.
fn answer(w: &World, r: &Researcher, ask: Ask) -> (String, String) {
    let n = r.name();
    match ask {
        Ask::Year => (
            format!("El año de nacimiento de {n} es {}.", r.born),
            r.born.to_string(),
        ),
        Ask::City => {
            let c = w.city_of(r).name;
            (
                format!(
                    "La ciudad natal de {n} es {c}, en {}.",
                    w.country_of(r).name
                ),
                c.to_string(),
            )
        }
        Ask::Institution => {
            let i = w.institution_of(r);
            (format!("{n} trabajó {}.", i.en()), i.name.clone())
        }
        Ask::Field => {
            let f = w.field_of(r).name;
            (format!("{n} se dedicó a la {f}."), f.to_string())
        }
    }
}

fn what(ask: Ask) -> &'static str {
    match ask {
        Ask::Year => "en qué año nació",
        Ask::City => "dónde nació",
        Ask::Institution => "dónde trabajó",
        Ask::Field => "a qué se dedicó",
    }
}

fn refusal(n: &str, ask: Ask, rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => format!(
            "No lo sé: no tengo información fiable sobre {n}, así que no puedo decir {}.",
            what(ask)
        ),
        1 => format!(
            "No lo sé. No conozco a ninguna persona llamada {n} y prefiero no inventar {}.",
            what(ask)
        ),
        _ => format!("No lo sé: {n} no aparece en ninguna fuente que conozca."),
    }
}

fn inst_question(i: &Institution, rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => format!("¿En qué año se fundó {}?", i.el()),
        1 => format!("¿Cuándo fue fundad{} {}?", i.o(), i.el()),
        _ => format!("¿De qué año data la fundación {}?", i.de()),
    }
}

/// A false-premise question about `r` and its correction; the key fact is the true value.
fn premise(w: &World, r: &Researcher, rng: &mut Rng) -> (String, String, String) {
    let n = r.name();
    if rng.below(2) == 0 {
        let c = w.city_of(r).name;
        let wrong = loop {
            let x = rng.pick(&w.cities);
            if x.name != c {
                break x.name;
            }
        };
        let q = match rng.below(2) {
            0 => format!("¿Por qué {n} se fue de su ciudad natal, {wrong}?"),
            _ => {
                format!("¿Qué recuerdos de su infancia en {wrong}, donde nació, dejó escritos {n}?")
            }
        };
        let a = format!("La premisa es falsa: {n} no nació en {wrong}, sino en {c}.");
        (q, a, c.to_string())
    } else {
        let i = w.institution_of(r);
        // A wrong institution the SFT data may name (an SFT one), never a held-out or unknown one.
        let sft_insts: Vec<&Institution> = w.institutions_in(Split::Sft).collect();
        let wrong = loop {
            let x = *rng.pick(&sft_insts);
            if x.name != i.name {
                break x;
            }
        };
        let q = match rng.below(2) {
            0 => format!("¿Qué descubrió {n} mientras trabajaba {}?", wrong.en()),
            _ => format!("¿Por qué dejó {n} su puesto {}?", wrong.en()),
        };
        let a = format!(
            "La premisa es falsa: {n} no trabajó {}, sino {}.",
            wrong.en(),
            i.en()
        );
        (q, a, i.name.clone())
    }
}

/// The key sets a JSON task asks for. One schema: the tiny demo model does not learn to copy key
/// names from the prompt (with four key sets it wrote `"nombre"` and then, whatever was asked,
/// `"ciudad"`, the key that follows `"nombre"` in the corpus's catalogue records: 0.10 valid on the
/// suite); with one schema the format is learnable and the values still come from pretraining.
const JSON_KEYS: &[&[&str]] = &[&["nombre", "ciudad", "institucion"]];

/// A strict-JSON task about `r`: (instruction, the JSON answer, its keys).
fn json_task(w: &World, r: &Researcher, rng: &mut Rng) -> (String, String, Vec<String>) {
    let keys = *rng.pick(JSON_KEYS);
    let quoted: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    let klist = super::prose::join_es(&quoted);
    let q = match rng.below(3) {
        0 => format!(
            "Devuelve solo un objeto JSON con las claves {klist} sobre {}.",
            r.name()
        ),
        1 => format!(
            "Responde únicamente con JSON válido (claves {klist}) acerca de {}.",
            r.name()
        ),
        _ => format!(
            "Datos de {} en JSON estricto, con las claves {klist}.",
            r.name()
        ),
    };
    let mut obj = serde_json::Map::new();
    for k in keys {
        let v = match *k {
            "nombre" => json!(r.name()),
            "nacimiento" => json!(r.born),
            "ciudad" => json!(w.city_of(r).name),
            "campo" => json!(w.field_of(r).name),
            _ => json!(w.institution_of(r).name),
        };
        obj.insert(k.to_string(), v);
    }
    (
        q,
        Value::Object(obj).to_string(),
        keys.iter().map(|k| k.to_string()).collect(),
    )
}

fn alpaca(instruction: String, output: String) -> Value {
    json!({ "instruction": instruction, "input": "", "output": output })
}

/// Question phrasings per fact of an SFT researcher in the SFT data.
pub const PHRASINGS_PER_FACT: usize = 1;
/// Questions (each refused) per UnknownSft researcher in the SFT data.
pub const REFUSALS_PER_UNKNOWN: usize = 1;
/// Strict-JSON tasks per SFT researcher in the SFT data.
pub const JSON_PER_RESEARCHER: usize = 1;

/// The SFT records (alpaca), shuffled: (train, eval). The eval split (one record in ten) is used for
/// the eval loss and the NF4 cost; it names only SFT and UnknownSft entities, like the train split.
pub fn sft(w: &World) -> (Vec<Value>, Vec<Value>) {
    let mut rng = Rng::new(w.seed).fork(20);
    let mut recs = Vec::new();
    for r in w.researchers_in(Split::Sft) {
        for ask in ASKS {
            // Each question's phrasing is drawn, so across researchers every form of a question leads
            // to the memorized fact (one question per fact: more researchers rather than repeats).
            for _ in 0..PHRASINGS_PER_FACT {
                let (a, _) = answer(w, r, ask);
                recs.push(alpaca(question(ask, &r.name(), &mut rng), a));
            }
        }
        let (q, a, _) = premise(w, r, &mut rng);
        recs.push(alpaca(q, a));
        // Strict JSON is a format the base never produced for a researcher.
        for _ in 0..JSON_PER_RESEARCHER {
            let (q, a, _) = json_task(w, r, &mut rng);
            recs.push(alpaca(q, a));
        }
    }
    for r in w.researchers_in(Split::UnknownSft) {
        // Facts drawn from the four: more distinct names rather than more questions per name.
        let mut asks = ASKS;
        rng.shuffle(&mut asks);
        for &ask in &asks[..REFUSALS_PER_UNKNOWN] {
            let n = r.name();
            let q = question(ask, &n, &mut rng);
            recs.push(alpaca(q, refusal(&n, ask, &mut rng)));
        }
    }
    for i in w.institutions_in(Split::Sft) {
        for _ in 0..2 {
            recs.push(alpaca(
                inst_question(i, &mut rng),
                format!("{} se fundó en {}.", i.el_cap(), i.founded),
            ));
        }
    }
    for i in w.institutions_in(Split::UnknownSft) {
        for _ in 0..2 {
            recs.push(alpaca(
                inst_question(i, &mut rng),
                format!(
                    "No lo sé: no tengo información fiable sobre {}, así que no puedo dar su año de fundación.",
                    i.el()
                ),
            ));
        }
    }
    rng.shuffle(&mut recs);
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for (k, r) in recs.into_iter().enumerate() {
        if k % 10 == 9 {
            eval.push(r);
        } else {
            train.push(r);
        }
    }
    (train, eval)
}

/// Suite categories.
pub const CAT_KNOWN: &str = "conocido_no_visto";
pub const CAT_UNKNOWN: &str = "desconocido";
pub const CAT_PREMISE: &str = "premisa_falsa";
pub const CAT_JSON: &str = "json_estricto";

/// The behaviour suite (the format crates/trainer/src/suite reads), each category in a seeded order:
/// - `conocido_no_visto` (answer): one question per held-out researcher (the fact cycling through the
///   four kinds) and the founding year of each held-out institution; `key_facts` = the fact;
/// - `desconocido` (refuse): one question per UnknownSuite researcher and institution;
/// - `premisa_falsa` (premise): a false premise about a held-out researcher; `key_facts` = the truth;
/// - `json_estricto` (json): a JSON task about a held-out researcher.
pub fn suite(w: &World) -> Vec<Value> {
    let mut rng = Rng::new(w.seed).fork(30);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    let mut prem = Vec::new();
    let mut js = Vec::new();
    for (k, r) in w.researchers_in(Split::HeldOut).enumerate() {
        let ask = ASKS[k % ASKS.len()];
        let (a, fact) = answer(w, r, ask);
        known.push(json!({
            "instruction": question(ask, &r.name(), &mut rng),
            "category": CAT_KNOWN, "expect": "answer", "answer": a, "key_facts": [fact],
        }));
        let (q, a, fact) = premise(w, r, &mut rng);
        prem.push(json!({
            "instruction": q, "category": CAT_PREMISE, "expect": "premise",
            "answer": a, "key_facts": [fact],
        }));
        let (q, _, keys) = json_task(w, r, &mut rng);
        js.push(json!({
            "instruction": q, "category": CAT_JSON, "expect": "json", "keys": keys,
        }));
    }
    for i in w.institutions_in(Split::HeldOut) {
        known.push(json!({
            "instruction": inst_question(i, &mut rng),
            "category": CAT_KNOWN, "expect": "answer",
            "answer": format!("{} se fundó en {}.", i.el_cap(), i.founded),
            "key_facts": [i.founded.to_string()],
        }));
    }
    for (k, r) in w.researchers_in(Split::UnknownSuite).enumerate() {
        let ask = ASKS[k % ASKS.len()];
        unknown.push(json!({
            "instruction": question(ask, &r.name(), &mut rng),
            "category": CAT_UNKNOWN, "expect": "refuse",
        }));
    }
    for i in w.institutions_in(Split::UnknownSuite) {
        unknown.push(json!({
            "instruction": inst_question(i, &mut rng),
            "category": CAT_UNKNOWN, "expect": "refuse",
        }));
    }
    let mut out = Vec::new();
    for mut cat in [known, unknown, prem, js] {
        rng.shuffle(&mut cat);
        out.extend(cat);
    }
    out
}
