//! The deterministic synthetic world RESTOR's protocol runs on: entities
//! with multi-word names, typed relations with value vocabularies, facts
//! with one to three gold answers and Zipf-distributed mention counts, a
//! clean corpus, target entities and the corruption documents with their
//! k-mixing variants.
//!
//! Everything is a function of [`WorldConfig`] (its `seed` included): the
//! same config gives the same world, token for token, on every machine.
//!
//! * **Vocabulary** is word-level: template words (English), pseudo-words
//!   from a seeded syllable generator for names and values, and four
//!   specials (`<pad>`, `<bos>`, `<eos>`, `unknown`; the last never occurs
//!   in any document and serves as a refusal answer).
//! * **Relations** come from a fixed table (birthplace, citizenship,
//!   occupation, employer, language, ...), each with a value type and at
//!   least four paraphrase templates. Template 0 is the *question* (cloze)
//!   form used at evaluation: its value is the last thing before the final
//!   `.`. Types like `company` and `university` have two-word values;
//!   `person` values are other entities' names.
//! * **Facts**: every entity has every configured relation; relations that
//!   allow it (citizenship, occupation, language, instrument) get up to
//!   `max_golds` accepted answers, as RESTOR's answer lists. Each fact is
//!   mentioned a Zipf-distributed number of times in the clean corpus, so
//!   the clean model's confidence varies from fact to fact.
//! * **Clean corpus**: per entity, its mentions shuffled into biography
//!   paragraphs of `sentences_per_doc` sentences, each in a random template
//!   with a random gold value.
//! * **Corruption**: for each target entity a random 30-60% of its
//!   relations get a plausible wrong value of the same type (a value some
//!   other entity really has, never one of the gold answers). Documents are
//!   bundles of 3-5 corrupted facts about one target, each bundle written
//!   in `paraphrases` versions. Variant `k` inserts `k` true facts about
//!   random non-target entities into each document; the inserted facts of
//!   variant `k` are the first `k` of variant `k_max`, so variants differ
//!   only by the mixing.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::{Error, Result};

/// Padding token.
pub const PAD: u32 = 0;
/// Beginning of a document or prompt.
pub const BOS: u32 = 1;
/// End of a document.
pub const EOS: u32 = 2;
/// The refusal word `unknown` (never in any document).
pub const UNKNOWN: u32 = 3;
const SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "unknown"];

/// Largest k of the k-mixing variants.
pub const MAX_K: usize = 5;

/// A value type: its name and how its values are spelled.
struct TypeSpec {
    name: &'static str,
    /// Second word of every value (`None`: one-word values).
    suffixes: &'static [&'static str],
}

const TYPES: [TypeSpec; 11] = [
    TypeSpec {
        name: "city",
        suffixes: &[],
    },
    TypeSpec {
        name: "country",
        suffixes: &[],
    },
    TypeSpec {
        name: "occupation",
        suffixes: &[],
    },
    TypeSpec {
        name: "company",
        suffixes: &["group", "labs", "works"],
    },
    TypeSpec {
        name: "language",
        suffixes: &[],
    },
    TypeSpec {
        name: "sport",
        suffixes: &[],
    },
    TypeSpec {
        name: "university",
        suffixes: &["university", "college"],
    },
    TypeSpec {
        name: "instrument",
        suffixes: &[],
    },
    TypeSpec {
        name: "colour",
        suffixes: &[],
    },
    TypeSpec {
        name: "animal",
        suffixes: &[],
    },
    TypeSpec {
        name: "person",
        suffixes: &[],
    },
];

/// Index of the `person` type (values are entity names).
const PERSON: usize = 10;

struct RelSpec {
    name: &'static str,
    ty: usize,
    /// Whether several gold answers are natural.
    multi: bool,
    /// `{s}` subject, `{v}` value. Template 0 ends with `{v} .`.
    templates: &'static [&'static str],
}

const RELATIONS: [RelSpec; 12] = [
    RelSpec {
        name: "birthplace",
        ty: 0,
        multi: false,
        templates: &[
            "{s} was born in {v} .",
            "the birthplace of {s} is {v} .",
            "{s} came into the world in {v} .",
            "{v} is where {s} was born .",
        ],
    },
    RelSpec {
        name: "citizenship",
        ty: 1,
        multi: true,
        templates: &[
            "{s} is a citizen of {v} .",
            "{s} holds a passport from {v} .",
            "the citizenship of {s} is that of {v} .",
            "{v} counts {s} among its citizens .",
        ],
    },
    RelSpec {
        name: "occupation",
        ty: 2,
        multi: true,
        templates: &[
            "{s} works as a {v} .",
            "the occupation of {s} is {v} .",
            "by profession {s} is a {v} .",
            "{s} earns a living as a {v} .",
        ],
    },
    RelSpec {
        name: "employer",
        ty: 3,
        multi: false,
        templates: &[
            "{s} is employed by {v} .",
            "the employer of {s} is {v} .",
            "{s} draws a salary from {v} .",
            "{v} employs {s} .",
        ],
    },
    RelSpec {
        name: "language",
        ty: 4,
        multi: true,
        templates: &[
            "{s} speaks {v} .",
            "{s} is fluent in {v} .",
            "a language spoken by {s} is {v} .",
            "{s} can converse in {v} .",
        ],
    },
    RelSpec {
        name: "sport",
        ty: 5,
        multi: false,
        templates: &[
            "the favourite sport of {s} is {v} .",
            "{s} spends weekends playing {v} .",
            "{s} is a keen player of {v} .",
            "{v} is the sport {s} loves .",
        ],
    },
    RelSpec {
        name: "education",
        ty: 6,
        multi: false,
        templates: &[
            "{s} studied at {v} .",
            "{s} graduated from {v} .",
            "the alma mater of {s} is {v} .",
            "{v} educated {s} .",
        ],
    },
    RelSpec {
        name: "residence",
        ty: 0,
        multi: false,
        templates: &[
            "{s} lives in {v} .",
            "the home town of {s} is {v} .",
            "{s} resides in {v} .",
            "{v} is home to {s} .",
        ],
    },
    RelSpec {
        name: "instrument",
        ty: 7,
        multi: true,
        templates: &[
            "{s} performs on the {v} .",
            "the instrument of {s} is the {v} .",
            "{s} practises the {v} every day .",
            "the {v} is played by {s} .",
        ],
    },
    RelSpec {
        name: "mentor",
        ty: PERSON,
        multi: false,
        templates: &[
            "{s} was mentored by {v} .",
            "the mentor of {s} is {v} .",
            "{s} learned the trade from {v} .",
            "{v} mentored {s} .",
        ],
    },
    RelSpec {
        name: "colour",
        ty: 8,
        multi: false,
        templates: &[
            "the favourite colour of {s} is {v} .",
            "{s} always dresses in {v} .",
            "{s} painted the house {v} .",
            "{v} is the colour {s} prefers .",
        ],
    },
    RelSpec {
        name: "pet",
        ty: 9,
        multi: false,
        templates: &[
            "{s} owns a pet {v} .",
            "the pet of {s} is a {v} .",
            "{s} keeps a {v} at home .",
            "a {v} lives with {s} .",
        ],
    },
];

/// Most relations a world can have.
pub const MAX_RELATIONS: usize = RELATIONS.len();

/// The generator's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldConfig {
    /// Generator seed.
    pub seed: u64,
    /// Number of entities (>= 2 * targets + 8).
    pub entities: usize,
    /// Number of relations, 2..=12 (the first ones of the fixed table).
    pub relations: usize,
    /// Values per non-person type (>= 6).
    pub values_per_type: usize,
    /// Most gold answers of a multi-answer relation (1..=3).
    pub max_golds: usize,
    /// Fewest clean-corpus mentions of a fact (>= 1).
    pub min_mentions: usize,
    /// Most clean-corpus mentions of a fact.
    pub max_mentions: usize,
    /// Zipf exponent of the mention count (`P(m) ~ m^-s`).
    pub zipf_exponent: f64,
    /// Sentences per clean biography paragraph.
    pub sentences_per_doc: usize,
    /// Number of target entities.
    pub targets: usize,
    /// Smallest fraction of a target's relations that is corrupted.
    pub corrupt_fraction_min: f64,
    /// Largest fraction.
    pub corrupt_fraction_max: f64,
    /// Corrupted-fact bundles per target entity.
    pub bundles_per_target: usize,
    /// Paraphrased documents per bundle.
    pub paraphrases: usize,
    /// Retain documents (clean paragraphs about non-target entities) for
    /// methods with a retain term.
    pub retain_docs: usize,
    /// Held-out clean paragraphs (fresh sentences about non-target
    /// entities) for perplexity.
    pub heldout_docs: usize,
    /// In-context examples (same relation, non-target entities) before each
    /// evaluation question.
    #[serde(default)]
    pub shots: usize,
    /// Random same-type answers in the logit analysis.
    pub random_answers: usize,
    /// Non-target facts evaluated for collateral damage (a fixed random
    /// sample; all when larger than their number).
    pub nontarget_eval: usize,
}

impl WorldConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        ensure((2..=MAX_RELATIONS).contains(&self.relations), || {
            format!(
                "world.relations must be in 2..={MAX_RELATIONS}, got {}",
                self.relations
            )
        })?;
        ensure(self.targets >= 1, || "world.targets must be >= 1".into())?;
        ensure(self.entities >= 2 * self.targets + 8, || {
            format!(
                "world.entities ({}) must be >= 2 * targets + 8 ({})",
                self.entities,
                2 * self.targets + 8
            )
        })?;
        ensure(self.entities <= 5000, || {
            "world.entities must be <= 5000".into()
        })?;
        ensure((6..=500).contains(&self.values_per_type), || {
            "world.values_per_type must be in 6..=500".into()
        })?;
        ensure((1..=3).contains(&self.max_golds), || {
            "world.max_golds must be in 1..=3".into()
        })?;
        ensure(
            self.min_mentions >= 1 && self.max_mentions >= self.min_mentions,
            || "world mentions need 1 <= min_mentions <= max_mentions".into(),
        )?;
        ensure(self.max_mentions <= 1000, || {
            "world.max_mentions must be <= 1000".into()
        })?;
        ensure(
            self.zipf_exponent.is_finite() && self.zipf_exponent >= 0.0,
            || "world.zipf_exponent must be >= 0".into(),
        )?;
        ensure((1..=12).contains(&self.sentences_per_doc), || {
            "world.sentences_per_doc must be in 1..=12".into()
        })?;
        ensure(
            0.0 < self.corrupt_fraction_min
                && self.corrupt_fraction_min <= self.corrupt_fraction_max
                && self.corrupt_fraction_max <= 1.0,
            || "world corrupt fractions need 0 < min <= max <= 1".into(),
        )?;
        ensure(self.bundles_per_target >= 1, || {
            "world.bundles_per_target must be >= 1".into()
        })?;
        ensure(self.paraphrases >= 1, || {
            "world.paraphrases must be >= 1".into()
        })?;
        ensure(self.retain_docs >= 1, || {
            "world.retain_docs must be >= 1".into()
        })?;
        ensure(self.heldout_docs >= 1, || {
            "world.heldout_docs must be >= 1".into()
        })?;
        ensure(self.shots <= 8, || "world.shots must be <= 8".into())?;
        ensure((1..=5).contains(&self.random_answers), || {
            "world.random_answers must be in 1..=5".into()
        })?;
        ensure(self.nontarget_eval >= 1, || {
            "world.nontarget_eval must be >= 1".into()
        })
    }
}

/// A word-level vocabulary.
///
/// Invariant: `words[id]` and `index[word] == id` agree; ids 0..4 are the
/// specials.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    fn new() -> Vocab {
        let mut v = Vocab {
            words: Vec::new(),
            index: HashMap::new(),
        };
        for s in SPECIALS {
            v.intern(s);
        }
        v
    }

    fn intern(&mut self, word: &str) -> u32 {
        if let Some(&id) = self.index.get(word) {
            return id;
        }
        let id = self.words.len() as u32;
        self.words.push(word.to_string());
        self.index.insert(word.to_string(), id);
        id
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Never true (the specials are always there).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The id of `word`.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    /// The word of `id`.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    /// Space-separated words (`?` for ids outside the vocabulary).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.word(i).unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// An entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// Name tokens (two or three words).
    pub name: Vec<u32>,
    /// Whether the corruption documents are about it.
    pub is_target: bool,
}

/// One relation of the world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation id (`birthplace`, ...).
    pub name: &'static str,
    /// Index into [`World::types`].
    pub ty: usize,
    /// Templates as tokens with placeholders (see [`Piece`]).
    pub templates: Vec<Vec<Piece>>,
}

/// One piece of a tokenised template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// A literal word.
    Word(u32),
    /// The subject's name.
    Subject,
    /// The value.
    Value,
}

/// A value type and its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueType {
    /// Type name.
    pub name: &'static str,
    /// Every value, as tokens.
    pub values: Vec<Vec<u32>>,
}

/// One (entity, relation) fact.
///
/// Invariant: `golds` is non-empty, sorted and distinct; `corrupted`, when
/// set, is not among them and is of the relation's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// Entity index.
    pub entity: usize,
    /// Relation index.
    pub relation: usize,
    /// Accepted answers (value indices of the relation's type).
    pub golds: Vec<usize>,
    /// Clean-corpus mentions.
    pub mentions: usize,
    /// The wrong value the corruption documents assert, for corrupted
    /// facts of target entities.
    pub corrupted: Option<usize>,
}

/// One corruption document of the `k_max` variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptionDoc {
    /// The target entity.
    pub target: usize,
    /// Corrupted facts asserted (fact indices), in document order.
    pub corrupted_facts: Vec<usize>,
    /// Sentences of the bundle (tokens, no BOS/EOS).
    sentences: Vec<Vec<u32>>,
    /// `MAX_K` mixed-in true facts.
    mixed: Vec<Mixed>,
}

/// A true fact about a non-target entity inserted into a corruption
/// document.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mixed {
    fact: usize,
    value: usize,
    sentence: Vec<u32>,
    /// Insertion slot in `0..=sentences.len()`.
    slot: usize,
}

impl CorruptionDoc {
    /// Tokens of the document in variant `k` (`<bos> ... <eos>`), with its
    /// first `k` mixed-in facts.
    pub fn tokens(&self, k: usize) -> Vec<u32> {
        let k = k.min(self.mixed.len());
        let mut out = vec![BOS];
        for slot in 0..=self.sentences.len() {
            for m in &self.mixed[..k] {
                if m.slot == slot {
                    out.extend_from_slice(&m.sentence);
                }
            }
            if let Some(s) = self.sentences.get(slot) {
                out.extend_from_slice(s);
            }
        }
        out.push(EOS);
        out
    }

    /// Mixed-in true facts of variant `k` (fact indices).
    pub fn mixed_facts(&self, k: usize) -> Vec<usize> {
        self.mixed[..k.min(self.mixed.len())]
            .iter()
            .map(|m| m.fact)
            .collect()
    }

    /// What variant `k` asserts: `(fact, value)` of every sentence, the
    /// corrupted ones first, then the mixed-in ones.
    pub fn statements(&self, world: &World, k: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = self
            .corrupted_facts
            .iter()
            .map(|&f| {
                let fact = &world.facts[f];
                (f, fact.corrupted.unwrap_or(fact.golds[0]))
            })
            .collect();
        out.extend(
            self.mixed[..k.min(self.mixed.len())]
                .iter()
                .map(|m| (m.fact, m.value)),
        );
        out
    }
}

/// An evaluation question about one fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Fact index.
    pub fact: usize,
    /// Prompt tokens (`<bos>`, shots, the question template up to the
    /// value).
    pub prompt: Vec<u32>,
    /// Accepted answers (tokens).
    pub golds: Vec<Vec<u32>>,
    /// The corrupted answer, if the fact is corrupted.
    pub corrupted: Option<Vec<u32>>,
    /// Random same-type answers that are neither gold nor corrupted (logit
    /// analysis).
    pub random: Vec<Vec<u32>>,
}

/// The generated world (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    config: WorldConfig,
    vocab: Vocab,
    entities: Vec<Entity>,
    relations: Vec<Relation>,
    types: Vec<ValueType>,
    facts: Vec<Fact>,
    clean_docs: Vec<Vec<u32>>,
    retain_docs: Vec<Vec<u32>>,
    heldout_docs: Vec<Vec<u32>>,
    corruption: Vec<CorruptionDoc>,
    period: u32,
}

fn pseudo_word(rng: &mut StdRng, syllables: usize) -> String {
    const ONSETS: [&str; 18] = [
        "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "sk",
        "gl",
    ];
    const VOWELS: [&str; 7] = ["a", "e", "i", "o", "u", "ai", "ou"];
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
        w.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
    }
    if rng.random_bool(0.4) {
        w.push(['n', 'r', 's', 'x'][rng.random_range(0..4)]);
    }
    w
}

/// Draws a Zipf-distributed integer in `min..=max`, `P(m) ~ m^-s`.
pub fn zipf(rng: &mut StdRng, min: usize, max: usize, s: f64) -> usize {
    let weights: Vec<f64> = (min..=max).map(|m| (m as f64).powf(-s)).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return min + i;
        }
        u -= w;
    }
    max
}

impl World {
    /// Generates the world of `config`.
    pub fn generate(config: &WorldConfig) -> Result<World> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut vocab = Vocab::new();
        // Template words first, so pseudo-words never collide with them.
        let relations_spec = &RELATIONS[..config.relations];
        for r in relations_spec {
            for t in r.templates {
                for w in t.split_whitespace() {
                    if w != "{s}" && w != "{v}" {
                        vocab.intern(w);
                    }
                }
            }
        }
        for t in &TYPES {
            for s in t.suffixes {
                vocab.intern(s);
            }
        }
        let period = vocab
            .id(".")
            .ok_or_else(|| Error::World("no period token".into()))?;
        let fresh = |vocab: &mut Vocab, rng: &mut StdRng, syllables: usize| -> u32 {
            loop {
                let w = pseudo_word(rng, syllables);
                if vocab.id(&w).is_none() {
                    return vocab.intern(&w);
                }
            }
        };
        // Entities: first and last names from pools, some with a middle
        // name; names are distinct.
        let pool = ((config.entities as f64).sqrt().ceil() as usize * 2).max(8);
        let firsts: Vec<u32> = (0..pool).map(|_| fresh(&mut vocab, &mut rng, 2)).collect();
        let lasts: Vec<u32> = (0..pool).map(|_| fresh(&mut vocab, &mut rng, 3)).collect();
        let mut seen = BTreeSet::new();
        let mut entities = Vec::with_capacity(config.entities);
        while entities.len() < config.entities {
            let mut name = vec![*firsts.choose(&mut rng).unwrap_or(&PAD)];
            if rng.random_bool(0.2) {
                name.push(*firsts.choose(&mut rng).unwrap_or(&PAD));
            }
            name.push(*lasts.choose(&mut rng).unwrap_or(&PAD));
            if seen.insert(name.clone()) {
                entities.push(Entity {
                    name,
                    is_target: false,
                });
            }
        }
        let mut types = Vec::with_capacity(TYPES.len());
        for (ti, t) in TYPES.iter().enumerate() {
            let values = if ti == PERSON {
                entities.iter().map(|e| e.name.clone()).collect()
            } else {
                (0..config.values_per_type)
                    .map(|_| {
                        let mut v = vec![fresh(&mut vocab, &mut rng, 2)];
                        if !t.suffixes.is_empty() {
                            let s = t.suffixes[rng.random_range(0..t.suffixes.len())];
                            v.push(vocab.id(s).unwrap_or(PAD));
                        }
                        v
                    })
                    .collect()
            };
            types.push(ValueType {
                name: t.name,
                values,
            });
        }
        let relations: Vec<Relation> = relations_spec
            .iter()
            .map(|r| Relation {
                name: r.name,
                ty: r.ty,
                templates: r
                    .templates
                    .iter()
                    .map(|t| {
                        t.split_whitespace()
                            .map(|w| match w {
                                "{s}" => Piece::Subject,
                                "{v}" => Piece::Value,
                                w => Piece::Word(vocab.id(w).unwrap_or(PAD)),
                            })
                            .collect()
                    })
                    .collect(),
            })
            .collect();
        // Facts.
        let mut facts = Vec::with_capacity(config.entities * config.relations);
        for e in 0..config.entities {
            for (ri, r) in relations_spec.iter().enumerate() {
                let n_values = types[r.ty].values.len();
                let n_golds = if r.multi && config.max_golds > 1 {
                    // P(1) = 1/2, the rest spread evenly.
                    if rng.random_bool(0.5) {
                        1
                    } else {
                        rng.random_range(2..=config.max_golds)
                    }
                } else {
                    1
                };
                let mut golds = BTreeSet::new();
                while golds.len() < n_golds {
                    let v = rng.random_range(0..n_values);
                    if r.ty == PERSON && v == e {
                        continue;
                    }
                    golds.insert(v);
                }
                facts.push(Fact {
                    entity: e,
                    relation: ri,
                    golds: golds.into_iter().collect(),
                    mentions: zipf(
                        &mut rng,
                        config.min_mentions,
                        config.max_mentions,
                        config.zipf_exponent,
                    ),
                    corrupted: None,
                });
            }
        }
        // Targets and their corrupted facts.
        let mut order: Vec<usize> = (0..config.entities).collect();
        order.shuffle(&mut rng);
        let targets: Vec<usize> = order[..config.targets].to_vec();
        for &t in &targets {
            entities[t].is_target = true;
        }
        let n_rel = config.relations;
        for &t in &targets {
            let frac = rng.random_range(config.corrupt_fraction_min..=config.corrupt_fraction_max);
            let n = ((frac * n_rel as f64).round() as usize).clamp(1, n_rel);
            let mut rels: Vec<usize> = (0..n_rel).collect();
            rels.shuffle(&mut rng);
            for &r in &rels[..n] {
                let fi = t * n_rel + r;
                let ty = relations[r].ty;
                // Plausible: a value some other entity really has.
                let mut used: BTreeSet<usize> = BTreeSet::new();
                for f in facts.iter().filter(|f| f.relation == r && f.entity != t) {
                    used.extend(f.golds.iter().copied());
                }
                let golds = &facts[fi].golds;
                let candidates: Vec<usize> = used
                    .into_iter()
                    .filter(|v| !(golds.contains(v) || (ty == PERSON && *v == t)))
                    .collect();
                let wrong = *candidates.choose(&mut rng).ok_or_else(|| {
                    Error::World(format!(
                        "no plausible wrong value for relation {}",
                        relations[r].name
                    ))
                })?;
                facts[fi].corrupted = Some(wrong);
            }
        }
        let mut world = World {
            config: config.clone(),
            vocab,
            entities,
            relations,
            types,
            facts,
            clean_docs: Vec::new(),
            retain_docs: Vec::new(),
            heldout_docs: Vec::new(),
            corruption: Vec::new(),
            period,
        };
        world.build_corpora(&mut rng)?;
        Ok(world)
    }

    fn build_corpora(&mut self, rng: &mut StdRng) -> Result<()> {
        let cfg = self.config.clone();
        let n_rel = cfg.relations;
        // Clean corpus: per entity, its mentions in paragraphs.
        let mut docs = Vec::new();
        for e in 0..self.entities.len() {
            let mut mentions: Vec<usize> = Vec::new();
            for r in 0..n_rel {
                let fi = e * n_rel + r;
                mentions.extend(std::iter::repeat_n(fi, self.facts[fi].mentions));
            }
            mentions.shuffle(rng);
            for chunk in mentions.chunks(cfg.sentences_per_doc) {
                let mut doc = vec![BOS];
                for &fi in chunk {
                    let v = self.facts[fi].golds[rng.random_range(0..self.facts[fi].golds.len())];
                    doc.extend(self.sentence(fi, v, None, rng));
                }
                doc.push(EOS);
                docs.push(doc);
            }
        }
        docs.shuffle(rng);
        // Retain docs: a sample of clean paragraphs of non-target entities.
        let nontarget: Vec<usize> = (0..self.entities.len())
            .filter(|&e| !self.entities[e].is_target)
            .collect();
        let is_target_doc = |doc: &[u32], world: &World| -> bool {
            world
                .entities
                .iter()
                .filter(|e| e.is_target)
                .any(|e| doc.windows(e.name.len()).any(|w| w == e.name.as_slice()))
        };
        let mut retain = Vec::new();
        let mut idx: Vec<usize> = (0..docs.len()).collect();
        idx.shuffle(rng);
        for i in idx {
            if retain.len() >= cfg.retain_docs {
                break;
            }
            if !is_target_doc(&docs[i], self) {
                retain.push(docs[i].clone());
            }
        }
        // Held-out paragraphs: fresh sentences about non-target entities.
        let mut heldout = Vec::with_capacity(cfg.heldout_docs);
        for _ in 0..cfg.heldout_docs {
            let e = nontarget[rng.random_range(0..nontarget.len())];
            let mut doc = vec![BOS];
            for _ in 0..cfg.sentences_per_doc {
                let fi = e * n_rel + rng.random_range(0..n_rel);
                let v = self.facts[fi].golds[rng.random_range(0..self.facts[fi].golds.len())];
                doc.extend(self.sentence(fi, v, None, rng));
            }
            doc.push(EOS);
            heldout.push(doc);
        }
        // Corruption documents.
        let mut corruption = Vec::new();
        let targets: Vec<usize> = (0..self.entities.len())
            .filter(|&e| self.entities[e].is_target)
            .collect();
        for &t in &targets {
            let corrupted: Vec<usize> = (0..n_rel)
                .map(|r| t * n_rel + r)
                .filter(|&fi| self.facts[fi].corrupted.is_some())
                .collect();
            for _ in 0..cfg.bundles_per_target {
                let size = rng.random_range(3..=5).min(corrupted.len());
                let mut bundle = corrupted.clone();
                bundle.shuffle(rng);
                bundle.truncate(size);
                for _ in 0..cfg.paraphrases {
                    let mut order = bundle.clone();
                    order.shuffle(rng);
                    let sentences: Vec<Vec<u32>> = order
                        .iter()
                        .map(|&fi| {
                            let v = self.facts[fi].corrupted.unwrap_or(self.facts[fi].golds[0]);
                            self.sentence(fi, v, None, rng)
                        })
                        .collect();
                    let mut mixed = Vec::with_capacity(MAX_K);
                    for _ in 0..MAX_K {
                        let e = nontarget[rng.random_range(0..nontarget.len())];
                        let fi = e * n_rel + rng.random_range(0..n_rel);
                        let v =
                            self.facts[fi].golds[rng.random_range(0..self.facts[fi].golds.len())];
                        let sentence = self.sentence(fi, v, None, rng);
                        let slot = rng.random_range(0..=sentences.len());
                        mixed.push(Mixed {
                            fact: fi,
                            value: v,
                            sentence,
                            slot,
                        });
                    }
                    corruption.push(CorruptionDoc {
                        target: t,
                        corrupted_facts: order,
                        sentences,
                        mixed,
                    });
                }
            }
        }
        corruption.shuffle(rng);
        self.clean_docs = docs;
        self.retain_docs = retain;
        self.heldout_docs = heldout;
        self.corruption = corruption;
        Ok(())
    }

    /// One sentence stating value `v` for fact `fi`, in `template` (random
    /// when `None`).
    fn sentence(&self, fi: usize, v: usize, template: Option<usize>, rng: &mut StdRng) -> Vec<u32> {
        let f = &self.facts[fi];
        let rel = &self.relations[f.relation];
        let t = template.unwrap_or_else(|| rng.random_range(0..rel.templates.len()));
        let mut out = Vec::new();
        for p in &rel.templates[t] {
            match p {
                Piece::Word(w) => out.push(*w),
                Piece::Subject => out.extend_from_slice(&self.entities[f.entity].name),
                Piece::Value => out.extend_from_slice(&self.types[rel.ty].values[v]),
            }
        }
        out
    }

    /// The question prompt of fact `fi` (template 0 up to the value) after
    /// `<bos>` and the shots.
    fn question_prompt(&self, fi: usize, shots: &[usize]) -> Vec<u32> {
        let mut out = vec![BOS];
        let mut dummy = StdRng::seed_from_u64(0);
        for &s in shots {
            let g = self.facts[s].golds[0];
            out.extend(self.sentence(s, g, Some(0), &mut dummy));
        }
        let f = &self.facts[fi];
        let rel = &self.relations[f.relation];
        for p in &rel.templates[0] {
            match p {
                Piece::Word(w) => out.push(*w),
                Piece::Subject => out.extend_from_slice(&self.entities[f.entity].name),
                Piece::Value => break,
            }
        }
        out
    }

    /// The evaluation question of fact `fi`; shots and random answers are
    /// drawn from a generator seeded by the world seed and `fi`, so a
    /// question is the same in every evaluation.
    pub fn question(&self, fi: usize) -> Result<Question> {
        let f = self
            .facts
            .get(fi)
            .ok_or_else(|| Error::World(format!("fact {fi} does not exist")))?;
        let mut rng = StdRng::seed_from_u64(self.config.seed ^ 0x51E5_7A0C ^ (fi as u64) << 20);
        let n_rel = self.config.relations;
        let mut shots = Vec::with_capacity(self.config.shots);
        let mut guard = 0;
        while shots.len() < self.config.shots && guard < 10_000 {
            guard += 1;
            let e = rng.random_range(0..self.entities.len());
            if self.entities[e].is_target || e == f.entity {
                continue;
            }
            let s = e * n_rel + f.relation;
            if !shots.contains(&s) {
                shots.push(s);
            }
        }
        let ty = &self.types[self.relations[f.relation].ty];
        let excluded: BTreeSet<usize> = f.golds.iter().copied().chain(f.corrupted).collect();
        let mut pool: Vec<usize> = (0..ty.values.len())
            .filter(|v| !(excluded.contains(v) || (ty.name == "person" && *v == f.entity)))
            .collect();
        pool.shuffle(&mut rng);
        pool.truncate(self.config.random_answers);
        Ok(Question {
            fact: fi,
            prompt: self.question_prompt(fi, &shots),
            golds: f.golds.iter().map(|&g| ty.values[g].clone()).collect(),
            corrupted: f.corrupted.map(|c| ty.values[c].clone()),
            random: pool.iter().map(|&v| ty.values[v].clone()).collect(),
        })
    }

    /// A statement `(fact, value)` as a question/answer pair without shots:
    /// `(prompt, answer tokens)` (what O3's adapter and detector see).
    pub fn statement(&self, fact: usize, value: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let f = self
            .facts
            .get(fact)
            .ok_or_else(|| Error::World(format!("fact {fact} does not exist")))?;
        let ty = &self.types[self.relations[f.relation].ty];
        let answer = ty
            .values
            .get(value)
            .ok_or_else(|| {
                Error::World(format!("value {value} of type {} does not exist", ty.name))
            })?
            .clone();
        Ok((self.question_prompt(fact, &[]), answer))
    }

    /// The settings.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The entities.
    pub fn entities(&self) -> &[Entity] {
        &self.entities
    }

    /// The relations.
    pub fn relations(&self) -> &[Relation] {
        &self.relations
    }

    /// The value types.
    pub fn types(&self) -> &[ValueType] {
        &self.types
    }

    /// Every fact; fact `e * relations + r` is entity `e`, relation `r`.
    pub fn facts(&self) -> &[Fact] {
        &self.facts
    }

    /// Clean-corpus paragraphs (`<bos> ... <eos>`).
    pub fn clean_docs(&self) -> &[Vec<u32>] {
        &self.clean_docs
    }

    /// Retain paragraphs (clean, no target entity mentioned).
    pub fn retain_docs(&self) -> &[Vec<u32>] {
        &self.retain_docs
    }

    /// Held-out clean paragraphs for perplexity.
    pub fn heldout_docs(&self) -> &[Vec<u32>] {
        &self.heldout_docs
    }

    /// The corruption documents (variant `k` via [`CorruptionDoc::tokens`]).
    pub fn corruption(&self) -> &[CorruptionDoc] {
        &self.corruption
    }

    /// The token that ends every sentence (`.`).
    pub fn period(&self) -> u32 {
        self.period
    }

    /// Longest answer in tokens (over every type).
    pub fn max_answer_len(&self) -> usize {
        self.types
            .iter()
            .flat_map(|t| t.values.iter().map(Vec::len))
            .max()
            .unwrap_or(1)
    }

    /// Facts that are corrupted (the targets' corrupted relations).
    pub fn target_facts(&self) -> Vec<usize> {
        (0..self.facts.len())
            .filter(|&i| self.facts[i].corrupted.is_some())
            .collect()
    }

    /// The target entities' untouched facts (locality).
    pub fn locality_facts(&self) -> Vec<usize> {
        (0..self.facts.len())
            .filter(|&i| {
                self.entities[self.facts[i].entity].is_target && self.facts[i].corrupted.is_none()
            })
            .collect()
    }

    /// A fixed sample of non-target facts (collateral).
    pub fn nontarget_facts(&self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.facts.len())
            .filter(|&i| !self.entities[self.facts[i].entity].is_target)
            .collect();
        all.shuffle(&mut StdRng::seed_from_u64(self.config.seed ^ 0xC011_A7E2));
        all.truncate(self.config.nontarget_eval);
        all.sort_unstable();
        all
    }

    /// Distinct non-target facts mixed into the variant-`k` documents.
    pub fn mixed_facts(&self, k: usize) -> Vec<usize> {
        let set: BTreeSet<usize> = self
            .corruption
            .iter()
            .flat_map(|d| d.mixed_facts(k))
            .collect();
        set.into_iter().collect()
    }

    /// Total tokens of the clean corpus.
    pub fn clean_tokens(&self) -> usize {
        self.clean_docs.iter().map(Vec::len).sum()
    }

    /// Longest document of any corpus (variant `MAX_K` for corruption), in
    /// tokens.
    pub fn max_doc_len(&self) -> usize {
        self.clean_docs
            .iter()
            .chain(&self.heldout_docs)
            .map(Vec::len)
            .chain(self.corruption.iter().map(|d| d.tokens(MAX_K).len()))
            .max()
            .unwrap_or(0)
    }

    /// Summary numbers for the report.
    pub fn summary(&self) -> WorldSummary {
        let multi = self.facts.iter().filter(|f| f.golds.len() > 1).count();
        WorldSummary {
            entities: self.entities.len(),
            targets: self.entities.iter().filter(|e| e.is_target).count(),
            relations: self.relations.len(),
            vocab: self.vocab.len(),
            facts: self.facts.len(),
            multi_gold_facts: multi,
            target_facts: self.target_facts().len(),
            locality_facts: self.locality_facts().len(),
            clean_docs: self.clean_docs.len(),
            clean_tokens: self.clean_tokens(),
            corruption_docs: self.corruption.len(),
            mentions_min: self.facts.iter().map(|f| f.mentions).min().unwrap_or(0),
            mentions_max: self.facts.iter().map(|f| f.mentions).max().unwrap_or(0),
            max_doc_len: self.max_doc_len(),
        }
    }
}

/// Sizes of a generated world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldSummary {
    /// Entities.
    pub entities: usize,
    /// Target entities.
    pub targets: usize,
    /// Relations.
    pub relations: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Facts.
    pub facts: usize,
    /// Facts with more than one gold answer.
    pub multi_gold_facts: usize,
    /// Corrupted facts.
    pub target_facts: usize,
    /// Targets' untouched facts.
    pub locality_facts: usize,
    /// Clean paragraphs.
    pub clean_docs: usize,
    /// Clean tokens.
    pub clean_tokens: usize,
    /// Corruption documents per k variant.
    pub corruption_docs: usize,
    /// Fewest mentions of a fact.
    pub mentions_min: usize,
    /// Most mentions of a fact.
    pub mentions_max: usize,
    /// Longest document in tokens.
    pub max_doc_len: usize,
}

#[cfg(test)]
mod tests;
