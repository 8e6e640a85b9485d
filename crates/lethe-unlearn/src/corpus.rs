//! A deterministic synthetic fact corpus with disjoint "domains", for
//! testing and evaluating language-model unlearning on a decoder trained
//! from scratch.
//!
//! Each domain has its own fictional entities and relations (pseudo-words
//! from a seeded syllable generator); every relation has a small set of
//! candidate values drawn from a pool shared by all domains, so answers do
//! not reveal the domain. Each (entity, relation) pair has one true value.
//! A fact is asked in two templates:
//!
//! ```text
//! <bos> ENTITY RELATION            -> VALUE
//! <bos> what RELATION of ENTITY    -> VALUE
//! ```
//!
//! An unlearning request forgets one domain; the others measure retained
//! utility. The refusal answer is the word `unknown` (never in the
//! training data). Chance accuracy on a relation is `1 / values_per_relation`.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{TextExample, TextSet};
use crate::error::ensure_config;
use crate::Result;

/// Padding token id.
pub const PAD: u32 = 0;
/// Beginning-of-sequence token id.
pub const BOS: u32 = 1;
/// End-of-sequence token id.
pub const EOS: u32 = 2;
/// The refusal word `unknown`.
pub const UNKNOWN: u32 = 3;

const SPECIALS: [&str; 6] = ["<pad>", "<bos>", "<eos>", "unknown", "what", "of"];
const WHAT: u32 = 4;
const OF: u32 = 5;

/// Sizes of a generated corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// Number of domains (>= 2).
    pub domains: usize,
    /// Entities per domain (>= 2).
    pub entities_per_domain: usize,
    /// Relations per domain (>= 1).
    pub relations_per_domain: usize,
    /// Candidate values per relation (>= 2).
    pub values_per_relation: usize,
    /// Size of the shared value pool (>= `values_per_relation`).
    pub value_pool: usize,
    /// Generator seed.
    pub seed: u64,
}

impl CorpusConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        ensure_config(self.domains >= 2, || {
            "a corpus needs at least 2 domains".into()
        })?;
        ensure_config(self.entities_per_domain >= 2, || {
            "entities_per_domain must be >= 2".into()
        })?;
        ensure_config(self.relations_per_domain >= 1, || {
            "relations_per_domain must be >= 1".into()
        })?;
        ensure_config(self.values_per_relation >= 2, || {
            "values_per_relation must be >= 2".into()
        })?;
        ensure_config(self.value_pool >= self.values_per_relation, || {
            "value_pool must be >= values_per_relation".into()
        })?;
        let words =
            self.domains * (self.entities_per_domain + self.relations_per_domain) + self.value_pool;
        ensure_config(words <= 20_000, || {
            format!("{words} distinct words requested; at most 20000")
        })
    }
}

/// Word-level vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Always false (the specials are always present).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The word of a token id.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    /// The id of a word.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    /// Space-separated words of `ids` (`?` for unknown ids).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.word(i).unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn push(&mut self, word: String) -> u32 {
        let id = self.words.len() as u32;
        self.index.insert(word.clone(), id);
        self.words.push(word);
        id
    }
}

/// One fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// Its domain.
    pub domain: usize,
    /// Entity token.
    pub entity: u32,
    /// Relation token.
    pub relation: u32,
    /// True value token.
    pub value: u32,
    /// All candidate values of the relation (the true one included).
    pub candidates: Vec<u32>,
}

impl Fact {
    /// The fact in template `t` (0 or 1) as a prompt/answer example.
    pub fn example(&self, template: usize) -> TextExample {
        let prompt = if template == 0 {
            vec![BOS, self.entity, self.relation]
        } else {
            vec![BOS, WHAT, self.relation, OF, self.entity]
        };
        let n = prompt.len();
        let mut ids = prompt;
        ids.push(self.value);
        // A 3- or 5-token prompt plus one answer token satisfies the
        // TextExample invariant.
        TextExample::from_parts(ids, n)
    }
}

/// The generated corpus.
#[derive(Debug, Clone)]
pub struct FactCorpus {
    config: CorpusConfig,
    vocab: Vocab,
    facts: Vec<Fact>,
}

fn pseudo_word(rng: &mut StdRng, syllables: usize) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut s = String::new();
    for _ in 0..syllables {
        s.push(C[rng.random_range(0..C.len())] as char);
        s.push(V[rng.random_range(0..V.len())] as char);
    }
    s
}

impl FactCorpus {
    /// Generates the corpus (deterministic per config).
    pub fn generate(config: CorpusConfig) -> Result<FactCorpus> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut vocab = Vocab {
            words: Vec::new(),
            index: HashMap::new(),
        };
        for w in SPECIALS {
            vocab.push(w.to_string());
        }
        let fresh = |vocab: &mut Vocab, rng: &mut StdRng, syllables: usize| -> u32 {
            loop {
                let w = pseudo_word(rng, syllables);
                if vocab.id(&w).is_none() {
                    return vocab.push(w);
                }
            }
        };
        let pool: Vec<u32> = (0..config.value_pool)
            .map(|_| fresh(&mut vocab, &mut rng, 2))
            .collect();
        let mut facts = Vec::new();
        for domain in 0..config.domains {
            let relations: Vec<(u32, Vec<u32>)> = (0..config.relations_per_domain)
                .map(|_| {
                    let r = fresh(&mut vocab, &mut rng, 2);
                    let mut cands = pool.clone();
                    cands.shuffle(&mut rng);
                    cands.truncate(config.values_per_relation);
                    cands.sort_unstable();
                    (r, cands)
                })
                .collect();
            let entities: Vec<u32> = (0..config.entities_per_domain)
                .map(|_| fresh(&mut vocab, &mut rng, 3))
                .collect();
            for &entity in &entities {
                for (relation, cands) in &relations {
                    let value = cands[rng.random_range(0..cands.len())];
                    facts.push(Fact {
                        domain,
                        entity,
                        relation: *relation,
                        value,
                        candidates: cands.clone(),
                    });
                }
            }
        }
        Ok(FactCorpus {
            config,
            vocab,
            facts,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CorpusConfig {
        &self.config
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Every fact.
    pub fn facts(&self) -> &[Fact] {
        &self.facts
    }

    /// Number of domains.
    pub fn domains(&self) -> usize {
        self.config.domains
    }

    /// The facts of `domains` in both templates (template-0 examples first).
    pub fn qa(&self, domains: &[usize]) -> TextSet {
        let mut out = Vec::new();
        for t in 0..2 {
            for f in self.facts.iter().filter(|f| domains.contains(&f.domain)) {
                out.push(f.example(t));
            }
        }
        TextSet::new(out)
    }

    /// The facts of `domains` (same order as one template of [`FactCorpus::qa`]).
    pub fn facts_of(&self, domains: &[usize]) -> Vec<&Fact> {
        self.facts
            .iter()
            .filter(|f| domains.contains(&f.domain))
            .collect()
    }

    /// The refusal answer (`unknown`).
    pub fn refusal(&self) -> Vec<u32> {
        vec![UNKNOWN]
    }

    /// Every value of the shared pool, as one-token answers (random-answer
    /// targets).
    pub fn value_answers(&self) -> Vec<Vec<u32>> {
        let mut v: Vec<u32> = self
            .facts
            .iter()
            .flat_map(|f| f.candidates.clone())
            .collect();
        v.sort_unstable();
        v.dedup();
        v.into_iter().map(|x| vec![x]).collect()
    }

    /// Chance accuracy of guessing among a relation's candidates.
    pub fn chance_accuracy(&self) -> f64 {
        1.0 / self.config.values_per_relation as f64
    }
}

#[cfg(test)]
mod tests;
