//! Freshness through the real worker (`AUDOTICS_WARM_START=auto`): the first version is a full
//! retrain, a refresh embeds tracks added since it without training, the next retrain warm-starts
//! from the latest version, and `params.full` forces a full retrain; `model-ready` says which. The
//! refresh timer asks for a refresh when, and only when, tracks were added.

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

    add_tracks(&setup.db.pool, "fresh", 5).await;
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

/// `n` tracks join the catalogue now: copies of existing ones (features included) under ids
/// prefixed `prefix-`.
async fn add_tracks(pool: &sqlx::PgPool, prefix: &str, n: i64) {
    let tracks = r#"INSERT INTO "Track" ("id","spotifyId","name","artists","album","popularity","createdAt","updatedAt")
        SELECT $1 || "id", $1 || "spotifyId", "name", "artists", "album", 0, now(), now()
        FROM "Track" WHERE "id" NOT LIKE '%-%-%-%-%-%' ORDER BY "id" LIMIT $2"#;
    let features = r#"INSERT INTO "TrackFeatures" ("id","trackId","danceability","energy","key","loudness","mode",
            "speechiness","acousticness","instrumentalness","liveness","valence","tempo","updatedAt")
        SELECT $1 || f."id", $1 || f."trackId", f."danceability", f."energy", f."key", f."loudness", f."mode",
            f."speechiness", f."acousticness", f."instrumentalness", f."liveness", f."valence", f."tempo", now()
        FROM "TrackFeatures" f WHERE f."trackId" IN
            (SELECT "id" FROM "Track" WHERE "id" NOT LIKE '%-%-%-%-%-%' ORDER BY "id" LIMIT $2)"#;
    for sql in [tracks, features] {
        sqlx::query(sql).bind(format!("{prefix}-")).bind(n).execute(pool).await.unwrap();
    }
}

/// Requests the refresh timer recorded, by their event ids.
async fn timer_requests(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_id FROM audotics_trainer.retrain_requests WHERE event_id LIKE 'refresh-timer:%' ORDER BY event_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_refresh_timer_asks_once_tracks_were_added_and_not_before() {
    let _serial = serial().await;
    let (setup, events, worker, publisher) = one_worker(&[("WORKER_REFRESH_EVERY_SECONDS", "1")]).await;
    let ticks =
        |outcome: &str| worker.log_lines("refresh timer").iter().filter(|l| l["fields"]["outcome"] == outcome).count();
    let at_least = |outcome: &'static str, n: usize| {
        let ticks = &ticks;
        async move {
            eventually(MINUTE, &format!("{n} `{outcome}` ticks"), || async { (ticks(outcome) >= n).then_some(()) })
                .await
        }
    };
    let pool = &setup.db.pool;

    // No version yet: nothing to refresh.
    at_least("no_version", 1).await;
    let first = publisher.request("timer-first").await;
    events.wait_satisfied(std::slice::from_ref(&first), 2 * MINUTE).await;
    let v1 = events.events("model-ready").into_iter().find(|e| e["satisfies"][0] == first.as_str()).unwrap();
    assert!(v1["data"]["newest_track_created_ms"].is_i64(), "the event carries the catalogue's pin: {:#}", v1["data"]);

    // Two ticks see the same catalogue: no request.
    let before = ticks("up_to_date");
    at_least("up_to_date", before + 2).await;
    assert_eq!(timer_requests(pool).await, Vec::<String>::new());

    // Tracks are added: one tick asks for a refresh of v1, which the worker publishes.
    add_tracks(pool, "timer", 3).await;
    let asked = format!("refresh-timer:content-based:{}", v1["version"].as_str().unwrap());
    events.wait_satisfied(std::slice::from_ref(&asked), 2 * MINUTE).await;
    let v2 = events.events("model-ready").into_iter().find(|e| e["satisfies"][0] == asked.as_str()).unwrap();
    assert_eq!(v2["lineage"]["mode"], "refresh", "{:#}", v2["lineage"]);
    assert_eq!(v2["lineage"]["parent_version"], v1["version"]);
    assert_eq!(v2["data"]["tracks"].as_u64(), v1["data"]["tracks"].as_u64().map(|n| n + 3));
    assert!(v2["data"]["newest_track_created_ms"].as_i64() > v1["data"]["newest_track_created_ms"].as_i64());

    // The refreshed version knows every track: two more ticks, and still the one request.
    let before = ticks("up_to_date");
    at_least("up_to_date", before + 2).await;
    assert_eq!(timer_requests(pool).await, vec![asked]);
    assert!(events.dead_letters().is_empty(), "{:#?}", events.dead_letters());
}
