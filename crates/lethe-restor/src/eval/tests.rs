//! Greedy decoding and answer classification against a scripted scorer.

use candle_core::{Device, Tensor};
use lethe_unlearn::data::TextBatch;
use lethe_unlearn::lm_eval::Scorer;

use crate::eval::{classify, greedy_answers, Outcome};

/// Predicts `next = (token + 1) % vocab` at every position, and records the
/// queries it was given.
struct Counter {
    vocab: usize,
    device: Device,
    queries: std::cell::RefCell<Vec<Vec<u32>>>,
}

impl Scorer for Counter {
    fn device(&self) -> &Device {
        &self.device
    }

    fn logits(&self, batch: &TextBatch, queries: &[&[u32]]) -> lethe_unlearn::Result<Tensor> {
        self.queries
            .borrow_mut()
            .extend(queries.iter().map(|q| q.to_vec()));
        let ids = batch.ids.to_vec2::<u32>()?;
        let (b, t) = (ids.len(), ids[0].len());
        let mut data = vec![0f32; b * t * self.vocab];
        for (r, row) in ids.iter().enumerate() {
            for (p, &tok) in row.iter().enumerate() {
                let next = (tok as usize + 1) % self.vocab;
                data[(r * t + p) * self.vocab + next] = 5.0;
            }
        }
        Ok(Tensor::from_vec(data, (b, t, self.vocab), &self.device)?)
    }
}

#[test]
fn greedy_stops_at_the_stop_token_and_keeps_the_query_fixed() {
    let s = Counter {
        vocab: 10,
        device: Device::Cpu,
        queries: Default::default(),
    };
    // From 5: 6 7 8 then 9 = stop. From 1 2: 3 4 5 (max 3 tokens).
    let prompts = vec![vec![4, 5], vec![1, 2], vec![7, 8]];
    let out = greedy_answers(&s, &prompts, 3, 9, 2).unwrap();
    assert_eq!(out, vec![vec![6, 7, 8], vec![3, 4, 5], vec![]]);
    // Every call saw the original prompts as queries, never the answers.
    assert!(s.queries.borrow().iter().all(|q| prompts.contains(q)));
}

#[test]
fn answers_are_classified_against_every_gold_and_the_corrupted_value() {
    let golds = vec![vec![5], vec![6, 7]];
    assert_eq!(classify(&[6, 7], &golds, Some(&[8])), Outcome::Gold);
    assert_eq!(classify(&[5], &golds, Some(&[8])), Outcome::Gold);
    assert_eq!(classify(&[8], &golds, Some(&[8])), Outcome::Corrupted);
    assert_eq!(
        classify(&[6], &golds, Some(&[8])),
        Outcome::Other,
        "a prefix is not an answer"
    );
    assert_eq!(classify(&[], &golds, None), Outcome::Other);
}
