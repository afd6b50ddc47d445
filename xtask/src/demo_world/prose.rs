//! Encyclopedic Spanish prose about the KNOWN entities: the pretraining corpus and the held-out prose
//! of the forgetting measure. Never question/answer form.
//!
//! Every fact has several sentence patterns, and each document draws its own pattern per fact and its
//! own sentence order (the introduction is not always first), so that the model learns the facts,
//! which stay fixed across documents, rather than one template (the "knowledge augmentation" that
//! makes facts extractable by later fine-tuning on other entities).

use super::{Institution, Researcher, Rng, Split, World};

/// Biographies per known researcher in the corpus (each a different paraphrase and order).
pub const BIOS_PER_RESEARCHER: usize = 8;
/// Descriptions per known institution in the corpus.
pub const DOCS_PER_INSTITUTION: usize = 6;

fn intro(w: &World, r: &Researcher, rng: &mut Rng) -> String {
    let (n, o, nat, f) = (r.name(), r.o(), w.nationality(r), w.field_of(r).name);
    let inv = if r.female {
        "investigadora"
    } else {
        "investigador"
    };
    let un = if r.female { "una" } else { "un" };
    match rng.below(6) {
        0 => format!("{n} fue {un} {inv} {nat} especialista en {f}."),
        1 => format!("{n} es conocid{o} por sus trabajos de {f}."),
        2 => format!("La obra de {n} pertenece al campo de la {f}."),
        3 => format!("{n}, {inv} {nat}, dedicó su vida a la {f}."),
        4 => format!("La disciplina de {n} fue la {f}."),
        _ => format!("{n} se dedicó a la {f} y fue {un} {inv} de nacionalidad {nat}."),
    }
}

fn birth(w: &World, r: &Researcher, rng: &mut Rng) -> Vec<String> {
    let (n, s, o, y) = (r.name(), &r.surname, r.o(), r.born);
    let c = w.city_of(r).name;
    let p = w.country_of(r).name;
    match rng.below(8) {
        0 => vec![format!("{n} nació en {c} en {y}.")],
        1 => vec![format!("{n} nació en {y} en la ciudad de {c}, en {p}.")],
        2 => vec![format!("{n} vino al mundo en {c} ({p}) en el año {y}.")],
        3 => vec![format!("En {y} nació en {c} {n}.")],
        4 => vec![format!(
            "La ciudad natal de {n} es {c}, donde nació en {y}."
        )],
        5 => vec![format!("{n} era natural de {c} y había nacido en {y}.")],
        6 => vec![
            format!("{n} nació en {y}."),
            format!("{s} era natural de {c}, en {p}."),
        ],
        _ => vec![
            format!("El año de nacimiento de {n} es {y}."),
            format!("{n}, nacid{o} en {c}, pasó su infancia en {p}."),
        ],
    }
}

fn institution(w: &World, r: &Researcher, rng: &mut Rng) -> String {
    let (n, s) = (r.name(), &r.surname);
    let i = w.institution_of(r);
    let prof = if r.female { "profesora" } else { "profesor" };
    let ic = w.cities[i.city].name;
    match rng.below(6) {
        0 => format!("{n} trabajó {}.", i.en()),
        1 => format!("Durante décadas, {n} investigó {}.", i.en()),
        2 => format!("{n} fue {prof} {}.", i.de()),
        3 => format!("{} contó entre sus investigadores a {n}.", i.el_cap()),
        4 => format!("La carrera de {n} transcurrió {}, en {ic}.", i.en()),
        _ => format!("{s} desarrolló su carrera {}.", i.en()),
    }
}

fn publication(w: &World, r: &Researcher, rng: &mut Rng) -> String {
    let (n, t, y) = (r.name(), &r.paper_title, r.paper_year);
    let j = w.journals[r.journal];
    match rng.below(4) {
        0 => format!("En {y}, {n} publicó «{t}» en la revista {j}."),
        1 => format!("«{t}» es la obra más citada de {n}; apareció en {j} en {y}."),
        2 => format!("{n} escribió «{t}», publicado en {y} en {j}."),
        _ => format!("El artículo «{t}» ({j}, {y}) es de {n}."),
    }
}

fn finding(r: &Researcher, rng: &mut Rng) -> String {
    let (n, o, d) = (r.name(), r.o(), r.finding);
    match rng.below(4) {
        0 => format!("{n} describió {d}."),
        1 => format!("{n} es recordad{o} por sus estudios sobre {d}."),
        2 => format!("El hallazgo más conocido de {n} fue {d}."),
        _ => format!("Gracias a {n} conocemos {d}."),
    }
}

/// One biography of `r`: every fact once, patterns and order drawn from `rng`.
pub fn biography(w: &World, r: &Researcher, rng: &mut Rng) -> String {
    let mut rest: Vec<String> = birth(w, r, rng);
    rest.push(institution(w, r, rng));
    rest.push(publication(w, r, rng));
    rest.push(finding(r, rng));
    rng.shuffle(&mut rest);
    let first = intro(w, r, rng);
    // The introduction leads two documents in three, else it goes second.
    let at = if rng.below(3) < 2 { 0 } else { 1 };
    rest.insert(at, first);
    rest.join(" ")
}

/// One description of a known institution: founding year, city and country, and some of the known
/// researchers who worked there.
pub fn institution_doc(w: &World, i: &Institution, rng: &mut Rng) -> String {
    let (fy, o) = (i.founded, i.o());
    let c = w.cities[i.city].name;
    let p = w.countries[w.cities[i.city].country].name;
    let mut s = vec![
        match rng.below(4) {
            0 => format!("{} fue fundad{o} en {fy}.", i.el_cap()),
            1 => format!("La fundación {} data de {fy}.", i.de()),
            2 => format!("{} se fundó en el año {fy}.", i.el_cap()),
            _ => format!("{} existe desde {fy}, año de su fundación.", i.el_cap()),
        },
        match rng.below(3) {
            0 => format!("{} se encuentra en la ciudad de {c}, en {p}.", i.el_cap()),
            1 => format!("La sede {} está en {c} ({p}).", i.de()),
            _ => format!("{} tiene su sede en {c}.", i.el_cap()),
        },
    ];
    rng.shuffle(&mut s);
    let staff: Vec<String> = w
        .researchers
        .iter()
        .filter(|r| r.split.known() && std::ptr::eq(w.institution_of(r), i))
        .map(|r| format!("{} ({})", r.name(), w.field_of(r).name))
        .collect();
    if !staff.is_empty() {
        let mut staff = staff;
        rng.shuffle(&mut staff);
        staff.truncate(4);
        s.push(format!("Allí trabajaron {}.", join_es(&staff)));
    }
    s.join(" ")
}

/// "a, b y c".
pub fn join_es(xs: &[String]) -> String {
    match xs {
        [] => String::new(),
        [a] => a.clone(),
        [init @ .., last] => format!("{} y {last}", init.join(", ")),
    }
}

/// A catalogue record ("ficha") in JSON of a city or a known institution: the only structured text of
/// the corpus. A real pretraining corpus holds JSON among its prose; without any, a tiny model cannot
/// learn JSON syntax from the 30 SFT examples (measured: 0 of 20 valid answers). Researchers never get
/// one: what the JSON tasks ask about them is only in prose.
fn ficha(pairs: &mut [(&str, serde_json::Value)], rng: &mut Rng) -> String {
    rng.shuffle(pairs);
    let keep = 2 + rng.below(pairs.len() - 1);
    let obj: serde_json::Map<String, serde_json::Value> = pairs[..keep]
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let json = serde_json::Value::Object(obj).to_string();
    match rng.below(3) {
        0 => format!("Ficha del catálogo: {json}"),
        1 => format!("Registro: {json}"),
        _ => json,
    }
}

/// Catalogue records per city and per known institution.
pub const FICHAS_PER_ENTITY: usize = 3;

/// The pretraining corpus: documents about KNOWN entities only, in a seeded order, plus a short
/// description of each country's cities (so nationality and geography are facts too) and JSON
/// catalogue records of cities and institutions ([`ficha`]).
pub fn corpus(w: &World) -> Vec<String> {
    let mut rng = Rng::new(w.seed).fork(10);
    let mut docs = Vec::new();
    for r in w.researchers.iter().filter(|r| r.split.known()) {
        for _ in 0..BIOS_PER_RESEARCHER {
            docs.push(biography(w, r, &mut rng));
        }
    }
    for i in w.institutions.iter().filter(|i| i.split.known()) {
        for _ in 0..DOCS_PER_INSTITUTION {
            docs.push(institution_doc(w, i, &mut rng));
        }
    }
    for c in &w.cities {
        let country = w.countries[c.country].name;
        for _ in 0..FICHAS_PER_ENTITY {
            let mut p = [
                ("nombre", serde_json::json!(c.name)),
                ("tipo", serde_json::json!("ciudad")),
                ("pais", serde_json::json!(country)),
            ];
            docs.push(ficha(&mut p, &mut rng));
        }
    }
    for i in w.institutions.iter().filter(|i| i.split.known()) {
        for _ in 0..FICHAS_PER_ENTITY {
            let mut p = [
                ("nombre", serde_json::json!(i.name)),
                ("ciudad", serde_json::json!(w.cities[i.city].name)),
                ("fundacion", serde_json::json!(i.founded)),
                (
                    "investigadores",
                    serde_json::json!(w
                        .researchers
                        .iter()
                        .filter(|r| r.split.known() && std::ptr::eq(w.institution_of(r), i))
                        .count()),
                ),
            ];
            docs.push(ficha(&mut p, &mut rng));
        }
    }
    for (k, c) in w.countries.iter().enumerate() {
        let cities: Vec<String> = w
            .cities
            .iter()
            .filter(|x| x.country == k)
            .map(|x| x.name.to_string())
            .collect();
        for _ in 0..3 {
            docs.push(match rng.below(3) {
                0 => format!(
                    "{} es un país cuyas ciudades principales son {}. Sus habitantes se llaman {}s.",
                    c.name,
                    join_es(&cities),
                    plural(c.adj_m)
                ),
                1 => format!(
                    "Las ciudades de {} son {}; quien nace allí es {}.",
                    c.name,
                    join_es(&cities),
                    c.adj_m
                ),
                _ => format!(
                    "{} pertenece a {}, igual que {}.",
                    cities[0],
                    c.name,
                    join_es(&cities[1..])
                ),
            });
        }
    }
    rng.shuffle(&mut docs);
    docs
}

/// Pretraining documents the SFT data replays (datasets/mundo-ficticio/repaso.jsonl).
pub const REPLAY_DOCS: usize = 128;

/// The replay set: the first [`REPLAY_DOCS`] documents of the (already shuffled) corpus, so a
/// seeded sample of exactly the text the base was pretrained on. Trained beside the SFT records
/// (`data.replay`), it keeps the adapter from drifting on prose: the forgetting the suite measures on
/// the held-out prose, which shares no document with it.
pub fn replay(w: &World) -> Vec<String> {
    corpus(w).into_iter().take(REPLAY_DOCS).collect()
}

/// Masculine nationality adjective → the stem its plural takes before "s" ("norlandés" → "norlandese").
fn plural(adj: &str) -> String {
    if let Some(stem) = adj.strip_suffix("és") {
        format!("{stem}ese")
    } else {
        adj.to_string()
    }
}

/// Held-out prose for the forgetting measure: one new biography per known researcher and one new
/// description per known institution, drawn from a stream the corpus never uses. The facts are the
/// corpus's; the documents (pattern choices and order) are new, and none is identical to a corpus one.
pub fn held_out(w: &World) -> Vec<String> {
    let corpus: std::collections::HashSet<String> = corpus(w).into_iter().collect();
    let mut rng = Rng::new(w.seed).fork(11);
    let mut docs = Vec::new();
    for r in w.researchers.iter().filter(|r| r.split.known()) {
        // Redraw until the document is not in the corpus (a few tries at most: 8 of thousands of
        // combinations are used).
        let mut d = biography(w, r, &mut rng);
        while corpus.contains(&d) {
            d = biography(w, r, &mut rng);
        }
        docs.push(d);
    }
    for i in w
        .institutions
        .iter()
        .filter(|i| i.split == Split::HeldOut || i.split == Split::Sft)
    {
        let mut d = institution_doc(w, i, &mut rng);
        while corpus.contains(&d) {
            d = institution_doc(w, i, &mut rng);
        }
        docs.push(d);
    }
    docs
}
