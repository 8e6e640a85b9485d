//! Unlearning methods and their metrics: what lethe runs when a user asks a
//! model to forget data, and how it measures that the model did.
//!
//! Shared by the CLI, the daemon (which wrap it in a request ledger, exact
//! index removal and signed receipts) and the evaluations (SalUn on digits,
//! O3 continual unlearning, RESTOR). Every method returns an
//! [`UnlearnReport`]: hyper-parameters, weight hashes before and after,
//! the SalUn mask or O3 adapter/detector hashes, whether the method only
//! suppresses, run time and metrics, i.e. what a receipt signs.
//!
//! # Methods
//!
//! Language models ([`lethe_model::decoder::Decoder`]), each one module
//! implementing [`lm::LmMethod`] with its own config (or chosen by name via
//! [`lm::LmMethodConfig`]), signature `(model, forget, retain, config) ->
//! report`, changing the base weights in place:
//!
//! * [`lm::ga`] gradient ascent, [`lm::graddiff`] GA + retain NLL,
//!   [`lm::npo`] NPO against the frozen original, [`lm::kl`] GA + KL to the
//!   original on retain data;
//! * [`lm::salun`] SalUn: a global top-fraction weight-saliency mask from
//!   the forget-loss gradient, then NPO / GA / refusal / random-answer
//!   targets with every update confined to the mask ([`saliency`]).
//!
//! To unlearn *documents* (plain token sequences, e.g. the text a deletion
//! request names) call [`lm::unlearn_texts`]`(model, forget, retain,
//! config)`: it wraps the sequences as documents and runs the configured
//! method.
//!
//! [`o3`] serves *continual* requests without touching the base: one LoRA
//! adapter per request trained with the orthogonality penalty against the
//! earlier adapters, one OOD detector per request (Mahalanobis + max-cosine
//! on hidden states, calibrated into a weight), per-query gates at
//! inference. It is suppression, and its reports say so.
//!
//! Classifiers ([`lethe_model::vision::ImageClassifier`]), via
//! [`classifier::ClassifierMethod`]: SalUn with random labels
//! ([`classifier::salun`]), gradient ascent, fine-tuning, and Retrain from
//! scratch, the exact reference.
//!
//! # Metrics
//!
//! [`metrics`] holds the model-free ones (AUROC, SalUn's UA/RA/TA/MIA and
//! average gap, SalUn's membership-inference attack, an RBF SVC solved as
//! libsvm does, truth-ratio aggregates);
//! [`classifier::evaluate`] and [`lm_eval`] run models (accuracy, NLL,
//! perplexity, refusal rate, candidate log-probabilities, truth ratios),
//! the latter through [`lm_eval::Scorer`] so that an O3-gated decoder is
//! measured with the same code as a plain one.
//!
//! # Data
//!
//! [`data`] holds token sequences with a prompt/answer split, labelled
//! images and scikit-learn's digits; [`corpus`] generates a multi-domain
//! fictional-fact corpus for training a small decoder from scratch.
//!
//! # Design decisions
//!
//! * Masked training relies on `lethe_model::optim`'s masked optimizers,
//!   which copy masked coordinates (and their moments) from their old
//!   values at every step; methods re-check bit-identity at the end and
//!   fail with [`Error::Invariant`] otherwise.
//! * NPO's reference log-likelihoods are computed once before training
//!   (the reference is frozen), so no second model is kept; KL keeps a
//!   frozen copy because it needs full distributions on retain batches.
//! * Everything is deterministic per seed on one CPU host, except LoRA
//!   dropout (candle's CPU generator cannot be seeded), which defaults to
//!   0. Across hosts, products deeper than 512 (SmolLM2's MLP, weight
//!   gradients over many tokens) may round differently: these paths use
//!   candle's `matmul`, whose depth blocks follow the host's L1 cache
//!   (`lethe-model`'s `nn::depth` module explains it; only the vision
//!   models' products are made host-independent there).

pub mod classifier;
pub mod corpus;
pub mod data;
mod error;
pub mod hash;
pub mod lm;
pub mod lm_eval;
pub mod metrics;
pub mod o3;
pub mod report;
pub mod saliency;

#[cfg(test)]
mod testutil;

pub use error::{Error, Result};
pub use report::UnlearnReport;
