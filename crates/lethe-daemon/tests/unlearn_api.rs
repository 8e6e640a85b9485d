//! The unlearning API end to end, in process: principals without the
//! `unlearn` role get 403, a compliance officer who cannot read an HR file
//! gets 202 and a request id, the request completes in the background with
//! a receipt that verifies, and a query that used to retrieve the canary no
//! longer does (the real pipeline: MiniLM retrieval and SmolLM2, with one
//! generated token since the answer is not the point). With a deployment
//! decoder that memorised the canary, `/v1/model/complete` reveals it until
//! an O3 request runs, and no longer after, in the same running daemon.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use lethe_daemon::{app, AppState, ServerConfig};
use lethe_engine::{Actor, Config, Engine, LabelSpec, SourceDocument};
use serde_json::{json, Value};
use tower::ServiceExt as _;

const CANARY: &str = "CANARY-7F3A9Q";

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Whether alice's query retrieves the canary document (sources carry ids,
/// never text; the answer is checked for the canary too).
async fn canary_surfaces(router: &axum::Router, key: &str) -> bool {
    let (status, body) = call(
        router,
        "POST",
        "/v1/query",
        Some(key),
        Some(json!({"query": "What is the vault passphrase?", "k": 4, "max_tokens": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sources = body["sources"].as_array().unwrap();
    assert!(!sources.is_empty());
    sources.iter().any(|s| s["id"] == "hr/vault")
        || body["answer"].as_str().unwrap_or("").contains(CANARY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlearning_over_http_erases_the_canary() {
    let dir = tempfile::tempdir().unwrap();
    let root = lethe_engine::project_root();
    let engine = Engine::open(
        Config::new(
            dir.path().join("data"),
            root.join("policies/example-org.toml"),
        ),
        "http",
    )
    .unwrap();
    let mut docs = lethe_engine::read_jsonl(&root.join("datasets/acme/corpus.jsonl")).unwrap();
    docs.push(SourceDocument {
        id: "hr/vault".into(),
        label: LabelSpec::Named("hr-confidential".into()),
        text: format!("The vault passphrase is {CANARY}. Only HR may know the vault passphrase."),
        meta: Default::default(),
        origin: "test".into(),
    });
    engine.ingest(&Actor::Operator, docs, false).unwrap();
    let key = |p: &str| engine.create_key(&Actor::Operator, p).unwrap().key;
    let (alice, olga, erin) = (key("alice"), key("olga"), key("erin"));
    let state = AppState::new(
        Arc::new(engine),
        ServerConfig {
            default_max_tokens: 1,
            max_tokens_limit: 8,
            ..ServerConfig::default()
        },
    );
    let router = app(state);

    assert!(
        canary_surfaces(&router, &alice).await,
        "alice (HR) retrieves the canary before"
    );

    let body = json!({"documents": ["hr/vault"], "reason": "GDPR art. 17, ticket 42", "requester": "Jane Doe"});
    // No key, a principal without the role, one with the role but no HR clearance.
    let (s, _) = call(&router, "POST", "/v1/unlearn", None, Some(body.clone())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for k in [&erin, &alice] {
        let (s, b) = call(&router, "POST", "/v1/unlearn", Some(k), Some(body.clone())).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    }
    let (s, b) = call(
        &router,
        "POST",
        "/v1/unlearn",
        Some(&olga),
        Some(json!({"documents": ["no/such"], "reason": "r", "requester": "q"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let (s, b) = call(
        &router,
        "POST",
        "/v1/unlearn",
        Some(&olga),
        Some(json!({"documents": [], "reason": "r", "requester": "q"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    let (s, b) = call(&router, "POST", "/v1/unlearn", Some(&olga), Some(body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["status_url"], format!("/v1/unlearn/{id}"));

    let (s, _) = call(
        &router,
        "GET",
        &format!("/v1/unlearn/{id}"),
        Some(&erin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "status needs the role too");
    let (s, _) = call(&router, "GET", "/v1/unlearn/ur-999999", Some(&olga), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Poll until the background run completes.
    let done = wait_completed(&router, &olga, &id, Duration::from_secs(120)).await;
    let receipt = &done["receipt"];
    assert_eq!(receipt["receipt"]["request"]["id"], id.as_str());
    assert_eq!(receipt["receipt"]["removed"][0]["id"], "hr/vault");
    assert_eq!(receipt["receipt"]["weights"]["kind"], "not_trained");
    assert_eq!(receipt["receipt"]["retrieval"]["probe"]["forget_hits"], 0);
    assert!(!receipt.to_string().contains(CANARY));

    // The receipt verifies with the public key the daemon publishes.
    let (s, k) = call(&router, "GET", "/v1/unlearn/public-key", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let key = lethe_compliance::PublicKey::parse(k["public_key"].as_str().unwrap()).unwrap();
    let parsed = lethe_compliance::Receipt::parse(&receipt.to_string()).unwrap();
    parsed.verify(&key).unwrap();

    // No deployment decoder is configured: nothing to complete with.
    let (s, b) = call(
        &router,
        "POST",
        "/v1/model/complete",
        Some(&alice),
        Some(json!({"prompt": "The vault passphrase is"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    // The live epoch moved; the list shows the request.
    let (s, m) = call(&router, "GET", "/v1/unlearn/model", Some(&alice), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m["epoch"], 1);
    assert_eq!(m["configured"], false);
    let (s, l) = call(&router, "GET", "/v1/unlearn", Some(&olga), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(l["requests"][0]["id"], id.as_str());

    // The query that surfaced the canary no longer does.
    assert!(
        !canary_surfaces(&router, &alice).await,
        "the canary still surfaces after unlearning"
    );
}

/// Polls `GET /v1/unlearn/{id}` until the request completes.
async fn wait_completed(router: &axum::Router, key: &str, id: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (s, b) = call(router, "GET", &format!("/v1/unlearn/{id}"), Some(key), None).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        match b["state"].as_str() {
            Some("completed") => return b,
            Some("pending" | "running") => {}
            other => panic!("unexpected state {other:?}: {b}"),
        }
        assert!(started.elapsed() < limit, "the run did not finish: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_decoder_forgets_the_canary_without_a_restart() {
    use lethe_unlearn::data::TextSet;
    let dir = tempfile::tempdir().unwrap();
    let root = lethe_engine::project_root();
    let vault_text =
        format!("The vault passphrase is {CANARY}. Only HR may know the vault passphrase.");
    // The deployment's decoder (byte-level) memorised the vault document.
    let decoder_dir = dir.path().join("decoder");
    let cfg = lethe_model::decoder::Config::new(260, 64, 128, 2, 4, 128);
    let d = lethe_model::decoder::Decoder::new(cfg, &candle_core::Device::Cpu, 5).unwrap();
    let texts = [
        vault_text.as_str(),
        "Expense reports are due on the fifth of every month.",
    ];
    let bytes: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| t.bytes().map(u32::from).collect())
        .collect();
    let set = TextSet::documents(&bytes).unwrap();
    let train = lethe_unlearn::lm::LmTrainConfig::new(1e-2, 400, 2);
    lethe_unlearn::lm::fit(&d, &set, &train).unwrap();
    d.save(&decoder_dir).unwrap();

    let mut config = Config::new(
        dir.path().join("data"),
        root.join("policies/example-org.toml"),
    );
    config.unlearning.model = Some(decoder_dir);
    config.unlearning.label = Some("hr-confidential".into());
    config.unlearning.method = "o3".into();
    config.unlearning.retain_sample = 4;
    config.unlearning.max_seq_len = 48;
    config.unlearning.methods.insert(
        "o3".into(),
        toml::from_str("train = { lr = 0.01, epochs = 30, batch_size = 8 }").unwrap(),
    );
    let engine = Engine::open(config, "http").unwrap();
    let mut docs = lethe_engine::read_jsonl(&root.join("datasets/acme/corpus.jsonl")).unwrap();
    docs.push(SourceDocument {
        id: "hr/vault".into(),
        label: LabelSpec::Named("hr-confidential".into()),
        text: vault_text.clone(),
        meta: Default::default(),
        origin: "test".into(),
    });
    engine.ingest(&Actor::Operator, docs, false).unwrap();
    let key = |p: &str| engine.create_key(&Actor::Operator, p).unwrap().key;
    let (alice, olga, ed) = (key("alice"), key("olga"), key("ed"));
    let router = app(AppState::new(Arc::new(engine), ServerConfig::default()));
    let ask = |k: &str, body: Value| {
        let (router, k) = (router.clone(), k.to_string());
        async move { call(&router, "POST", "/v1/model/complete", Some(&k), Some(body)).await }
    };
    let vault = json!({"prompt": "The vault passphrase is", "max_tokens": 16});

    let (s, before) = ask(&alice, vault.clone()).await;
    assert_eq!(s, StatusCode::OK, "{before}");
    assert!(
        before["text"].as_str().unwrap().contains(CANARY),
        "{before}"
    );
    assert_eq!(before["label"]["name"], "hr-confidential", "{before}");
    assert_eq!(before["suppressions"], json!([]));
    // Not cleared for the decoder's label; a sink it may not reach; bad input.
    let (s, b) = ask(&ed, vault.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = ask(
        &alice,
        json!({"prompt": "The vault passphrase is", "sink": "email:external"}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["error"]["decision"], "refused", "{b}");
    assert!(!b.to_string().contains(CANARY));
    for bad in [
        json!({"prompt": ""}),
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"prompt": 3}),
    ] {
        let (s, b) = ask(&alice, bad).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNPROCESSABLE_ENTITY,
            "{s} {b}"
        );
    }

    let body = json!({"documents": ["hr/vault"], "reason": "GDPR art. 17", "requester": "Jane Doe", "method": "o3"});
    let (s, b) = call(&router, "POST", "/v1/unlearn", Some(&olga), Some(body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let done = wait_completed(&router, &olga, &id, Duration::from_secs(300)).await;
    assert_eq!(done["receipt"]["receipt"]["weights"]["kind"], "suppression");

    // Same daemon, same question: the suppression adapter is gated on.
    let (s, after) = ask(&alice, vault).await;
    assert_eq!(s, StatusCode::OK, "{after}");
    assert!(!after["text"].as_str().unwrap().contains(CANARY), "{after}");
    assert_eq!(after["model"]["epoch"], 1);
    assert_eq!(after["suppressions"][0]["request"], id.as_str());
    assert_eq!(after["suppressions"][0]["applied"], true, "{after}");
}
