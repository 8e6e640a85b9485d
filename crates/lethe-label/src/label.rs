//! The label lattice: who may read (confidentiality), who vouches for the data
//! (integrity), and free tags (purpose, licence, source).
//!
//! Confidentiality is a formula in conjunctive normal form over reader names,
//! as in DC labels (Stefan et al., "Disjunction Category Labels", 2011): a
//! label `(hr | legal) & finance` may be read by whoever satisfies *every*
//! clause, i.e. is in `hr` or `legal`, and is in `finance`. The empty formula
//! is `public`. This form makes `join` exact *without* knowing the policy: the
//! join of two labels is the conjunction of their clauses, so group
//! membership can change (a policy reload) and stored labels stay meaningful.
//! Only reading (`Policy::may_read`) needs the policy, to resolve names.
//!
//! Integrity is the set of endorsements the data carries (`trusted`, or the
//! names of writers that vouch for it). Combining data keeps only the
//! endorsements all inputs share, so integrity can only fall.
//!
//! Tags accumulate: the output of a computation carries the tags of all its
//! inputs, and sinks may refuse some tags.
//!
//! The order: `a.flows_to(b)` means data labelled `a` may be relabelled `b`
//! without declassification: `b` is at least as restrictive in every
//! component. `join` is the least upper bound, `meet` the greatest lower bound.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A reader name: a principal or a group, resolved by the policy.
///
/// Invariant: non-empty, no whitespace, not the reserved word `public`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reader(String);

impl Reader {
    /// Validates a reader name.
    pub fn new(name: impl Into<String>) -> Result<Reader, crate::LabelError> {
        let name = name.into();
        validate_name(&name, "reader")?;
        if name == "public" {
            return Err(crate::LabelError::Invalid(
                "`public` is not a reader name; write the label as public instead".into(),
            ));
        }
        Ok(Reader(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Reader {
    type Error = crate::LabelError;
    fn try_from(s: String) -> Result<Reader, crate::LabelError> {
        Reader::new(s)
    }
}

impl From<Reader> for String {
    fn from(r: Reader) -> String {
        r.0
    }
}

impl fmt::Display for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A disjunction of readers: satisfied by anyone who is one of them.
///
/// Invariant: non-empty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "BTreeSet<Reader>", into = "BTreeSet<Reader>")]
pub struct Clause(BTreeSet<Reader>);

impl Clause {
    /// A clause of the given readers; errors when empty.
    pub fn new(readers: impl IntoIterator<Item = Reader>) -> Result<Clause, crate::LabelError> {
        let set: BTreeSet<Reader> = readers.into_iter().collect();
        if set.is_empty() {
            return Err(crate::LabelError::Invalid(
                "a reader clause needs at least one reader".into(),
            ));
        }
        Ok(Clause(set))
    }

    /// The readers, sorted.
    pub fn readers(&self) -> &BTreeSet<Reader> {
        &self.0
    }

    fn is_subset(&self, other: &Clause) -> bool {
        self.0.is_subset(&other.0)
    }
}

impl TryFrom<BTreeSet<Reader>> for Clause {
    type Error = crate::LabelError;
    fn try_from(s: BTreeSet<Reader>) -> Result<Clause, crate::LabelError> {
        Clause::new(s)
    }
}

impl From<Clause> for BTreeSet<Reader> {
    fn from(c: Clause) -> BTreeSet<Reader> {
        c.0
    }
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(Reader::as_str).collect();
        if names.len() == 1 {
            f.write_str(names[0])
        } else {
            write!(f, "({})", names.join(" | "))
        }
    }
}

/// Confidentiality: a conjunction of reader clauses (empty = public).
///
/// Invariant: in normal form, i.e. no clause is a superset of another (a
/// superset clause is implied and would only make equal labels compare
/// unequal). Every constructor normalises.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(from = "BTreeSet<Clause>", into = "BTreeSet<Clause>")]
pub struct Readers(BTreeSet<Clause>);

impl Readers {
    /// Readable by anyone.
    pub fn public() -> Readers {
        Readers(BTreeSet::new())
    }

    /// Readable by anyone in any of `readers` (one clause).
    pub fn any_of(readers: impl IntoIterator<Item = Reader>) -> Result<Readers, crate::LabelError> {
        Ok(Readers::from_clauses([Clause::new(readers)?]))
    }

    /// Readable by whoever satisfies every clause.
    pub fn from_clauses(clauses: impl IntoIterator<Item = Clause>) -> Readers {
        Readers(normalise(clauses.into_iter().collect()))
    }

    /// Whether this is `public`.
    pub fn is_public(&self) -> bool {
        self.0.is_empty()
    }

    /// The clauses, in normal form.
    pub fn clauses(&self) -> &BTreeSet<Clause> {
        &self.0
    }

    /// Least upper bound: readable only by those who may read both.
    pub fn join(&self, other: &Readers) -> Readers {
        Readers(normalise(self.0.union(&other.0).cloned().collect()))
    }

    /// Greatest lower bound: readable by those who may read either.
    pub fn meet(&self, other: &Readers) -> Readers {
        let mut out = BTreeSet::new();
        for a in &self.0 {
            for b in &other.0 {
                out.insert(Clause(a.0.union(&b.0).cloned().collect()));
            }
        }
        Readers(normalise(out))
    }

    /// `self` may flow to `other`: `other` is at least as restrictive, i.e.
    /// every clause of `self` is implied by some clause of `other`.
    pub fn flows_to(&self, other: &Readers) -> bool {
        self.0
            .iter()
            .all(|a| other.0.iter().any(|b| b.is_subset(a)))
    }

    /// Every reader name the formula mentions.
    pub fn names(&self) -> impl Iterator<Item = &Reader> {
        self.0.iter().flat_map(|c| c.0.iter())
    }
}

impl From<BTreeSet<Clause>> for Readers {
    fn from(s: BTreeSet<Clause>) -> Readers {
        Readers(normalise(s))
    }
}

impl From<Readers> for BTreeSet<Clause> {
    fn from(r: Readers) -> BTreeSet<Clause> {
        r.0
    }
}

impl fmt::Display for Readers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("public");
        }
        let parts: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&parts.join(" & "))
    }
}

/// Removes every clause that is a strict superset of another clause.
fn normalise(clauses: BTreeSet<Clause>) -> BTreeSet<Clause> {
    clauses
        .iter()
        .filter(|c| !clauses.iter().any(|d| d != *c && d.is_subset(c)))
        .cloned()
        .collect()
}

/// Integrity: the endorsements data carries. Fewer endorsements = lower
/// integrity; the empty set is "untrusted".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "BTreeSet<String>", into = "BTreeSet<String>")]
pub struct Integrity(BTreeSet<String>);

impl TryFrom<BTreeSet<String>> for Integrity {
    type Error = crate::LabelError;
    fn try_from(s: BTreeSet<String>) -> Result<Integrity, crate::LabelError> {
        Integrity::endorsed_by(s)
    }
}

impl From<Integrity> for BTreeSet<String> {
    fn from(i: Integrity) -> BTreeSet<String> {
        i.0
    }
}

/// The built-in endorsement of data the organisation trusts.
pub const TRUSTED: &str = "trusted";

impl Integrity {
    /// No endorsement at all.
    pub fn untrusted() -> Integrity {
        Integrity(BTreeSet::new())
    }

    /// Endorsed by `trusted`.
    pub fn trusted() -> Integrity {
        Integrity([TRUSTED.to_string()].into())
    }

    /// Endorsed by the given names (validated).
    pub fn endorsed_by(
        names: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Integrity, crate::LabelError> {
        let mut set = BTreeSet::new();
        for n in names {
            let n = n.into();
            validate_name(&n, "endorsement")?;
            set.insert(n);
        }
        Ok(Integrity(set))
    }

    /// The endorsements.
    pub fn endorsements(&self) -> &BTreeSet<String> {
        &self.0
    }

    /// Combined data keeps only shared endorsements.
    pub fn join(&self, other: &Integrity) -> Integrity {
        Integrity(self.0.intersection(&other.0).cloned().collect())
    }

    /// Greatest lower bound: all endorsements of either.
    pub fn meet(&self, other: &Integrity) -> Integrity {
        Integrity(self.0.union(&other.0).cloned().collect())
    }

    /// Data may flow to a place that expects fewer endorsements.
    pub fn flows_to(&self, other: &Integrity) -> bool {
        other.0.is_subset(&self.0)
    }
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("untrusted");
        }
        let v: Vec<&str> = self.0.iter().map(String::as_str).collect();
        f.write_str(&v.join(" & "))
    }
}

/// A free tag, `key:value` or a bare word (`purpose:hr`, `licence:cc-by-nc`).
///
/// Invariant: non-empty, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    /// Validates a tag.
    pub fn new(tag: impl Into<String>) -> Result<Tag, crate::LabelError> {
        let tag = tag.into();
        validate_name(&tag, "tag")?;
        Ok(Tag(tag))
    }

    /// The whole tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of a `key:value` tag, or the whole tag.
    pub fn key(&self) -> &str {
        self.0.split_once(':').map_or(&self.0, |(k, _)| k)
    }

    /// The value of a `key:value` tag.
    pub fn value(&self) -> Option<&str> {
        self.0.split_once(':').map(|(_, v)| v)
    }
}

impl TryFrom<String> for Tag {
    type Error = crate::LabelError;
    fn try_from(s: String) -> Result<Tag, crate::LabelError> {
        Tag::new(s)
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An information-flow label: the product of [`Readers`], [`Integrity`] and tags.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    /// Who may read.
    pub readers: Readers,
    /// Who vouches for the data.
    pub integrity: Integrity,
    /// Free tags.
    #[serde(default)]
    pub tags: BTreeSet<Tag>,
}

impl Label {
    /// Public, endorsed by `trusted`, untagged: what the organisation's own
    /// published material carries.
    pub fn public_trusted() -> Label {
        Label {
            readers: Readers::public(),
            integrity: Integrity::trusted(),
            tags: BTreeSet::new(),
        }
    }

    /// Least upper bound, component-wise.
    pub fn join(&self, other: &Label) -> Label {
        Label {
            readers: self.readers.join(&other.readers),
            integrity: self.integrity.join(&other.integrity),
            tags: self.tags.union(&other.tags).cloned().collect(),
        }
    }

    /// Greatest lower bound, component-wise.
    pub fn meet(&self, other: &Label) -> Label {
        Label {
            readers: self.readers.meet(&other.readers),
            integrity: self.integrity.meet(&other.integrity),
            tags: self.tags.intersection(&other.tags).cloned().collect(),
        }
    }

    /// `self` may be relabelled `other` without declassification.
    pub fn flows_to(&self, other: &Label) -> bool {
        self.readers.flows_to(&other.readers)
            && self.integrity.flows_to(&other.integrity)
            && self.tags.is_subset(&other.tags)
    }

    /// Join of many labels; `None` for an empty iterator.
    pub fn join_all<'a>(labels: impl IntoIterator<Item = &'a Label>) -> Option<Label> {
        let mut it = labels.into_iter();
        let first = it.next()?.clone();
        Some(it.fold(first, |acc, l| acc.join(l)))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{readers: {}; integrity: {}",
            self.readers, self.integrity
        )?;
        if !self.tags.is_empty() {
            let v: Vec<&str> = self.tags.iter().map(Tag::as_str).collect();
            write!(f, "; tags: {}", v.join(", "))?;
        }
        f.write_str("}")
    }
}

fn validate_name(name: &str, what: &str) -> Result<(), crate::LabelError> {
    if name.is_empty() {
        return Err(crate::LabelError::Invalid(format!("empty {what} name")));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(crate::LabelError::Invalid(format!(
            "{what} name {name:?} contains whitespace or control characters"
        )));
    }
    if name.len() > 256 {
        return Err(crate::LabelError::Invalid(format!(
            "{what} name is {} bytes long; the limit is 256",
            name.len()
        )));
    }
    Ok(())
}
