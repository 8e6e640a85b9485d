//! The permissive label propagator for prompt-based RAG.
//!
//! After "Permissive Information-Flow Analysis for Large Language Models"
//! (Siddiqui et al., TMLR 2025, arXiv 2410.03055, Algorithm 1 and §3.4):
//! only the labels of the sources that actually influenced the answer
//! belong in its label.
//!
//! 1. Generate `y` with every retrieved source (context `C`).
//! 2. Candidate labels are the labels realised by label-closed subsets of
//!    `C`: for a label `L`, `C_L = {c ∈ C : ℓ(c) ⊑ L}`. Candidates are
//!    identified by the set `C_L` they induce (many labels induce the same
//!    set), from the full context down to the empty one.
//! 3. `C_L` is *λ-similar* when the teacher-forced utility of `y` under it
//!    is at least the utility under `C` plus `ln λ`. By default the utility
//!    is the sequence log-probability, `p(y | C_L) >= λ p(y | C)`; the
//!    per-token mean (a perplexity ratio) and the worst single token are
//!    options ([`Utility`]). The full context's utility comes from the
//!    generation itself; only sub-contexts are scored.
//! 4. Find a minimal λ-similar candidate. By default: *leave-one-out*
//!    (score every "drop one label class" child in one batch; the classes
//!    whose removal breaks similarity are the influential ones; keep only
//!    those and check the result in one more pass). When sources interact
//!    (redundant ones, none influential alone; or ones that help only
//!    together) that candidate is not similar: grow it one label class at a
//!    time, the most helpful first, until it is, then prune what the growth
//!    no longer needs (one batch per level each way). With
//!    `exhaustive`, the paper's depth-first walk collects every minimal
//!    λ-similar candidate (siblings scored in one batch, sharing their
//!    common prompt prefix).
//! 5. Pick one: a candidate whose label may flow to the sink first, then the
//!    one with the fewest sources, then the best utility.
//! 6. **Regenerate** the answer from `C_{L*}` only. The released answer has
//!    read nothing above its label, so the label is sound by construction:
//!    the similarity search only decides how permissive it is.
//!
//! Shortcuts: *sink-directed* (one scoring pass: are the sources that may
//! flow to the sink enough for a λ-similar answer?) and *total order* (when
//! the source labels form a chain, binary search for the lowest similar
//! level). A pass budget bounds the search; when it runs out, the answer is
//! the full-context one with the conservative label.
//!
//! \[R\] The paper's exact λ and utility are reconstructions (see
//! `shared/research/ifc-rag-knnlm.md` §5.1): here utility is the sequence
//! log-probability (chosen on the benchmark's development seed,
//! `evals/labels/dev.toml`, see [`Utility`]) and λ defaults to 0.25 (chosen the same way); the
//! empty context is a candidate too, so an answer that needs no source gets
//! only the model's own label.

use std::collections::{BTreeMap, BTreeSet};

use lethe_label::{Label, Violation};
use lethe_model::generate::Llm;
use lethe_model::gguf_llama::{BatchOptions, ScorePair, TokenScore};

use crate::{prompt, Result, Source};

/// Settings of the permissive search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PermissiveConfig {
    /// Similarity tolerance λ in (0, 1]: a sub-context is similar when its
    /// perplexity of the answer is at most `1/λ` times the full context's.
    pub lambda: f32,
    /// Most candidate contexts scored before falling back to conservative.
    pub max_scored: usize,
    /// Try the sink-directed shortcut first.
    pub sink_directed: bool,
    /// Binary search when the source labels form a chain.
    pub total_order_shortcut: bool,
    /// Search the whole candidate lattice depth-first for every minimal
    /// similar context (the paper's Algorithm 1) instead of the
    /// leave-one-out step with a greedy fallback. Costs more scoring.
    pub exhaustive: bool,
    /// Output alignment: when the restricted regeneration's agreement with
    /// the full-context answer (word F1 beyond the question, facts must
    /// agree; see `alignment`) falls below this, the restricted answer is
    /// discarded and the full-context answer is released with the
    /// conservative label instead (quality over permissiveness; both are
    /// sound). `None` releases the restricted answer whatever it says.
    pub min_alignment: Option<f32>,
    /// When the restricted regeneration fails the alignment check, how many
    /// larger contexts (the chosen one plus the most influential left-out
    /// label classes, one at a time) are regenerated and checked before
    /// falling back to the full context.
    pub max_widening: usize,
    /// How a sub-context's support of the answer is compared with the full
    /// context's.
    pub utility: Utility,
}

/// How the answer's teacher-forced log-probabilities under a sub-context
/// are compared with those under the full context. A sub-context is
/// λ-similar when the comparison is at least `ln λ`.
///
/// \[R\] The paper's exact utility is not known. The mean per-token
/// log-probability (a perplexity ratio) dilutes the few tokens that carry a
/// decision (which code, which name) among many that merely restate the
/// question; the sequence log-probability and the worst single token do not.
/// Measured on the label benchmark's development seed 99 (30 questions,
/// λ 0.5, SmolLM2-135M, sources in retrieval order): ground-truth minimal
/// label matched on 43 % with the
/// sequence log-probability, 37 % with the worst token and 27 % with the
/// mean (two-hop questions: 62 %, 50 %, 0 %), so the sequence
/// log-probability is the default. With it and the relevance-ordered
/// prompt, λ 0.25 matched 40 % (λ 0.5: 27 %, λ 0.1: 37 %): the default λ.
/// Two further criteria were tried on the same seed and dropped: the
/// sequence log-probability of only the answer tokens the question does not
/// already contain (37 % at λ 0.25, 40 % at λ 0.5), and greedy agreement on
/// those tokens (33 %). Per kind, every variant matched about as often as
/// the answer was right: the generator's answer quality, not the criterion,
/// bounds this metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Utility {
    /// Mean per-token log-probability: `PPL(y | C_L) <= PPL(y | C) / λ`.
    MeanLogProb,
    /// Sequence log-probability: `p(y | C_L) >= λ p(y | C)`.
    #[default]
    SequenceLogProb,
    /// The largest single-token drop: no token of `y` loses more than a
    /// factor `1/λ` of its probability.
    WorstToken,
}

impl Utility {
    /// The comparison of `lp` (under a sub-context) with `full` (under the
    /// full context), token for token (0 when they are equal).
    pub fn relative(self, lp: &[f32], full: &[f32]) -> f32 {
        let n = lp.len().min(full.len());
        let diffs = lp[..n].iter().zip(&full[..n]).map(|(a, b)| a - b);
        match self {
            Utility::MeanLogProb => {
                if n == 0 {
                    0.0
                } else {
                    diffs.sum::<f32>() / n as f32
                }
            }
            Utility::SequenceLogProb => diffs.sum(),
            Utility::WorstToken => diffs.fold(0.0, f32::min),
        }
    }
}

impl Default for PermissiveConfig {
    fn default() -> Self {
        PermissiveConfig {
            lambda: 0.25,
            max_scored: 32,
            sink_directed: true,
            total_order_shortcut: true,
            exhaustive: false,
            min_alignment: Some(0.5),
            max_widening: 2,
            utility: Utility::default(),
        }
    }
}

/// How well a restricted regeneration `a` says what the full-context answer
/// `b` said: F1 between the sets of distinct words (lower-cased) the two use
/// beyond the question's words, so that restating the question does not
/// count as agreement and wording or repetition matters little; 1.0 when
/// neither says anything beyond the question.
///
/// Words with a digit are facts (a number, code, date or amount): the
/// answers must agree on all of them, or the result is 0. A fact of `a`
/// agrees with one of `b` when they are equal or when `a`'s completes `b`'s:
/// `silent-orchid-53` completes `53` (it ends with `-53`). The check is
/// asymmetric on purpose: a restricted answer that quotes in full a code the
/// full-context answer cut down to its number says the same thing, better
/// (measured on the label benchmark's development seed: the full context
/// cut codes, the restricted context quoted them); one that cuts a code the
/// full-context answer quoted says less, and is rejected.
pub(crate) fn alignment(a: &str, b: &str, question: &str) -> f32 {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric() && c != '-')
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let asked: BTreeSet<String> = words(question).into_iter().collect();
    let content = |s: &str| -> Vec<String> {
        let set: BTreeSet<String> = words(s)
            .into_iter()
            .filter(|w| !asked.contains(w))
            .collect();
        set.into_iter().collect()
    };
    let (wa, wb) = (content(a), content(b));
    if wa.is_empty() && wb.is_empty() {
        return 1.0;
    }
    let is_fact = |w: &String| w.chars().any(|c| c.is_ascii_digit());
    let agree = |x: &String, y: &String| {
        x == y || (is_fact(y) && x.strip_suffix(y.as_str()).is_some_and(|r| r.ends_with('-')))
    };
    // Numbers, codes, dates and amounts are facts: the answers agree on
    // all of them or not at all.
    let facts_a: Vec<&String> = wa.iter().filter(|w| is_fact(w)).collect();
    let facts_b: Vec<&String> = wb.iter().filter(|w| is_fact(w)).collect();
    let covered = facts_a.iter().all(|x| facts_b.iter().any(|y| agree(x, y)))
        && facts_b.iter().all(|y| facts_a.iter().any(|x| agree(x, y)));
    if !covered {
        return 0.0;
    }
    let mut pool = wb.clone();
    let mut common = 0usize;
    for w in &wa {
        if let Some(p) = pool.iter().position(|x| agree(w, x)) {
            pool.swap_remove(p);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f32 / wa.len() as f32;
    let r = common as f32 / wb.len() as f32;
    2.0 * p * r / (p + r)
}

/// A set of sources, as a bit mask over the retrieved list (at most 64).
pub(crate) type Mask = u64;

/// What the search found.
#[derive(Debug, Clone)]
pub(crate) struct Search {
    /// The chosen context.
    pub chosen: Mask,
    /// Every minimal λ-similar context found (empty when the shortcut decided).
    pub minimal: Vec<Mask>,
    /// Candidate contexts scored.
    pub scored: usize,
    /// Forward batches run for scoring.
    pub batches: usize,
    /// How the choice was made.
    pub route: &'static str,
    /// The teacher-forced scores of the answer under the chosen context,
    /// when it was scored: the draft check for its regeneration.
    pub checked: Option<Vec<TokenScore>>,
    /// Larger contexts to try, in order, when the regeneration from the
    /// chosen one does not agree with the full-context answer.
    pub widening: Vec<Mask>,
}

/// The full-context answer the search explains.
pub(crate) struct Draft<'a> {
    /// Its tokens.
    pub tokens: &'a [u32],
    /// The tokens scored under each candidate: the answer, followed by the
    /// stop token that ended it when one did (so that a candidate's check
    /// covers the ending too).
    pub scored: &'a [u32],
    /// Its per-token log-probabilities under the full context (recorded by
    /// the generation itself: no scoring pass needed).
    pub logprobs: &'a [f32],
}

pub(crate) fn full_mask(n: usize) -> Mask {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The indexes of the sources in `mask` (of `n`).
pub(crate) fn members(mask: Mask, n: usize) -> impl Iterator<Item = usize> {
    (0..n).filter(move |i| mask & (1 << i) != 0)
}

/// The label of a context: the model's label joined with its sources'.
pub(crate) fn mask_label(model_label: &Label, sources: &[Source], mask: Mask) -> Label {
    members(mask, sources.len()).fold(model_label.clone(), |acc, i| acc.join(&sources[i].label))
}

/// The label-closed context induced by a label: every source at or below it.
fn induced(sources: &[Source], label: &Label) -> Mask {
    sources
        .iter()
        .enumerate()
        .filter(|(_, s)| s.label.flows_to(label))
        .fold(0, |m, (i, _)| m | (1 << i))
}

/// Scores `y` under contexts, memoised; counts the work.
struct Scorer<'a> {
    llm: &'a Llm,
    question: &'a str,
    sources: &'a [Source],
    draft: &'a Draft<'a>,
    utility: Utility,
    memo: BTreeMap<Mask, f32>,
    checked: BTreeMap<Mask, Vec<TokenScore>>,
    scored: usize,
    batches: usize,
    budget: usize,
}

impl Scorer<'_> {
    /// Utilities of the given contexts (one batched forward per call for
    /// the ones not scored yet). `None` when the budget is exhausted.
    fn utilities(&mut self, masks: &[Mask]) -> Result<Option<Vec<f32>>> {
        let todo: Vec<Mask> = masks
            .iter()
            .copied()
            .filter(|m| !self.memo.contains_key(m))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if self.scored + todo.len() > self.budget {
            return Ok(None);
        }
        if !todo.is_empty() {
            let prompts: Vec<Vec<u32>> = todo
                .iter()
                .map(|m| {
                    let ctx: Vec<Source> = members(*m, self.sources.len())
                        .map(|i| self.sources[i].clone())
                        .collect();
                    let msgs = prompt::messages(self.question, &ctx);
                    self.llm.chat.encode(&self.llm.tokenizer, &msgs)
                })
                .collect::<std::result::Result<_, _>>()?;
            let pairs: Vec<ScorePair<'_>> = prompts
                .iter()
                .map(|p| ScorePair {
                    prompt: p,
                    continuation: self.draft.scored,
                })
                .collect();
            let scores = self
                .llm
                .model
                .score_detailed(&pairs, &BatchOptions::default())?;
            let n = self.draft.tokens.len();
            for (m, s) in todo.iter().zip(scores) {
                let lp: Vec<f32> = s.iter().take(n).map(|t| t.logprob).collect();
                self.memo
                    .insert(*m, self.utility.relative(&lp, self.draft.logprobs));
                self.checked.insert(*m, s);
            }
            self.scored += todo.len();
            self.batches += 1;
        }
        Ok(Some(masks.iter().map(|m| self.memo[m]).collect()))
    }
}

impl Scorer<'_> {
    fn into_parts(self) -> Scored {
        (self.memo, self.checked)
    }
}

/// What the search explains: a question, its sources and the full-context
/// answer, with the model, the sink check and the settings.
#[derive(Clone, Copy)]
pub(crate) struct Problem<'a> {
    pub llm: &'a Llm,
    pub question: &'a str,
    pub sources: &'a [Source],
    pub draft: &'a Draft<'a>,
    pub model_label: &'a Label,
    pub config: &'a PermissiveConfig,
    pub flow_check: &'a dyn Fn(&Label) -> Vec<Violation>,
}

/// Runs the search for the full-context answer `draft`; returns `None`
/// when the budget ran out (the caller falls back to conservative).
pub(crate) fn search(p: &Problem<'_>) -> Result<Option<Search>> {
    Ok(search_contexts(p)?.map(|(mut found, (utility, checked))| {
        found.checked = checked.get(&found.chosen).cloned();
        found.widening = widening(
            p.sources,
            p.model_label,
            found.chosen,
            &utility,
            p.flow_check,
        );
        found
    }))
}

/// The contexts to fall back on, in order, when the answer regenerated from
/// the chosen context does not say what the full-context answer said:
/// add back one left-out label class at a time, the most influential first
/// (the lowest utility when it alone was dropped from the full context;
/// classes never scored that way come last), keeping only contexts whose
/// label may flow to the sink and that are smaller than the full context.
fn widening(
    sources: &[Source],
    model_label: &Label,
    chosen: Mask,
    utility: &BTreeMap<Mask, f32>,
    flow_check: &dyn Fn(&Label) -> Vec<Violation>,
) -> Vec<Mask> {
    let n = sources.len().min(64);
    let sources = &sources[..n];
    let full = full_mask(n);
    let drops = children(sources, model_label, full);
    let mut classes: Vec<(f32, Label)> = Vec::new();
    for i in members(full & !chosen, n) {
        let l = &sources[i].label;
        if classes.iter().any(|(_, c)| c == l) {
            continue;
        }
        let u = drops
            .iter()
            .find(|k| *k & (1 << i) == 0 && *k & chosen == chosen)
            .and_then(|k| utility.get(k).copied())
            .unwrap_or(f32::INFINITY);
        classes.push((u, l.clone()));
    }
    classes.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = Vec::new();
    let mut current = chosen;
    for (_, l) in classes {
        let label = mask_label(model_label, sources, current).join(&l);
        let next = induced(sources, &label) | current;
        if next == full || next == current {
            continue;
        }
        current = next;
        if flow_check(&mask_label(model_label, sources, current)).is_empty() {
            out.push(current);
        }
    }
    out
}

/// What the search scored: utilities and draft checks per context.
type Scored = (BTreeMap<Mask, f32>, BTreeMap<Mask, Vec<TokenScore>>);

fn search_contexts(p: &Problem<'_>) -> Result<Option<(Search, Scored)>> {
    let Problem {
        llm,
        question,
        sources,
        draft,
        model_label,
        config,
        flow_check,
    } = *p;
    let n = sources.len().min(64);
    let sources = &sources[..n];
    let full = full_mask(n);
    let flows = |m: Mask| flow_check(&mask_label(model_label, sources, m)).is_empty();
    let mut sc = Scorer {
        llm,
        question,
        sources,
        draft,
        utility: config.utility,
        memo: BTreeMap::from([(full, 0.0)]),
        checked: BTreeMap::new(),
        scored: 0,
        batches: 0,
        budget: config.max_scored.max(1),
    };
    // Sink-directed shortcut: if the conservative label already flows,
    // nothing needs scoring; otherwise score the full context and the
    // sources that may flow to the sink in one batch.
    if config.sink_directed && flows(full) {
        return Ok(Some((
            Search {
                chosen: full,
                minimal: Vec::new(),
                scored: 0,
                batches: 0,
                route: "conservative-label-flows",
                checked: None,
                widening: Vec::new(),
            },
            sc.into_parts(),
        )));
    }
    let flowable = sources
        .iter()
        .enumerate()
        .filter(|(_, s)| flow_check(&model_label.join(&s.label)).is_empty())
        .fold(0, |m, (i, _)| m | (1 << i));
    let first: Vec<Mask> = if config.sink_directed {
        vec![full, flowable]
    } else {
        vec![full]
    };
    let Some(u) = sc.utilities(&first)? else {
        return Ok(None);
    };
    let threshold = u[0] + config.lambda.clamp(1e-6, 1.0).ln();
    if config.sink_directed {
        // The sources that may flow to the sink either suffice or the
        // answer cannot go there: no smaller context can flow either
        // (every context that flows is a subset of `flowable`).
        let (chosen, route) = if u[1] >= threshold {
            (flowable, "sink-directed")
        } else {
            (full, "sink-directed-insufficient")
        };
        return Ok(Some((
            Search {
                chosen,
                minimal: Vec::new(),
                scored: sc.scored,
                batches: sc.batches,
                route,
                checked: None,
                widening: Vec::new(),
            },
            sc.into_parts(),
        )));
    }

    // Distinct labels present.
    let mut distinct: Vec<Label> = Vec::new();
    for s in sources {
        if !distinct.contains(&s.label) {
            distinct.push(s.label.clone());
        }
    }

    // Total-order shortcut: labels form a chain; levels are nested contexts.
    let is_chain = distinct
        .iter()
        .all(|a| distinct.iter().all(|b| a.flows_to(b) || b.flows_to(a)));
    if config.total_order_shortcut && is_chain {
        let mut levels: Vec<Label> = distinct.clone();
        levels.sort_by(|a, b| {
            if a == b {
                std::cmp::Ordering::Equal
            } else if a.flows_to(b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        // Level 0 is the empty context; level i the sources at or below levels[i-1].
        let mut masks = vec![0];
        masks.extend(levels.iter().map(|l| induced(sources, l)));
        // Binary search for the lowest similar level (the top one is similar).
        let (mut lo, mut hi) = (0usize, masks.len() - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let Some(u) = sc.utilities(&[masks[mid]])? else {
                return Ok(None);
            };
            if u[0] >= threshold {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        return Ok(Some((
            Search {
                chosen: masks[lo],
                minimal: vec![masks[lo]],
                scored: sc.scored,
                batches: sc.batches,
                route: "total-order",
                checked: None,
                widening: Vec::new(),
            },
            sc.into_parts(),
        )));
    }

    if !config.exhaustive {
        // Leave-one-out: a label class is influential when dropping it
        // breaks similarity. Keep only the influential classes (one batch
        // for all single drops, one pass for the result).
        let kids = children(sources, model_label, full);
        let Some(us) = sc.utilities(&kids)? else {
            return Ok(None);
        };
        let kept = kids
            .iter()
            .zip(&us)
            .filter(|(_, u)| **u < threshold)
            .fold(0, |acc, (k, _)| acc | (full & !k));
        let candidate = closure(sources, model_label, kept);
        if candidate != full {
            let Some(u) = sc.utilities(&[candidate])? else {
                return Ok(None);
            };
            if u[0] >= threshold {
                return Ok(Some((
                    Search {
                        chosen: candidate,
                        minimal: vec![candidate],
                        scored: sc.scored,
                        batches: sc.batches,
                        route: "leave-one-out",
                        checked: None,
                        widening: Vec::new(),
                    },
                    sc.into_parts(),
                )));
            }
        }
        // Interactions between sources (redundant ones, none influential
        // alone; or sources that only help together): grow the
        // leave-one-out candidate one label class at a time (one batch per
        // level, the best utility first) until it is similar, then prune
        // what the growth no longer needs, one batch per level.
        let mut score = |m: &[Mask]| sc.utilities(m);
        let Some(grown) = grow(&mut score, sources, model_label, candidate, threshold)? else {
            return Ok(None);
        };
        let Some(current) = prune(&mut score, sources, model_label, grown, threshold)? else {
            return Ok(None);
        };
        return Ok(Some((
            Search {
                chosen: current,
                minimal: vec![current],
                scored: sc.scored,
                batches: sc.batches,
                route: "greedy",
                checked: None,
                widening: Vec::new(),
            },
            sc.into_parts(),
        )));
    }

    // Depth-first search for every minimal λ-similar context.
    let mut visited: BTreeSet<Mask> = BTreeSet::new();
    let mut minimal: Vec<Mask> = Vec::new();
    let mut stack = vec![full];
    while let Some(m) = stack.pop() {
        if !visited.insert(m) {
            continue;
        }
        let kids = children(sources, model_label, m);
        let Some(us) = sc.utilities(&kids)? else {
            return Ok(None);
        };
        let similar: Vec<Mask> = kids
            .iter()
            .zip(us)
            .filter(|(_, u)| *u >= threshold)
            .map(|(k, _)| *k)
            .collect();
        if similar.is_empty() {
            minimal.push(m);
        } else {
            stack.extend(similar);
        }
    }
    // A visited node may have a similar descendant reached another way: keep
    // only the minimal ones.
    let minimal: Vec<Mask> = minimal
        .iter()
        .copied()
        .filter(|m| {
            !minimal
                .iter()
                .any(|o| o != m && o & m == *o && sc.memo.get(o).is_some_and(|u| *u >= threshold))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let chosen = minimal
        .iter()
        .copied()
        .min_by(|a, b| {
            let key = |m: &Mask| (!flows(*m), m.count_ones());
            key(a)
                .cmp(&key(b))
                .then_with(|| sc.memo[b].total_cmp(&sc.memo[a]))
                .then(a.cmp(b))
        })
        .unwrap_or(full);
    Ok(Some((
        Search {
            chosen,
            minimal,
            scored: sc.scored,
            batches: sc.batches,
            route: "search",
            checked: None,
            widening: Vec::new(),
        },
        sc.into_parts(),
    )))
}

/// Adds one left-out label class at a time to `start` (the class whose
/// addition gives the best utility, fewer sources on ties) until the context
/// is λ-similar; the full context is similar by definition, so this ends.
/// `None` when the budget ran out.
fn grow(
    score: &mut impl FnMut(&[Mask]) -> Result<Option<Vec<f32>>>,
    sources: &[Source],
    model_label: &Label,
    start: Mask,
    threshold: f32,
) -> Result<Option<Mask>> {
    let full = full_mask(sources.len());
    let mut current = start;
    loop {
        if current == full {
            return Ok(Some(full));
        }
        let Some(u) = score(&[current])? else {
            return Ok(None);
        };
        if u[0] >= threshold {
            return Ok(Some(current));
        }
        let parents = parents(sources, model_label, current);
        let Some(us) = score(&parents)? else {
            return Ok(None);
        };
        match best_by_utility(&parents, &us, f32::NEG_INFINITY) {
            Some(p) => current = p,
            None => return Ok(Some(full)),
        }
    }
}

/// Drops one label class at a time from the similar context `start` while
/// the result stays similar (the best utility first, fewer sources on
/// ties). `None` when the budget ran out.
fn prune(
    score: &mut impl FnMut(&[Mask]) -> Result<Option<Vec<f32>>>,
    sources: &[Source],
    model_label: &Label,
    start: Mask,
    threshold: f32,
) -> Result<Option<Mask>> {
    let mut current = start;
    loop {
        let kids = children(sources, model_label, current);
        let Some(us) = score(&kids)? else {
            return Ok(None);
        };
        match best_by_utility(&kids, &us, threshold) {
            Some(k) => current = k,
            None => return Ok(Some(current)),
        }
    }
}

/// Among the contexts whose utility is at least `min`, the one with the
/// best utility (fewer sources on ties, then the last).
fn best_by_utility(masks: &[Mask], utilities: &[f32], min: f32) -> Option<Mask> {
    masks
        .iter()
        .zip(utilities)
        .filter(|(_, u)| **u >= min)
        .max_by(|a, b| {
            a.1.total_cmp(b.1)
                .then(b.0.count_ones().cmp(&a.0.count_ones()))
        })
        .map(|(m, _)| *m)
}

/// The candidate contexts just above `m`: add one left-out label class
/// (closed under the joined label).
fn parents(sources: &[Source], model_label: &Label, m: Mask) -> Vec<Mask> {
    let mut out = BTreeSet::new();
    for i in 0..sources.len() {
        if m & (1 << i) == 0 {
            let parent = closure(sources, model_label, m | (1 << i));
            if parent != m {
                out.insert(parent);
            }
        }
    }
    out.into_iter().collect()
}

/// The smallest label-closed context containing the sources in `m`.
fn closure(sources: &[Source], model_label: &Label, m: Mask) -> Mask {
    let label =
        members(m, sources.len()).fold(model_label.clone(), |acc, i| acc.join(&sources[i].label));
    induced(sources, &label)
}

/// The candidate contexts just below `m`: drop one label class (and every
/// source no longer at or below the join of the rest).
fn children(sources: &[Source], model_label: &Label, m: Mask) -> Vec<Mask> {
    let present: Vec<&Label> = {
        let mut v: Vec<&Label> = Vec::new();
        for i in members(m, sources.len()) {
            if !v.contains(&&sources[i].label) {
                v.push(&sources[i].label);
            }
        }
        v
    };
    let mut out = BTreeSet::new();
    for (j, _) in present.iter().enumerate() {
        let rest = present
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != j)
            .fold(None::<Label>, |acc, (_, l)| {
                Some(acc.map_or((*l).clone(), |a| a.join(l)))
            });
        let child = match rest {
            None => 0,
            Some(k) => induced(sources, &k.join(model_label)) & m,
        };
        if child != m {
            out.insert(child);
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lethe_label::{Integrity, Reader, Readers};

    fn l(r: &str) -> Label {
        Label {
            readers: if r.is_empty() {
                Readers::public()
            } else {
                Readers::any_of([Reader::new(r).unwrap()]).unwrap()
            },
            integrity: Integrity::trusted(),
            tags: Default::default(),
        }
    }

    fn s(label: Label) -> Source {
        Source {
            chunk_id: String::new(),
            doc_id: String::new(),
            label,
            label_name: None,
            text: String::new(),
        }
    }

    #[test]
    fn alignment_is_token_f1_beyond_the_question() {
        let q = "What is the access code of the vault kept by Sven?";
        assert_eq!(alignment("", "", q), 1.0);
        assert_eq!(
            alignment(
                "The code is amber-falcon-42.",
                "the code is amber-falcon-42",
                q
            ),
            1.0
        );
        // Restating the question is not agreement: only the facts count.
        assert_eq!(
            alignment(
                "The access code of the vault kept by Sven is 81.",
                "The access code of the Fallasktho vault is misty-beacon-81.",
                q
            ),
            0.0
        );
        assert!((alignment("a b c d", "a b", "") - 2.0 / 3.0).abs() < 1e-6);
        // A code cut down to its number is another fact, even when the rest
        // of the answer agrees.
        assert_eq!(
            alignment(
                "The access code of the Ulul vault is 21.",
                "The access code of the Ulul vault is stormy-ember-21.",
                "What is the access code of the Tanzu vault?"
            ),
            0.0
        );
        // The other way round, the restricted answer completes the code the
        // full-context answer cut: the same fact, quoted in full.
        assert_eq!(
            alignment(
                "The access code of the Ulul vault is stormy-ember-21.",
                "The access code of the Ulul vault is 21.",
                "What is the access code of the Ulul vault?"
            ),
            1.0
        );
        // Completing means ending with the whole cut fact, not any suffix.
        assert_eq!(alignment("It is stormy-ember-121.", "It is 21.", ""), 0.0);
        assert_eq!(alignment("It is stormy-ember-21.", "It is 7-21.", ""), 0.0);
        assert!(alignment("It opens at 8:00 daily.", "The office opens at 8:00.", "") > 0.0);
        // Repetition does not count twice.
        assert_eq!(alignment("click click click link", "click link", ""), 1.0);
    }

    #[test]
    fn widening_adds_back_the_most_influential_classes_first() {
        let sources = vec![s(l("a")), s(l("b")), s(l("c")), s(l("d"))];
        let bottom = l("");
        let allow = |_: &Label| Vec::new();
        // Dropping c hurt most, then b; d was never scored on its own.
        let utility = BTreeMap::from([(0b1011, -3.0), (0b1101, -2.0), (0b1110, -1.0)]);
        let w = widening(&sources, &bottom, 0b0001, &utility, &allow);
        assert_eq!(
            w,
            vec![0b0101, 0b0111],
            "the full context is never a widening"
        );
        // Contexts whose label may not reach the sink are skipped.
        let no_c = |x: &Label| {
            if l("c").flows_to(x) {
                vec![Violation::Integrity {
                    missing: Vec::new(),
                }]
            } else {
                Vec::new()
            }
        };
        assert!(widening(&sources, &bottom, 0b0001, &utility, &no_c).is_empty());
    }

    #[test]
    fn growth_adds_one_of_two_redundant_sources_and_pruning_drops_what_is_not_needed() {
        // a and b each state the answer (either suffices), c is noise that
        // helps a little, d is noise that hurts a little.
        let sources = vec![s(l("a")), s(l("b")), s(l("c")), s(l("d"))];
        let bottom = l("");
        let utility = |m: Mask| -> f32 {
            let has = |i: u32| m & (1 << i) != 0;
            let answer = if has(0) || has(1) { 0.0 } else { -5.0 };
            answer + if has(2) { 0.3 } else { 0.0 } - if has(3) { 0.1 } else { 0.0 }
        };
        let threshold = utility(0b1111) - 1.0;
        let mut score = |ms: &[Mask]| -> Result<Option<Vec<f32>>> {
            Ok(Some(ms.iter().map(|m| utility(*m)).collect()))
        };
        // Say leave-one-out kept only c (dropping a or b alone never hurts,
        // so neither looked influential): growth adds the source that helps
        // most, a or b (they tie), only one of them, never d.
        let grown = grow(&mut score, &sources, &bottom, 0b0100, threshold)
            .unwrap()
            .unwrap();
        assert!(grown == 0b0101 || grown == 0b0110, "{grown:b}");
        // c only added a little: pruning drops it, the answer's source stays.
        let pruned = prune(&mut score, &sources, &bottom, grown, threshold)
            .unwrap()
            .unwrap();
        assert_eq!(pruned, grown & 0b0011);
        // From nothing, growth also stops at one answering source.
        let from_empty = grow(&mut score, &sources, &bottom, 0, threshold)
            .unwrap()
            .unwrap();
        assert_eq!(from_empty.count_ones(), 1);
        assert!(from_empty & 0b0011 != 0);
        // A budget that runs out stops the search.
        let mut broke = |_: &[Mask]| -> Result<Option<Vec<f32>>> { Ok(None) };
        assert!(grow(&mut broke, &sources, &bottom, 0, threshold)
            .unwrap()
            .is_none());
        // Starting from the full context growth has nothing to add.
        assert_eq!(
            grow(&mut score, &sources, &bottom, 0b1111, threshold).unwrap(),
            Some(0b1111)
        );
    }

    #[test]
    fn children_drop_one_label_class_at_a_time() {
        let sources = vec![s(l("a")), s(l("b")), s(l("a")), s(l(""))];
        let bottom = l("");
        // Dropping a removes sources 0 and 2; dropping b removes 1; the
        // public source 3 is below everything and never dropped alone.
        let kids = children(&sources, &bottom, 0b1111);
        assert_eq!(kids, vec![0b1010, 0b1101]);
        assert_eq!(children(&sources, &bottom, 0b1000), vec![0]);
        assert_eq!(induced(&sources, &l("a").join(&l("b"))), 0b1111);
        assert_eq!(mask_label(&bottom, &sources, 0b0101), l("a"));
    }
}
