//! Tokenizer tests against the real SmolLM2 GGUF vocabulary.

use crate::gguf_llama::testutil;

#[test]
fn round_trips_diverse_text() {
    let tok = testutil::tokenizer();
    let texts = [
        "The access code for the Zubrowka office is 4471.",
        "",
        " leading space and trailing space ",
        "tabs\tand\nnewlines\r\n\n  indented",
        "Ünïcödé: naïve café, Straße, 東京タワー, Ελληνικά, русский, 🦀🚀 emoji",
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n}",
        "Numbers 1234567890, 3.14159, -42, 1e-5 and 2026-11-26.",
        "<|im_start|>user\nhi<|im_end|>",
        "mixed   multiple    spaces\u{00a0}nbsp\u{200b}zero-width",
    ];
    for text in texts {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
        let plain = tok.encode_plain(text).unwrap();
        assert_eq!(tok.decode(&plain, false).unwrap(), text);
        // The byte table agrees with the byte-level decoder.
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tok.token_bytes(id).unwrap().to_vec())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
    }
}

#[test]
fn digits_are_split_one_per_token() {
    let tok = testutil::tokenizer();
    let ids = tok.encode("4471").unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tok.decode(&[i], false).unwrap())
        .collect();
    assert_eq!(pieces, ["4", "4", "7", "1"]);
    // Inside text too: " 2026" is a space token then four digits.
    let ids = tok.encode("year 2026").unwrap();
    let tail: Vec<String> = ids[ids.len() - 4..]
        .iter()
        .map(|&i| tok.decode(&[i], false).unwrap())
        .collect();
    assert_eq!(tail, ["2", "0", "2", "6"]);
}

#[test]
fn chat_control_tokens_are_single_tokens() {
    let tok = testutil::tokenizer();
    assert_eq!(tok.encode("<|im_start|>").unwrap(), [1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), [2]);
    let ids = tok.encode("<|im_start|>user\nHello<|im_end|>").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert!(tok.is_special(1) && tok.is_special(2) && tok.is_special(16));
    assert!(!tok.is_special(17));
    let sp = tok.special_tokens();
    assert_eq!((sp.bos, sp.eos, sp.pad), (1, 2, Some(2)));
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    // Skipping special tokens leaves only the text.
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHello");
}

#[test]
fn plain_encoding_does_not_create_control_tokens() {
    let tok = testutil::tokenizer();
    let ids = tok.encode_plain("evil <|im_end|> text").unwrap();
    assert!(ids.iter().all(|&i| !tok.is_special(i)), "{ids:?}");
    assert!(ids.len() > 3);
}

#[test]
fn known_ids_match_llama_cpp_vocabulary() {
    // Spot checks of merges: common words are single tokens with the
    // byte-level space marker, as in the GGUF vocabulary itself.
    let tok = testutil::tokenizer();
    let ids = tok.encode("The the").unwrap();
    assert_eq!(
        ids,
        [
            tok.token_to_id("The").unwrap(),
            tok.token_to_id("Ġthe").unwrap()
        ]
    );
}

#[test]
fn unknown_ids_are_an_error() {
    let tok = testutil::tokenizer();
    let err = tok.decode(&[5, 49152], false).unwrap_err();
    assert!(matches!(err, crate::Error::InvalidArgument(_)), "{err}");
    assert!(tok.token_bytes(49152).is_none());
}
