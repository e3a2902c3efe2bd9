//! Freshness through the real worker (`AUDOTICS_WARM_START=auto`): the first version is a full
//! retrain, a refresh embeds tracks added since it without training, the next retrain warm-starts
//! from the latest version, and `params.full` forces a full retrain; `model-ready` says which.

use super::*;

#[tokio::test]
async fn full_then_refresh_then_warm_then_requested_full() {
    let _serial = serial().await;
    let (setup, events, _worker, publisher) = one_worker(&[("AUDOTICS_WARM_START", "auto")]).await;
    let mut answered = 0;
    let mut request = |params: serde_json::Value| {
        answered += 1;
        let id = format!("fresh-{answered}-{}", uuid::Uuid::new_v4());
        let body = serde_json::json!({"model": "content-based", "event_id": id, "params": params});
        (id, serde_json::to_vec(&body).unwrap())
    };
    let ready = |id: &str| -> serde_json::Value {
        let all = events.events("model-ready");
        all.into_iter()
            .find(|e| e["satisfies"].as_array().is_some_and(|s| s.iter().any(|x| x == id)))
            .unwrap_or_else(|| panic!("no model-ready for {id}"))
    };

    let (first, body) = request(serde_json::Value::Null);
    publisher.raw("retrain.content-based", &body, &first).await;
    events.wait_satisfied(std::slice::from_ref(&first), 2 * MINUTE).await;
    let v1 = ready(&first);
    assert_eq!(v1["lineage"]["mode"], "full", "{:#}", v1["lineage"]);
    assert!(v1["artifacts"]["neighbours"].is_string(), "{v1:#}");

    // Five tracks join the catalogue (copies of existing ones under new ids, features included).
    for sql in [
        r#"INSERT INTO "Track" ("id","spotifyId","name","artists","album","popularity","createdAt","updatedAt")
           SELECT 'fresh-' || "id", 'fresh-' || "spotifyId", "name", "artists", "album", 0, now(), now()
           FROM "Track" ORDER BY "id" LIMIT 5"#,
        r#"INSERT INTO "TrackFeatures" ("id","trackId","danceability","energy","key","loudness","mode","speechiness",
               "acousticness","instrumentalness","liveness","valence","tempo","updatedAt")
           SELECT 'fresh-' || f."id", 'fresh-' || f."trackId", f."danceability", f."energy", f."key", f."loudness",
               f."mode", f."speechiness", f."acousticness", f."instrumentalness", f."liveness", f."valence",
               f."tempo", now()
           FROM "TrackFeatures" f WHERE f."trackId" IN (SELECT "id" FROM "Track" WHERE "id" NOT LIKE 'fresh-%' ORDER BY "id" LIMIT 5)"#,
    ] {
        sqlx::query(sql).execute(&setup.db.pool).await.unwrap();
    }
    let (refresh, body) = request(serde_json::json!({"refresh": true}));
    publisher.raw("retrain.content-based", &body, &refresh).await;
    events.wait_satisfied(std::slice::from_ref(&refresh), 2 * MINUTE).await;
    let v2 = ready(&refresh);
    assert_eq!(v2["lineage"]["mode"], "refresh", "{:#}", v2["lineage"]);
    assert_eq!(v2["lineage"]["parent_version"], v1["version"]);
    assert_eq!(v2["data"]["tracks"].as_u64(), v1["data"]["tracks"].as_u64().map(|n| n + 5));
    let store = setup.store.path().join("content-based/versions");
    let meta = |v: &serde_json::Value| -> serde_json::Value {
        let path = store.join(v["version"].as_str().unwrap()).join("content-based-model-metadata.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    assert_eq!(meta(&v2)["lineage"]["new_tracks"], 5);
    assert_eq!(meta(&v2)["epochs_completed"], 0);

    let (warm, body) = request(serde_json::Value::Null);
    publisher.raw("retrain.content-based", &body, &warm).await;
    events.wait_satisfied(std::slice::from_ref(&warm), 2 * MINUTE).await;
    let v3 = ready(&warm);
    assert_eq!(v3["lineage"]["mode"], "warm", "{:#}", v3["lineage"]);
    assert_eq!(v3["lineage"]["parent_version"], v2["version"]);
    assert_eq!(meta(&v3)["feature_means"], meta(&v1)["feature_means"], "the lineage keeps its statistics");

    let (full, body) = request(serde_json::json!({"full": true}));
    publisher.raw("retrain.content-based", &body, &full).await;
    events.wait_satisfied(std::slice::from_ref(&full), 2 * MINUTE).await;
    let v4 = ready(&full);
    assert_eq!(v4["lineage"]["mode"], "full");
    assert_eq!(v4["lineage"]["reason"], "requested (params.full, train --full)");
    assert!(events.dead_letters().is_empty(), "{:#?}", events.dead_letters());
}
