//! Bounded top-k selection with the crate's total order on hits.
//!
//! Order: higher score first; equal scores are ordered by ascending key. Scores
//! are always finite (inputs are validated), and `f32::total_cmp` makes the
//! order total anyway, so results never depend on scan order.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::Hit;

/// Wrapper whose `Ord` puts the *worst* hit on top of a max-heap.
#[derive(Clone, Copy, Debug)]
struct Worst(Hit);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        // Worse hits compare greater, so the heap's top is the worst kept hit.
        rank(&self.0, &other.0)
    }
}

/// `Less` when `a` ranks before (is better than) `b`.
pub(crate) fn rank(a: &Hit, b: &Hit) -> Ordering {
    b.score.total_cmp(&a.score).then(a.key.cmp(&b.key))
}

/// Keeps the best `k` hits pushed into it.
#[derive(Debug)]
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
    /// Score of the current worst kept hit, once `k` hits are kept.
    floor: f32,
}

impl TopK {
    /// An empty selector for `k` hits.
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
            floor: f32::NEG_INFINITY,
        }
    }

    /// Offers one hit.
    #[inline]
    pub(crate) fn push(&mut self, score: f32, key: u64) {
        if self.k == 0 || score < self.floor {
            return;
        }
        let hit = Hit { key, score };
        if self.heap.len() < self.k {
            self.heap.push(Worst(hit));
        } else if let Some(mut top) = self.heap.peek_mut() {
            if rank(&hit, &top.0) == Ordering::Less {
                *top = Worst(hit);
            } else {
                return;
            }
        }
        if self.heap.len() == self.k {
            if let Some(w) = self.heap.peek() {
                self.floor = w.0.score;
            }
        }
    }

    /// The kept hits, best first.
    pub(crate) fn into_sorted(self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(rank);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_k_with_key_tiebreak() {
        let mut t = TopK::new(3);
        for (s, k) in [(0.5, 9), (0.9, 4), (0.5, 2), (0.1, 1), (0.5, 7), (0.9, 3)] {
            t.push(s, k);
        }
        let got: Vec<(f32, u64)> = t.into_sorted().iter().map(|h| (h.score, h.key)).collect();
        assert_eq!(got, vec![(0.9, 3), (0.9, 4), (0.5, 2)]);
    }

    #[test]
    fn zero_k_keeps_nothing() {
        let mut t = TopK::new(0);
        t.push(1.0, 1);
        assert!(t.into_sorted().is_empty());
    }
}
