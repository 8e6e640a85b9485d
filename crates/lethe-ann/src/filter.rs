//! Which partitions a search may return vectors from.
//!
//! The index knows nothing about labels or policies: the caller turns what a
//! reader may see into a set of partition ids, and the index returns the exact
//! top-k among vectors stored under those ids only.

/// The set of partitions a search may read.
///
/// Invariant: the explicit list is sorted and free of duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    All,
    Only(Vec<u32>),
}

impl Filter {
    /// Every partition, present and future.
    pub fn all() -> Self {
        Self { kind: Kind::All }
    }

    /// Exactly the listed partitions (order and duplicates do not matter;
    /// ids the index has never seen match nothing).
    pub fn partitions(ids: &[u32]) -> Self {
        let mut v = ids.to_vec();
        v.sort_unstable();
        v.dedup();
        Self {
            kind: Kind::Only(v),
        }
    }

    /// No partition at all: every search returns nothing.
    pub fn none() -> Self {
        Self {
            kind: Kind::Only(Vec::new()),
        }
    }

    /// Whether the filter lets vectors of `partition` through.
    pub fn allows(&self, partition: u32) -> bool {
        match &self.kind {
            Kind::All => true,
            Kind::Only(v) => v.binary_search(&partition).is_ok(),
        }
    }

    /// Whether the filter is [`Filter::all`].
    pub fn is_all(&self) -> bool {
        matches!(self.kind, Kind::All)
    }

    /// The explicit, sorted partition list; `None` for [`Filter::all`].
    pub fn ids(&self) -> Option<&[u32]> {
        match &self.kind {
            Kind::All => None,
            Kind::Only(v) => Some(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_normalised() {
        let f = Filter::partitions(&[5, 1, 5, 3]);
        assert_eq!(f.ids(), Some(&[1u32, 3, 5][..]));
        assert!(f.allows(3) && !f.allows(2));
        assert!(Filter::all().allows(12345) && Filter::all().is_all());
        assert!(!Filter::none().allows(0));
    }
}
