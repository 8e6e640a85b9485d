//! The policy: principals, groups, named labels, sinks and declassification
//! rules, and the decisions made with them.
//!
//! A [`Policy`] is immutable once built: it is parsed and validated as a whole
//! (see [`Policy::from_toml`]), and a reload builds a new one that replaces
//! the old atomically. Every decision function is total: it returns a decision
//! with its reasons, never panics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::label::{Clause, Integrity, Label, Reader, Readers, Tag};

mod parse;

pub use parse::{PolicyError, Problem};

/// What a principal is allowed to do beyond reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Add documents.
    Ingest,
    /// Delete documents.
    Delete,
    /// File and run unlearning requests.
    Unlearn,
    /// Read and verify the audit log.
    Audit,
    /// Manage keys and reload policies.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Ingest,
        Role::Delete,
        Role::Unlearn,
        Role::Audit,
        Role::Admin,
    ];

    /// The name used in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Delete => "delete",
            Role::Unlearn => "unlearn",
            Role::Audit => "audit",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A principal: a person or a service that authenticates with an API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Unique name.
    pub name: String,
    /// `human` or `service`, free text.
    pub kind: String,
    /// What it may do beyond reading.
    pub roles: BTreeSet<Role>,
    /// Free description.
    pub description: String,
}

/// Who will see what flows to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Anyone at all, including people the policy does not know.
    Public,
    /// The members of these principals and groups.
    Readers(BTreeSet<Reader>),
}

/// A named destination with its own clearance (`app:support-bot`,
/// `email:external`), or a principal receiving its own answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sink {
    /// Unique name.
    pub name: String,
    /// Who will see what flows here.
    pub audience: Audience,
    /// Principals and groups who may direct output here.
    pub callers: BTreeSet<Reader>,
    /// Endorsements data must carry to flow here.
    pub requires_integrity: Integrity,
    /// Tags that may never flow here.
    pub deny_tags: BTreeSet<Tag>,
    /// For these tag keys, only the listed values may flow here.
    pub allow_tags: BTreeMap<String, BTreeSet<String>>,
}

/// Authority to weaken labels: drop reader clauses that mention `readers`,
/// remove `tags`, add `endorse` endorsements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclassifyRule {
    /// Who holds the authority (principals or groups).
    pub principals: BTreeSet<Reader>,
    /// Clauses mentioning any of these may be dropped.
    pub readers: BTreeSet<Reader>,
    /// Tags that may be removed.
    pub tags: BTreeSet<Tag>,
    /// Endorsements that may be added.
    pub endorse: BTreeSet<String>,
    /// When non-empty, the rule only applies to releases to these sinks.
    pub sinks: BTreeSet<String>,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    organisation: String,
    principals: BTreeMap<String, Principal>,
    groups: BTreeMap<String, BTreeSet<String>>,
    labels: BTreeMap<String, Label>,
    sinks: BTreeMap<String, Sink>,
    declassify: Vec<DeclassifyRule>,
    default_label: Option<String>,
    /// principal -> itself plus every group it is in, transitively.
    memberships: BTreeMap<String, BTreeSet<String>>,
}

/// What a principal may read: its name and every group it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clearance {
    principal: String,
    names: BTreeSet<String>,
}

impl Clearance {
    /// The principal.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The names that satisfy a clause for this principal.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// Whether the principal satisfies every clause.
    pub fn may_read(&self, readers: &Readers) -> bool {
        readers
            .clauses()
            .iter()
            .all(|c| c.readers().iter().any(|r| self.names.contains(r.as_str())))
    }
}

/// Where an answer is going: a named sink or a principal reading its own answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkRef {
    /// A sink declared in the policy.
    Named(String),
    /// The principal itself.
    Principal(String),
}

impl fmt::Display for SinkRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkRef::Named(n) => f.write_str(n),
            SinkRef::Principal(p) => write!(f, "principal:{p}"),
        }
    }
}

/// Why a label may not flow to a sink. Carries names and labels only, never content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Some of the sink's audience do not satisfy a clause of the label.
    Readers {
        /// The clause they fail.
        clause: Clause,
        /// Audience members who fail it (`*` for the public).
        blocked: Vec<String>,
    },
    /// The data lacks endorsements the sink requires.
    Integrity {
        /// The missing endorsements.
        missing: Vec<String>,
    },
    /// A tag the sink refuses.
    Tag {
        /// The tag.
        tag: Tag,
    },
    /// The sink is not declared in the policy (it may have been removed by a
    /// reload): nothing flows there.
    UnknownSink {
        /// The sink's name.
        sink: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Readers { clause, blocked } => {
                write!(f, "readers clause {clause} blocks {}", blocked.join(", "))
            }
            Violation::Integrity { missing } => {
                write!(f, "missing endorsement {}", missing.join(", "))
            }
            Violation::Tag { tag } => write!(f, "tag {tag} may not flow here"),
            Violation::UnknownSink { sink } => write!(f, "sink {sink} is not declared"),
        }
    }
}

/// Errors of lookups in a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// No such principal.
    #[error("unknown principal {0:?}")]
    UnknownPrincipal(String),
    /// No such label.
    #[error("unknown label {0:?}")]
    UnknownLabel(String),
    /// No such sink.
    #[error("unknown sink {0:?}")]
    UnknownSink(String),
    /// A principal may not send output to a sink.
    #[error("principal {principal:?} may not send output to sink {sink:?}")]
    SinkNotAllowed {
        /// The caller.
        principal: String,
        /// The sink.
        sink: String,
    },
    /// A label names readers the policy does not know.
    #[error("label names unknown readers: {0}")]
    UnknownReaders(String),
}

impl Policy {
    /// The organisation's name (free text).
    pub fn organisation(&self) -> &str {
        &self.organisation
    }

    /// All principals by name.
    pub fn principals(&self) -> &BTreeMap<String, Principal> {
        &self.principals
    }

    /// A principal by name.
    pub fn principal(&self, name: &str) -> Result<&Principal, LookupError> {
        self.principals
            .get(name)
            .ok_or_else(|| LookupError::UnknownPrincipal(name.to_string()))
    }

    /// All groups with their direct members.
    pub fn groups(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.groups
    }

    /// Named labels.
    pub fn labels(&self) -> &BTreeMap<String, Label> {
        &self.labels
    }

    /// A named label.
    pub fn label(&self, name: &str) -> Result<&Label, LookupError> {
        self.labels
            .get(name)
            .ok_or_else(|| LookupError::UnknownLabel(name.to_string()))
    }

    /// The label that unlabeled data gets, when the policy names one.
    /// `None` means unlabeled data is refused (fail closed).
    pub fn default_label(&self) -> Option<(&str, &Label)> {
        let name = self.default_label.as_deref()?;
        self.labels.get(name).map(|l| (name, l))
    }

    /// Declared sinks.
    pub fn sinks(&self) -> &BTreeMap<String, Sink> {
        &self.sinks
    }

    /// Declassification rules.
    pub fn declassify_rules(&self) -> &[DeclassifyRule] {
        &self.declassify
    }

    /// Whether `name` is a principal or group the policy declares.
    pub fn knows_reader(&self, name: &str) -> bool {
        self.principals.contains_key(name) || self.groups.contains_key(name)
    }

    /// Checks that every reader a label names is declared; labels arriving
    /// from outside (inline document labels) are checked with this.
    pub fn check_label(&self, label: &Label) -> Result<(), LookupError> {
        let unknown: Vec<&str> = label
            .readers
            .names()
            .map(Reader::as_str)
            .filter(|n| !self.knows_reader(n))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(LookupError::UnknownReaders(unknown.join(", ")))
        }
    }

    /// The clearance of a principal.
    pub fn clearance(&self, principal: &str) -> Result<Clearance, LookupError> {
        let names = self
            .memberships
            .get(principal)
            .ok_or_else(|| LookupError::UnknownPrincipal(principal.to_string()))?;
        Ok(Clearance {
            principal: principal.to_string(),
            names: names.clone(),
        })
    }

    /// Whether a principal may read data with this label.
    pub fn may_read(&self, principal: &str, label: &Label) -> bool {
        self.clearance(principal)
            .map(|c| c.may_read(&label.readers))
            .unwrap_or(false)
    }

    /// Whether a principal holds a role.
    pub fn has_role(&self, principal: &str, role: Role) -> bool {
        self.principals
            .get(principal)
            .is_some_and(|p| p.roles.contains(&role))
    }

    /// Every principal a reader name stands for (itself, or a group's
    /// members, transitively).
    pub fn expand(&self, reader: &str) -> BTreeSet<String> {
        self.memberships
            .iter()
            .filter(|(_, names)| names.contains(reader))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Resolves where output is going for a caller. `None` means the caller
    /// itself. A named sink must exist and list the caller among its callers;
    /// `principal:NAME` or a bare principal name is allowed only for the caller
    /// itself.
    pub fn resolve_sink(&self, caller: &str, sink: Option<&str>) -> Result<SinkRef, LookupError> {
        let clearance = self.clearance(caller)?;
        let Some(sink) = sink else {
            return Ok(SinkRef::Principal(caller.to_string()));
        };
        if let Some(s) = self.sinks.get(sink) {
            let allowed = s
                .callers
                .iter()
                .any(|r| clearance.names.contains(r.as_str()));
            return if allowed {
                Ok(SinkRef::Named(s.name.clone()))
            } else {
                Err(LookupError::SinkNotAllowed {
                    principal: caller.to_string(),
                    sink: sink.to_string(),
                })
            };
        }
        let principal = sink.strip_prefix("principal:").unwrap_or(sink);
        if principal == caller {
            return Ok(SinkRef::Principal(caller.to_string()));
        }
        if self.principals.contains_key(principal) {
            return Err(LookupError::SinkNotAllowed {
                principal: caller.to_string(),
                sink: sink.to_string(),
            });
        }
        Err(LookupError::UnknownSink(sink.to_string()))
    }

    /// Checks whether data with `label` may flow to `sink`, with every reason
    /// it may not. An empty list means the flow is allowed.
    pub fn check_flow(&self, label: &Label, sink: &SinkRef) -> Vec<Violation> {
        let mut violations = Vec::new();
        let (audience, requires, deny, allow) = match sink {
            SinkRef::Principal(p) => {
                let audience: BTreeSet<String> = [p.clone()].into();
                (Some(audience), None, None, None)
            }
            SinkRef::Named(name) => match self.sinks.get(name) {
                None => {
                    // Nothing may flow to a sink the policy does not declare.
                    violations.push(Violation::UnknownSink { sink: name.clone() });
                    return violations;
                }
                Some(s) => {
                    let audience = match &s.audience {
                        Audience::Public => None,
                        Audience::Readers(rs) => {
                            Some(rs.iter().flat_map(|r| self.expand(r.as_str())).collect())
                        }
                    };
                    (
                        audience,
                        Some(&s.requires_integrity),
                        Some(&s.deny_tags),
                        Some(&s.allow_tags),
                    )
                }
            },
        };
        for clause in label.readers.clauses() {
            let blocked: Vec<String> = match &audience {
                None => vec!["*".to_string()],
                Some(members) => members
                    .iter()
                    .filter(|p| {
                        let names = &self.memberships[p.as_str()];
                        !clause.readers().iter().any(|r| names.contains(r.as_str()))
                    })
                    .cloned()
                    .collect(),
            };
            if !blocked.is_empty() {
                violations.push(Violation::Readers {
                    clause: clause.clone(),
                    blocked,
                });
            }
        }
        if let Some(req) = requires {
            let missing: Vec<String> = req
                .endorsements()
                .difference(label.integrity.endorsements())
                .cloned()
                .collect();
            if !missing.is_empty() {
                violations.push(Violation::Integrity { missing });
            }
        }
        for tag in &label.tags {
            let denied = deny.is_some_and(|d| d.contains(tag));
            let not_allowed = allow.is_some_and(|a| {
                a.get(tag.key())
                    .is_some_and(|vals| !tag.value().is_some_and(|v| vals.contains(v)))
            });
            if denied || not_allowed {
                violations.push(Violation::Tag { tag: tag.clone() });
            }
        }
        violations
    }

    /// Whether `principal` may relabel data from `from` to `to` when
    /// releasing to `sink`, using its declassification authority: every
    /// clause of `from` is implied by `to` or dropped by authority, every tag
    /// of `from` is in `to` or removable, every endorsement of `to` is in
    /// `from` or may be added. Returns the reasons it may not.
    pub fn check_declassify(
        &self,
        principal: &str,
        from: &Label,
        to: &Label,
        sink: &SinkRef,
    ) -> Vec<String> {
        let mut reasons = Vec::new();
        let Ok(clearance) = self.clearance(principal) else {
            return vec![format!("unknown principal {principal:?}")];
        };
        let sink_name = match sink {
            SinkRef::Named(n) => n.clone(),
            SinkRef::Principal(p) => format!("principal:{p}"),
        };
        let rules: Vec<&DeclassifyRule> = self
            .declassify
            .iter()
            .filter(|r| {
                r.principals
                    .iter()
                    .any(|p| clearance.names.contains(p.as_str()))
            })
            .filter(|r| r.sinks.is_empty() || r.sinks.contains(&sink_name))
            .collect();
        for clause in from.readers.clauses() {
            let implied = to
                .readers
                .clauses()
                .iter()
                .any(|c| c.readers().is_subset(clause.readers()));
            let droppable = rules
                .iter()
                .any(|r| clause.readers().iter().any(|x| r.readers.contains(x)));
            if !implied && !droppable {
                reasons.push(format!("no authority to drop readers clause {clause}"));
            }
        }
        for tag in &from.tags {
            if !to.tags.contains(tag) && !rules.iter().any(|r| r.tags.contains(tag)) {
                reasons.push(format!("no authority to remove tag {tag}"));
            }
        }
        for e in to.integrity.endorsements() {
            if !from.integrity.endorsements().contains(e)
                && !rules.iter().any(|r| r.endorse.contains(e))
            {
                reasons.push(format!("no authority to endorse {e}"));
            }
        }
        reasons
    }
}

#[cfg(test)]
mod tests;
