//! Information-flow labels and the policies that give them meaning.
//!
//! Every document lethe holds carries a [`Label`]: who may read it
//! ([`Readers`], a formula over principal and group names), who vouches for
//! it ([`Integrity`]) and free [`Tag`]s (purpose, licence, source). Labels
//! form a lattice: [`Label::join`] is the label of anything computed from two
//! inputs, [`Label::flows_to`] says whether data may move somewhere without
//! declassification. These operations are pure and need no policy.
//!
//! A [`Policy`] (parsed from `policies/*.toml`) names the principals and
//! their nested groups, defines named labels (`hr-confidential`), declares
//! sinks (destinations with their own audience, like `email:external`) and
//! who may declassify what. It answers the questions the rest of lethe asks:
//! may this principal read this label ([`Policy::may_read`])? may this label
//! flow to that sink, and if not, which readers does it block
//! ([`Policy::check_flow`])?
//!
//! This crate is pure: no I/O beyond reading a policy file, no async, no
//! storage or model code. Decisions are total functions: they return a
//! verdict with reasons and never panic.
//!
//! ```
//! use lethe_label::Policy;
//! let policy = Policy::from_toml(r#"
//!     [principals.alice]
//!     [principals.bob]
//!     [groups.hr]
//!     members = ["alice"]
//!     [labels.hr-confidential]
//!     readers = ["hr"]
//! "#, "inline.toml").unwrap();
//! let label = policy.label("hr-confidential").unwrap();
//! assert!(policy.may_read("alice", label));
//! assert!(!policy.may_read("bob", label));
//! ```

mod label;
mod policy;

pub use label::{Clause, Integrity, Label, Reader, Readers, Tag, TRUSTED};
pub use policy::{
    Audience, Clearance, DeclassifyRule, LookupError, Policy, PolicyError, Principal, Problem,
    Role, Sink, SinkRef, Violation,
};

/// A malformed label or label part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// A name, clause or tag that breaks the label syntax.
    #[error("invalid label: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests;
