//! The unlearning API end to end, in process: principals without the
//! `unlearn` role get 403, a compliance officer who cannot read an HR file
//! gets 202 and a request id, the request completes in the background with
//! a receipt that verifies, and a query that used to retrieve the canary no
//! longer does (the real pipeline: MiniLM retrieval and SmolLM2, with one
//! generated token since the answer is not the point).

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
    let started = Instant::now();
    let done = loop {
        let (s, b) = call(
            &router,
            "GET",
            &format!("/v1/unlearn/{id}"),
            Some(&olga),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        match b["state"].as_str() {
            Some("completed") => break b,
            Some("pending" | "running") => {}
            other => panic!("unexpected state {other:?}: {b}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run did not finish: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
