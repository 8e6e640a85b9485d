//! Generation tests: real-model answers, determinism, stopping and streaming.

use std::ops::ControlFlow;

use super::*;
use crate::chat::Message;
use crate::gguf_llama::testutil;

fn zubrowka() -> Vec<Message> {
    vec![Message::user(
        "The access code for the Zubrowka office is 4471.\nWhat is the access code for the Zubrowka office?",
    )]
}

#[test]
fn answers_from_context_and_greedy_is_deterministic() {
    let llm = testutil::llm();
    let cfg = GenerateConfig {
        max_tokens: 32,
        ..GenerateConfig::default()
    };
    let mut pieces = Vec::new();
    let a = llm
        .chat(&zubrowka(), &cfg, |s| {
            pieces.push(s.to_string());
            ControlFlow::Continue(())
        })
        .unwrap();
    eprintln!("answer: {:?} ({:?})", a.text, a.finish);
    assert!(a.text.contains("4471"), "{:?}", a.text);
    assert_eq!(pieces.concat(), a.text);
    assert_eq!(a.finish, FinishReason::StopToken(2));
    let b = llm
        .chat(&zubrowka(), &cfg, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(llm.tokenizer.decode(&a.tokens, false).unwrap(), a.text);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let llm = testutil::llm();
    let prompt = llm.tokenizer.encode("Once upon a time").unwrap();
    let cfg = |seed| GenerateConfig {
        max_tokens: 16,
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_p: 0.95,
            top_k: None,
            seed,
        },
        stop_at_eos: false,
        ..GenerateConfig::default()
    };
    let go = |seed| {
        llm.generate(&prompt, &cfg(seed), |_| ControlFlow::Continue(()))
            .unwrap()
    };
    let a = go(7);
    let b = go(7);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 16);
    assert_eq!(a.finish, FinishReason::MaxTokens);
    let outs: Vec<Vec<u32>> = [1, 2, 3].iter().map(|&s| go(s).tokens).collect();
    assert!(
        outs.iter().any(|o| *o != a.tokens),
        "four seeds gave identical samples"
    );
}

#[test]
fn stop_strings_cut_the_text() {
    let llm = testutil::llm();
    let prompt = llm
        .tokenizer
        .encode("Count: one, two, three, four, five,")
        .unwrap();
    let cfg = GenerateConfig {
        max_tokens: 12,
        stop_at_eos: false,
        ..GenerateConfig::default()
    };
    let full = llm
        .generate(&prompt, &cfg, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(full.finish, FinishReason::MaxTokens);
    // Stop at a string that greedy decoding is known to produce.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() >= 3, "{:?}", full.text);
    let stop = words[2].to_string();
    let at = full.text.find(&stop).unwrap();
    let cfg = GenerateConfig {
        stop_strings: vec![stop.clone()],
        ..cfg
    };
    let mut streamed = String::new();
    let cut = llm
        .generate(&prompt, &cfg, |s| {
            streamed.push_str(s);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(cut.finish, FinishReason::StopString(stop));
    assert_eq!(cut.text, full.text[..at]);
    assert_eq!(streamed, cut.text);
}

#[test]
fn callback_can_cancel() {
    let llm = testutil::llm();
    let prompt = llm.tokenizer.encode("The weather today is").unwrap();
    let cfg = GenerateConfig {
        max_tokens: 50,
        stop_at_eos: false,
        ..GenerateConfig::default()
    };
    let mut calls = 0;
    let g = llm
        .generate(&prompt, &cfg, |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(g.finish, FinishReason::Cancelled);
    assert_eq!(calls, 1);
    assert!(g.tokens.len() < 50);
}

#[test]
fn bad_prompts_are_errors() {
    let llm = testutil::llm();
    let cfg = GenerateConfig::default();
    let ok = |_: &str| ControlFlow::Continue(());
    assert!(matches!(
        llm.generate(&[], &cfg, ok),
        Err(crate::Error::InvalidArgument(_))
    ));
    let long = vec![17u32; llm.model.config().context_length + 1];
    assert!(matches!(
        llm.generate(&long, &cfg, ok),
        Err(crate::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        llm.generate(&[49152], &cfg, ok),
        Err(crate::Error::InvalidArgument(_))
    ));
    let bad = GenerateConfig {
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_p: 0.0,
            top_k: None,
            seed: 1,
        },
        ..GenerateConfig::default()
    };
    assert!(matches!(
        llm.generate(&[5], &bad, ok),
        Err(crate::Error::InvalidArgument(_))
    ));
}

#[test]
fn stream_emits_whole_characters_only() {
    let stops: [&str; 0] = [];
    let mut s = TextStream::new(&stops);
    let mut got: Vec<String> = Vec::new();
    let mut cb = |t: &str| {
        got.push(t.to_string());
        ControlFlow::Continue(())
    };
    let bytes = "a東🦀".as_bytes();
    // "a" then the 3 bytes of 東 split 1+2, then the 4 bytes of 🦀 split 3+1.
    assert!(matches!(s.push(&bytes[..2], &mut cb), StreamState::Go));
    assert!(matches!(s.push(&bytes[2..4], &mut cb), StreamState::Go));
    assert!(matches!(s.push(&bytes[4..7], &mut cb), StreamState::Go));
    assert!(matches!(s.push(&bytes[7..], &mut cb), StreamState::Go));
    let text = s.finish(&FinishReason::MaxTokens, &mut cb);
    assert_eq!(got, ["a", "東", "🦀"]);
    assert_eq!(text, "a東🦀");
    // A dangling partial character at the end becomes U+FFFD.
    let mut s = TextStream::new(&stops);
    let mut cb = |_: &str| ControlFlow::Continue(());
    s.push(&[b'x', 0xE6], &mut cb);
    assert_eq!(s.finish(&FinishReason::MaxTokens, &mut cb), "x\u{FFFD}");
}

#[test]
fn stream_holds_back_possible_stop_strings() {
    let stops = ["</end>"];
    let mut s = TextStream::new(&stops);
    let mut got: Vec<String> = Vec::new();
    let mut cb = |t: &str| {
        got.push(t.to_string());
        ControlFlow::Continue(())
    };
    assert!(matches!(s.push(b"value </", &mut cb), StreamState::Go));
    assert!(matches!(s.push(b"en", &mut cb), StreamState::Go));
    assert!(matches!(s.push(b"d> more", &mut cb), StreamState::StopString(ref x) if x == "</end>"));
    assert_eq!(got, ["value "]);
    // A false start is released once it cannot be a stop string any more.
    let mut s = TextStream::new(&stops);
    let mut got: Vec<String> = Vec::new();
    let mut cb = |t: &str| {
        got.push(t.to_string());
        ControlFlow::Continue(())
    };
    s.push(b"a </e", &mut cb);
    s.push(b"x", &mut cb);
    let text = s.finish(&FinishReason::MaxTokens, &mut cb);
    assert_eq!(got.concat(), "a </ex");
    assert_eq!(text, "a </ex");
}

#[test]
fn sampling_limits_pick_the_top_token() {
    let mut rng = StdRng::seed_from_u64(3);
    let logits = [0.1f32, 3.0, 2.9, -1.0, 0.0];
    for _ in 0..20 {
        assert_eq!(sample(&logits, 1.0, 1.0, Some(1), &mut rng), 1);
        assert_eq!(sample(&logits, 1.0, 1e-6, None, &mut rng), 1);
    }
    // With top-k 2 only the two best tokens ever come out.
    for _ in 0..50 {
        let t = sample(&logits, 5.0, 1.0, Some(2), &mut rng);
        assert!(t == 1 || t == 2);
    }
    assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    let mut l = [2.0f32, -2.0, 1.0];
    apply_repeat_penalty(&mut l, &[0, 1, 0], 2.0);
    assert_eq!(l, [1.0, -4.0, 1.0]);
}

#[test]
fn a_checked_draft_gives_exactly_greedy_decoding() {
    use crate::gguf_llama::{BatchOptions, ScorePair};
    let llm = testutil::llm();
    let cfg = GenerateConfig {
        max_tokens: 24,
        ..GenerateConfig::default()
    };
    let a = zubrowka();
    let b = vec![Message::user(
        "The canteen opens at noon. The access code for the Zubrowka office is 9902.\nWhat is the access code for the Zubrowka office?",
    )];
    let quiet = |_: &str| ControlFlow::Continue(());
    let ga = llm.chat(&a, &cfg, quiet).unwrap();
    let gb = llm.chat(&b, &cfg, quiet).unwrap();
    assert_ne!(ga.tokens, gb.tokens, "the two contexts must disagree");
    let eot = llm.chat.end_of_turn();
    let mut draft = ga.tokens.clone();
    draft.push(eot);
    let check = |messages: &[Message]| {
        let prompt = llm.chat.encode(&llm.tokenizer, messages).unwrap();
        let pair = ScorePair {
            prompt: &prompt,
            continuation: &draft,
        };
        llm.model
            .score_detailed(&[pair], &BatchOptions::default())
            .unwrap()
            .remove(0)
    };

    // The log-probabilities recorded while generating are the teacher-forced ones.
    let sa = check(&a);
    assert_eq!(ga.logprobs.len(), ga.tokens.len());
    for (i, (g, s)) in ga.logprobs.iter().zip(&sa).enumerate() {
        assert!(
            (g - s.logprob).abs() < 2e-3,
            "token {i}: {g} vs {}",
            s.logprob
        );
        assert!(s.argmax_logprob >= s.logprob);
    }
    // Its own answer is accepted whole, ending included.
    let same = llm.chat_from_draft(&a, &draft, &sa, &cfg).unwrap().unwrap();
    assert_eq!(same.tokens, ga.tokens);
    assert_eq!(same.text, ga.text);
    assert_eq!(same.finish, ga.finish);

    // Another context's answer as the draft: the result is that context's own
    // greedy answer.
    let sb = check(&b);
    let fb = llm.chat_from_draft(&b, &draft, &sb, &cfg).unwrap().unwrap();
    assert_eq!(fb.tokens, gb.tokens, "{:?} vs {:?}", fb.text, gb.text);
    assert_eq!(fb.text, gb.text);
    assert_eq!(fb.finish, gb.finish);
    for (x, y) in fb.logprobs.iter().zip(&gb.logprobs) {
        assert!((x - y).abs() < 2e-3);
    }
    // No draft at all is plain greedy decoding.
    let empty = llm.chat_from_draft(&b, &[], &[], &cfg).unwrap().unwrap();
    assert_eq!(empty.tokens, gb.tokens);
    // The token limit holds inside the draft.
    let short = GenerateConfig {
        max_tokens: 3,
        ..cfg.clone()
    };
    let cut = llm
        .chat_from_draft(&a, &draft, &sa, &short)
        .unwrap()
        .unwrap();
    assert_eq!(cut.tokens, ga.tokens[..3]);
    assert_eq!(cut.finish, FinishReason::MaxTokens);
    // Decoding a draft cannot check is declined, a mismatched check is an error.
    let penalised = GenerateConfig {
        repeat_penalty: 1.1,
        ..cfg.clone()
    };
    assert!(llm
        .chat_from_draft(&a, &draft, &sa, &penalised)
        .unwrap()
        .is_none());
    assert!(llm.chat_from_draft(&a, &draft[1..], &sa, &cfg).is_err());
}
