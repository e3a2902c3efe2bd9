//! One worker trains all three model kinds from one queue: each model key maps to its kind
//! (`WORKER_MODELS=content-based,cf=collaborative,hybrid=hybrid`), each request gets its own run, and
//! each version says what it is.

use super::*;

#[tokio::test]
async fn one_worker_trains_content_collaborative_and_hybrid_models_from_one_queue() {
    let _serial = serial().await;
    let models = "content-based,cf=collaborative,hybrid=hybrid";
    let (setup, events, _worker, publisher) = one_worker(&[("WORKER_MODELS", models)]).await;
    let mut ids = Vec::new();
    for model in ["content-based", "cf", "hybrid"] {
        let id = format!("kind-{model}");
        let body = serde_json::to_vec(&serde_json::json!({"model": model, "event_id": id})).unwrap();
        publisher.raw(&format!("retrain.{model}"), &body, &id).await;
        ids.push(id);
    }
    events.wait_satisfied(&ids, 4 * MINUTE).await;
    let ready = events.events("model-ready");
    assert_eq!(ready.len(), 3, "{ready:#?}");
    assert!(events.dead_letters().is_empty(), "{:#?}", events.dead_letters());
    let kind_of = |model: &str| {
        let event = ready.iter().find(|e| e["model"] == model).unwrap_or_else(|| panic!("no model-ready for {model}"));
        (event["kind"].as_str().unwrap().to_string(), event["version"].as_str().unwrap().to_string())
    };
    let store = setup.store.path();
    let metadata = |model: &str, version: &str| -> serde_json::Value {
        let path = store.join(model).join("versions").join(version).join("content-based-model-metadata.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let tensors = |model: &str, version: &str, file: &str| -> Vec<(String, Vec<usize>)> {
        let bytes = std::fs::read(store.join(model).join("versions").join(version).join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<(String, Vec<usize>)> =
            st.tensors().into_iter().map(|(n, v)| (n.to_string(), v.shape().to_vec())).collect();
        names.sort();
        names
    };

    let (kind, version) = kind_of("content-based");
    assert_eq!(kind, "content-based");
    let m = metadata("content-based", &version);
    assert_eq!(m["model_type"], "content-based");
    assert!(m["hyperparameters"].get("model_kind").is_none(), "a content run's settings read as before");
    assert!(tensors("content-based", &version, "weights.safetensors").iter().all(|(n, _)| !n.ends_with("embeddings")));

    let (kind, version) = kind_of("cf");
    assert_eq!(kind, "collaborative");
    let m = metadata("cf", &version);
    let tracks = m["num_tracks"].as_u64().unwrap() as usize;
    assert_eq!(m["model_type"], "collaborative");
    assert_eq!(m["hyperparameters"]["model_kind"], "collaborative");
    let learned = m["learned_tracks"].as_u64().unwrap() as usize;
    assert!(learned > 0 && learned <= tracks, "{learned} of {tracks}");
    assert_eq!(
        tensors("cf", &version, "weights.safetensors"),
        [("track_embedding.embeddings".to_string(), vec![tracks, 16])]
    );
    let vocab: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("cf/versions").join(&version).join("vocabularies.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(vocab["learned_track_rows"].as_array().unwrap().len(), learned);
    // Its similar-tracks table lists only learned tracks, and only they have lists.
    let learned_rows: std::collections::HashSet<u64> =
        vocab["learned_track_rows"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
    let table = candle_core::safetensors::load(
        store.join("cf/versions").join(&version).join("neighbours.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (rows, k) = table["indices"].dims2().unwrap();
    assert_eq!(rows, tracks);
    let indices: Vec<u32> = table["indices"].flatten_all().unwrap().to_vec1().unwrap();
    for (t, list) in indices.chunks(k).enumerate() {
        let listed: Vec<u32> = list.iter().copied().filter(|&i| i != u32::MAX).collect();
        assert!(listed.iter().all(|&i| learned_rows.contains(&(i as u64))), "track {t} lists an unlearned track");
        assert_eq!(listed.is_empty(), !learned_rows.contains(&(t as u64)), "track {t}: {listed:?}");
    }
    assert_eq!(m["neighbours"]["tracks_listed"].as_u64().unwrap() as usize, learned);

    let (kind, version) = kind_of("hybrid");
    assert_eq!(kind, "hybrid");
    let event = ready.iter().find(|e| e["model"] == "hybrid").unwrap();
    assert!(event["metrics"]["baselines"]["shared_artist"]["recall_at_10"].is_f64(), "{event:#}");
    for artifact in ["keras", "tfjs", "weights", "embeddings", "neighbours", "model_card", "vocabularies"] {
        let url = event["artifacts"][artifact].as_str().unwrap_or_else(|| panic!("no {artifact}: {event:#}"));
        assert!(std::path::Path::new(url.trim_start_matches("file://")).exists(), "{url}");
    }
    let m = metadata("hybrid", &version);
    assert_eq!(m["model_type"], "hybrid");
    assert!(m["final_metrics"]["recall_at_10"].as_f64().unwrap() > 0.0);
    assert!(m["baselines"]["shared_artist"]["recall_at_10"].is_f64());
    let weights = tensors("hybrid", &version, "weights.safetensors");
    for table in
        ["track_embedding.embeddings", "artist_embedding.embeddings", "album_embedding.embeddings", "dense.kernel"]
    {
        assert!(weights.iter().any(|(n, _)| n == table), "{table} missing from {weights:?}");
    }
    assert_eq!(tensors("hybrid", &version, "embeddings.safetensors"), [("embeddings".to_string(), vec![tracks, 16])]);

    let runs = setup
        .db
        .count("SELECT count(DISTINCT model) FROM audotics_trainer.training_runs WHERE status = 'succeeded'")
        .await;
    assert_eq!(runs, 3, "one run per model key");
}
