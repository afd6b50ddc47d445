//! The fictional academic world of the demo (`cargo xtask pretrain-demo`, `cargo xtask demo-data`).
//!
//! A seeded generator ([`World::generate`]) of researchers (name, sex, birth year, birth city, field,
//! institution, a publication and a finding), institutions (city, founding year) and journals, in
//! fictional countries and cities. Every researcher and institution is either
//!
//! - **KNOWN**: described in the pretraining corpus ([`prose`]), in many paraphrases. The known
//!   researchers are split again: those the SFT data asks about ([`Split::Sft`]) and those only the
//!   evaluation suite asks about ([`Split::HeldOut`]), whose answers can only come from pretraining;
//! - **UNKNOWN**: never written anywhere; their names appear only in questions, either in the SFT data
//!   (taught to answer «No lo sé») or in the suite (a disjoint set, to test that the refusal generalizes).
//!
//! Everything is a pure function of the seed (a SplitMix64 stream, [`Rng`]), so the committed datasets
//! and the corpus rebuilt by `pretrain-demo` always agree.

pub mod prose;
pub mod sft;

/// SplitMix64: a tiny, well-mixed deterministic stream (no dependency, stable across platforms).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant at these sizes).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn range(&mut self, lo: u32, hi_inclusive: u32) -> u32 {
        lo + self.below((hi_inclusive - lo + 1) as usize) as u32
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
    /// A child stream, so adding draws to one part of the generator never shifts another part.
    pub fn fork(&mut self, tag: u64) -> Rng {
        Rng::new(self.next_u64() ^ tag.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }
}

/// Who may see an entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Known (in the corpus) and asked about in the SFT data.
    Sft,
    /// Known (in the corpus), asked about only by the evaluation suite.
    HeldOut,
    /// Never in the corpus; asked about (refusal taught) in the SFT data.
    UnknownSft,
    /// Never in the corpus nor in the SFT data; asked about only by the suite.
    UnknownSuite,
}

impl Split {
    pub fn known(self) -> bool {
        matches!(self, Split::Sft | Split::HeldOut)
    }
}

#[derive(Clone, Debug)]
pub struct Country {
    pub name: &'static str,
    /// Nationality adjective, masculine and feminine.
    pub adj_m: &'static str,
    pub adj_f: &'static str,
}

#[derive(Clone, Debug)]
pub struct City {
    pub name: &'static str,
    /// Index into [`World::countries`].
    pub country: usize,
}

#[derive(Clone, Debug)]
pub struct Field {
    /// The discipline, with its article-less noun ("botánica").
    pub name: &'static str,
    /// Findings of this field: completions of "describió …" / "demostró …".
    pub findings: &'static [&'static str],
    /// Topics for publication titles.
    pub topics: &'static [&'static str],
}

#[derive(Clone, Debug)]
pub struct Institution {
    /// "Universidad de Brisales".
    pub name: String,
    /// Grammatical gender of the name's head noun (la Universidad, el Observatorio).
    pub feminine: bool,
    pub city: usize,
    pub founded: u32,
    pub split: Split,
}

#[derive(Clone, Debug)]
pub struct Researcher {
    pub first: &'static str,
    pub surname: String,
    pub female: bool,
    pub born: u32,
    pub city: usize,
    pub field: usize,
    /// Index into [`World::institutions`] (a known one for a known researcher).
    pub institution: usize,
    pub paper_title: String,
    pub paper_year: u32,
    pub journal: usize,
    pub finding: &'static str,
    pub split: Split,
}

impl Institution {
    /// "la Universidad de X" / "el Observatorio de X".
    pub fn el(&self) -> String {
        format!("{} {}", if self.feminine { "la" } else { "el" }, self.name)
    }
    /// "La Universidad de X" / "El Observatorio de X" (sentence start).
    pub fn el_cap(&self) -> String {
        format!("{} {}", if self.feminine { "La" } else { "El" }, self.name)
    }
    /// "de la Universidad de X" / "del Observatorio de X".
    pub fn de(&self) -> String {
        format!(
            "{} {}",
            if self.feminine { "de la" } else { "del" },
            self.name
        )
    }
    /// "en la Universidad de X" / "en el Observatorio de X".
    pub fn en(&self) -> String {
        format!("en {}", self.el())
    }
    /// Gender ending of an adjective agreeing with the institution ("fundad" + o/a).
    pub fn o(&self) -> &'static str {
        if self.feminine {
            "a"
        } else {
            "o"
        }
    }
}

impl Researcher {
    /// Gender ending of an agreeing adjective or noun ("nacid" + o/a).
    pub fn o(&self) -> &'static str {
        if self.female {
            "a"
        } else {
            "o"
        }
    }
    pub fn name(&self) -> String {
        format!("{} {}", self.first, self.surname)
    }
}

/// The generated world.
#[derive(Clone, Debug)]
pub struct World {
    pub seed: u64,
    pub countries: Vec<Country>,
    pub cities: Vec<City>,
    pub fields: Vec<Field>,
    pub journals: Vec<&'static str>,
    pub institutions: Vec<Institution>,
    pub researchers: Vec<Researcher>,
}

/// How many entities of each split [`World::generate`] makes.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub sft: usize,
    pub held_out: usize,
    pub unknown_sft: usize,
    pub unknown_suite: usize,
    pub known_institutions: usize,
    pub unknown_institutions: usize,
}

/// The demo's sizes: 128 known researchers (96 asked in SFT, once per fact; 32 held out), 148 unknown
/// ones. With 32 SFT researchers asked three times per fact the refusal classifier saw 32 "known"
/// names against 128 unknown ones and also refused held-out known names (known accuracy 0.45).
pub const DEMO_SIZES: Sizes = Sizes {
    sft: 96,
    held_out: 32,
    // Many distinct unknown names, one question each: the model must learn "a name I never read →
    // No lo sé", not a list of names. Unknown researchers come after the known ones in the
    // generator's plan and draw from their own surname pools, so this count leaves the known ones,
    // and the pretraining corpus, unchanged.
    unknown_sft: 128,
    unknown_suite: 20,
    known_institutions: 16,
    unknown_institutions: 8,
};

/// The demo's seed (datasets/mundo-ficticio and the pretraining corpus).
pub const DEMO_SEED: u64 = 2024;

const COUNTRIES: &[(&str, &str, &str)] = &[
    ("Valmira", "valmirense", "valmirense"),
    ("Norlandia", "norlandés", "norlandesa"),
    ("Austeria", "austeriano", "austeriana"),
    ("Corvena", "corveno", "corvena"),
    ("Ilmaria", "ilmario", "ilmaria"),
    ("Sardonia", "sardonio", "sardonia"),
];

/// (city, country index): three cities per country.
const CITIES: &[(&str, usize)] = &[
    ("Brisales", 0),
    ("Valdemora", 0),
    ("Puerto Alcén", 0),
    ("Hélsvar", 1),
    ("Tornemark", 1),
    ("Ulvika", 1),
    ("Castrovia", 2),
    ("Menalto", 2),
    ("Rocaferra", 2),
    ("Ondarrel", 3),
    ("Sabinar", 3),
    ("Tirvano", 3),
    ("Lusquena", 4),
    ("Marbelo", 4),
    ("Quiraval", 4),
    ("Dormeca", 5),
    ("Estelva", 5),
    ("Vaduro", 5),
];

const FIELDS: &[(&str, &[&str], &[&str])] = &[
    (
        "botánica",
        &[
            "una nueva especie de helecho de las turberas",
            "el ciclo de floración de los cardos de altura",
            "la simbiosis entre líquenes y musgos de costa",
        ],
        &[
            "los helechos de montaña",
            "las semillas de los cardos",
            "la flora de las turberas",
        ],
    ),
    (
        "astronomía",
        &[
            "una estrella variable de periodo corto",
            "las manchas de un cometa periódico",
            "la rotación de las nubes de polvo interestelar",
        ],
        &[
            "las estrellas variables",
            "los cometas periódicos",
            "el polvo interestelar",
        ],
    ),
    (
        "lingüística",
        &[
            "el origen de las vocales largas en las lenguas del norte",
            "una ley de cambio fonético de las consonantes",
            "el parentesco de dos lenguas costeras",
        ],
        &[
            "las vocales largas",
            "el cambio fonético",
            "las lenguas costeras",
        ],
    ),
    (
        "química",
        &[
            "un catalizador de hierro para fijar el nitrógeno",
            "la estructura de un pigmento azul",
            "la velocidad de oxidación de los aceites",
        ],
        &[
            "los catalizadores de hierro",
            "los pigmentos azules",
            "la oxidación de los aceites",
        ],
    ),
    (
        "geología",
        &[
            "el origen volcánico de las islas del sur",
            "la edad de los glaciares de la cordillera",
            "un mineral verde de las minas de cobre",
        ],
        &[
            "las islas volcánicas",
            "los glaciares antiguos",
            "los minerales del cobre",
        ],
    ),
    (
        "estadística",
        &[
            "un método para estimar poblaciones de aves",
            "una prueba para comparar cosechas",
            "el error de las encuestas por correo",
        ],
        &[
            "las poblaciones de aves",
            "las cosechas de trigo",
            "las encuestas por correo",
        ],
    ),
    (
        "fisiología",
        &[
            "el papel del calcio en la contracción muscular",
            "la regulación del sueño en las aves",
            "la respiración de los peces de agua fría",
        ],
        &[
            "la contracción muscular",
            "el sueño de las aves",
            "la respiración de los peces",
        ],
    ),
    (
        "arqueología",
        &[
            "un puerto romano sumergido",
            "las tumbas de una cultura de la edad del bronce",
            "un calendario tallado en piedra",
        ],
        &[
            "los puertos antiguos",
            "la edad del bronce",
            "los calendarios de piedra",
        ],
    ),
    (
        "zoología",
        &[
            "la migración de una mariposa de montaña",
            "el canto de los sapos nocturnos",
            "una colonia de murciélagos de cueva",
        ],
        &[
            "las mariposas de montaña",
            "los sapos nocturnos",
            "los murciélagos de cueva",
        ],
    ),
    (
        "óptica",
        &[
            "un vidrio que no deforma los colores",
            "la polarización de la luz en los cristales",
            "un espejo curvo para telescopios pequeños",
        ],
        &[
            "los vidrios ópticos",
            "la luz polarizada",
            "los espejos curvos",
        ],
    ),
];

const JOURNALS: &[&str] = &[
    "Anales de Ciencia de Valmira",
    "Revista Boreal de Ciencias",
    "Cuadernos de Austeria",
    "Boletín Científico de Corvena",
    "Memorias de la Sociedad Ilmaria",
    "Gaceta Sardonia de Investigación",
];

const FIRST_M: &[&str] = &[
    "Tomás", "Andrés", "Julián", "Esteban", "Matías", "Rodrigo", "Gabriel", "Ignacio", "Bruno",
    "Lorenzo", "Adrián", "Emilio", "Octavio", "Gonzalo", "Rafael", "Ernesto",
];
const FIRST_F: &[&str] = &[
    "Amelia", "Inés", "Lucía", "Teresa", "Elena", "Marina", "Clara", "Rosa", "Beatriz", "Julia",
    "Olga", "Victoria", "Irene", "Noelia", "Carmen", "Sofía",
];
/// Surnames are a prefix + a suffix, each combination used at most once in a world, so no two
/// researchers share one and an unknown surname is never written in the corpus.
const SUR_PRE: &[&str] = &[
    "Bal", "Cor", "Dar", "Fen", "Gal", "Hor", "Lan", "Mer", "Nor", "Ost", "Per", "Quin", "Ros",
    "Sal", "Tor", "Zar", "Alb", "Bren", "Cas", "Mon", "Vel", "Gar", "Ulm", "Ard",
];
const SUR_SUF: &[&str] = &[
    "ueda", "avela", "ingo", "eira", "ondo", "abal", "uste", "ares", "illo", "edón", "astro",
    "umbre",
];
/// Surname prefixes of UNKNOWN researchers, never of known ones, and never a substring of the corpus
/// (a test checks it): an unknown surname is new even to a model that reads names piece by piece.
/// Recombined from the known prefixes and suffixes ("Lan" + "avela" beside a known "Lanares"), the
/// 3 M-parameter demo model read them as a known name with a typo: it rewrote "Marina Lanavela" as
/// "Marina Lanares" and answered (refusal 0.30–0.55 of unknown names). The SFT unknowns and the
/// suite's draw from separate prefixes, so the suite asks about names whose every piece is new.
const UNKNOWN_SFT_PRE: &[&str] = &[
    "Yab", "Kov", "Wil", "Jez", "Xal", "Quib", "Dub", "Fiz", "Hux", "Kib", "Pav", "Tuz",
];
const UNKNOWN_SUITE_PRE: &[&str] = &["Zub", "Wex", "Kuf"];
/// Every `prefix + suffix` surname of `prefixes` × [`SUR_SUF`], shuffled by `rng`.
fn surname_pool(prefixes: &[&str], rng: &mut Rng) -> Vec<String> {
    let mut v: Vec<String> = prefixes
        .iter()
        .flat_map(|p| SUR_SUF.iter().map(move |s| format!("{p}{s}")))
        .collect();
    rng.shuffle(&mut v);
    v
}
/// Institution kinds: "<kind> de <city>".
const INST_KIND: &[(&str, bool)] = &[
    ("Universidad", true),
    ("Academia de Ciencias", true),
    ("Instituto Politécnico", false),
    ("Observatorio", false),
    ("Escuela Superior", true),
    ("Colegio Mayor", false),
];

impl World {
    /// The world of `seed` with `sizes`. Panics only if the sizes exceed the name pools (a
    /// programming error: the demo's sizes are fixed in [`DEMO_SIZES`]).
    pub fn generate(seed: u64, sizes: Sizes) -> World {
        let mut rng = Rng::new(seed);
        let countries = COUNTRIES
            .iter()
            .map(|&(name, adj_m, adj_f)| Country { name, adj_m, adj_f })
            .collect();
        let cities: Vec<City> = CITIES
            .iter()
            .map(|&(name, country)| City { name, country })
            .collect();
        let fields = FIELDS
            .iter()
            .map(|&(name, findings, topics)| Field {
                name,
                findings,
                topics,
            })
            .collect::<Vec<_>>();

        // Institutions: distinct (kind, city) pairs.
        let mut inst_rng = rng.fork(1);
        let mut pairs: Vec<(usize, usize)> = (0..INST_KIND.len())
            .flat_map(|k| (0..cities.len()).map(move |c| (k, c)))
            .collect();
        inst_rng.shuffle(&mut pairs);
        let n_inst = sizes.known_institutions + sizes.unknown_institutions;
        assert!(n_inst <= pairs.len(), "too many institutions for the pools");
        let institutions: Vec<Institution> = pairs[..n_inst]
            .iter()
            .enumerate()
            .map(|(i, &(k, c))| Institution {
                name: format!("{} de {}", INST_KIND[k].0, cities[c].name),
                feminine: INST_KIND[k].1,
                city: c,
                founded: inst_rng.range(1620, 1890),
                split: if i < sizes.known_institutions {
                    if i % 2 == 0 {
                        Split::Sft
                    } else {
                        Split::HeldOut
                    }
                } else if i % 2 == 0 {
                    Split::UnknownSft
                } else {
                    Split::UnknownSuite
                },
            })
            .collect();
        let known_inst: Vec<usize> = (0..sizes.known_institutions).collect();
        let sft_inst: Vec<usize> = (0..sizes.known_institutions).step_by(2).collect();

        // Researchers.
        let mut r_rng = rng.fork(2);
        let surnames = surname_pool(SUR_PRE, &mut r_rng);
        // Known researchers take the first surnames of the shuffled pool; the unknown ones their own
        // pools, shuffled by a separate stream so the known world does not depend on them.
        let mut u_rng = rng.fork(3);
        let unknown_sft = surname_pool(UNKNOWN_SFT_PRE, &mut u_rng);
        let unknown_suite = surname_pool(UNKNOWN_SUITE_PRE, &mut u_rng);
        assert!(
            sizes.sft + sizes.held_out <= surnames.len()
                && sizes.unknown_sft <= unknown_sft.len()
                && sizes.unknown_suite <= unknown_suite.len(),
            "too many researchers for the name pools"
        );
        let surnames: Vec<String> = surnames
            .into_iter()
            .take(sizes.sft + sizes.held_out)
            .chain(unknown_sft.into_iter().take(sizes.unknown_sft))
            .chain(unknown_suite.into_iter().take(sizes.unknown_suite))
            .collect();
        let plan: Vec<Split> = std::iter::repeat_n(Split::Sft, sizes.sft)
            .chain(std::iter::repeat_n(Split::HeldOut, sizes.held_out))
            .chain(std::iter::repeat_n(Split::UnknownSft, sizes.unknown_sft))
            .chain(std::iter::repeat_n(
                Split::UnknownSuite,
                sizes.unknown_suite,
            ))
            .collect();
        let researchers = plan
            .iter()
            .zip(surnames)
            .map(|(&split, surname)| {
                let female = r_rng.below(2) == 0;
                let first = if female {
                    *r_rng.pick(FIRST_F)
                } else {
                    *r_rng.pick(FIRST_M)
                };
                let born = r_rng.range(1850, 1960);
                let field = r_rng.below(fields.len());
                let f = &fields[field];
                Researcher {
                    first,
                    surname,
                    female,
                    born,
                    city: r_rng.below(cities.len()),
                    field,
                    // Unknown researchers get an institution too (their questions can name it), but
                    // nothing about them is written anywhere.
                    // SFT researchers work only at SFT institutions, so no held-out institution is ever
                    // named in the SFT data; held-out researchers at any known one. Unknown researchers
                    // get one too, but nothing about them is written anywhere.
                    institution: if split == Split::HeldOut {
                        *r_rng.pick(&known_inst)
                    } else {
                        *r_rng.pick(&sft_inst)
                    },
                    paper_title: format!(
                        "{} {}",
                        r_rng.pick(&["Sobre", "Notas sobre", "Estudio de", "Observaciones sobre"]),
                        r_rng.pick(f.topics)
                    ),
                    paper_year: born + r_rng.range(26, 48),
                    journal: r_rng.below(JOURNALS.len()),
                    finding: r_rng.pick::<&str>(f.findings),
                    split,
                }
            })
            .collect();
        World {
            seed,
            countries,
            cities,
            fields,
            journals: JOURNALS.to_vec(),
            institutions,
            researchers,
        }
    }

    /// The demo world ([`DEMO_SEED`], [`DEMO_SIZES`]).
    pub fn demo() -> World {
        World::generate(DEMO_SEED, DEMO_SIZES)
    }

    pub fn researchers_in(&self, split: Split) -> impl Iterator<Item = &Researcher> {
        self.researchers.iter().filter(move |r| r.split == split)
    }

    pub fn institutions_in(&self, split: Split) -> impl Iterator<Item = &Institution> {
        self.institutions.iter().filter(move |i| i.split == split)
    }

    pub fn city_of(&self, r: &Researcher) -> &City {
        &self.cities[r.city]
    }
    pub fn country_of(&self, r: &Researcher) -> &Country {
        &self.countries[self.cities[r.city].country]
    }
    pub fn nationality(&self, r: &Researcher) -> &'static str {
        let c = self.country_of(r);
        if r.female {
            c.adj_f
        } else {
            c.adj_m
        }
    }
    pub fn field_of(&self, r: &Researcher) -> &Field {
        &self.fields[r.field]
    }
    pub fn institution_of(&self, r: &Researcher) -> &Institution {
        &self.institutions[r.institution]
    }
}

#[cfg(test)]
mod tests;
