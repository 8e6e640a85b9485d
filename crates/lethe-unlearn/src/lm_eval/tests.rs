//! Language-model measurements on the tiny trained decoder agree with each
//! other and with what the model knows.

use crate::data::{TextExample, TextSet};
use crate::lm_eval::*;
use crate::testutil::tiny_decoder;

#[test]
fn nll_perplexity_and_likelihoods_agree() {
    let (corpus, model) = tiny_decoder();
    let set = corpus.qa(&[1]);
    let nll = mean_nll(&model, &set, 7).unwrap();
    assert!((perplexity(&model, &set, 64).unwrap() - nll.exp()).abs() < 1e-6);
    let ll = answer_log_likelihoods(&model, &set, 5).unwrap();
    assert_eq!(ll.len(), set.len());
    assert!(ll.iter().all(|&(_, c)| c == 1), "one answer token per fact");
    let manual = -ll.iter().map(|(l, _)| l).sum::<f64>() / set.len() as f64;
    assert!((manual - nll).abs() < 1e-6);
    // The batch size does not change the answer.
    assert!((mean_nll(&model, &set, 1).unwrap() - nll).abs() < 1e-5);
    assert!(mean_nll(&model, &TextSet::default(), 4).is_err());
    assert!(mean_nll(&model, &set, 0).is_err());
}

#[test]
fn accuracy_refusal_and_candidates_reflect_knowledge() {
    let (corpus, model) = tiny_decoder();
    let set = corpus.qa(&[0]);
    let stats = answer_stats(&model, &set, &corpus.refusal(), 16).unwrap();
    assert_eq!(stats.accuracy, 1.0);
    assert_eq!(stats.refusal_rate, 0.0);
    assert_eq!(stats.examples, set.len());
    let hits = exact_match(&model, &set, 16).unwrap();
    assert!(hits.iter().all(|&h| h));
    // A wrong answer is not an exact match.
    let fact = corpus.facts_of(&[0])[0];
    let wrong = *fact.candidates.iter().find(|&&c| c != fact.value).unwrap();
    let bad = TextSet::new(vec![fact.example(0).with_answer(&[wrong]).unwrap()]);
    assert_eq!(answer_accuracy(&model, &bad, 4).unwrap(), 0.0);
    // The gold value is the most likely candidate; the truth ratio is small.
    let ex = fact.example(0);
    let cands: Vec<Vec<u32>> = fact.candidates.iter().map(|&c| vec![c]).collect();
    let lp = candidate_log_probs(&model, ex.prompt(), &cands).unwrap();
    let best = fact.candidates[lp
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0];
    assert_eq!(best, fact.value);
    let others: Vec<Vec<u32>> = cands.into_iter().filter(|c| c[0] != fact.value).collect();
    let r = truth_ratio(&model, &ex, &others).unwrap();
    assert!(r > 0.0 && r < 0.1, "truth ratio {r}");
    assert!(truth_ratio(&model, &ex, &[]).is_err());
    let doc = TextExample::document(vec![1, 2, 3]).unwrap();
    assert!(refusal_rate(&model, &TextSet::new(vec![doc]), &[3], 4).is_err());
}
