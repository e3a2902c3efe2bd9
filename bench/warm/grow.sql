-- Grows bench_e2e's catalogue by 1 % and its history by 2 % for bench/warm.sh, after its newest
-- rows: 1,000 new tracks (copies of random existing ones under new ids, same artists and album,
-- features jittered by ±5 %, created a day after the newest track) and 40,000 new interactions (random
-- existing ones re-dated into the day after the newest, a quarter of them moved to the new copy of
-- their track when it has one). Everything it adds has an id starting 'grow-'; shrink.sql removes it.
SELECT setseed(0.42);
CREATE TEMP TABLE grow_tracks AS
SELECT 'grow-' || row_number() OVER () AS id, t.id AS source
FROM (SELECT id FROM "Track" WHERE id NOT LIKE 'grow-%' ORDER BY random() LIMIT 1000) t;

INSERT INTO "Track" ("id", "spotifyId", "name", "artists", "album", "popularity", "createdAt", "updatedAt")
SELECT g.id, g.id, t."name" || ' (new)', t."artists", t."album", 0,
       (SELECT max("createdAt") FROM "Track") + interval '1 day', now()
FROM grow_tracks g JOIN "Track" t ON t.id = g.source;

INSERT INTO "TrackFeatures" ("id", "trackId", "danceability", "energy", "key", "loudness", "mode", "speechiness",
    "acousticness", "instrumentalness", "liveness", "valence", "tempo", "updatedAt")
SELECT 'grow-f-' || g.id, g.id,
       least(1, f."danceability" * (0.95 + 0.1 * random())), least(1, f."energy" * (0.95 + 0.1 * random())),
       f."key", f."loudness" * (0.95 + 0.1 * random()), f."mode",
       least(1, f."speechiness" * (0.95 + 0.1 * random())), least(1, f."acousticness" * (0.95 + 0.1 * random())),
       least(1, f."instrumentalness" * (0.95 + 0.1 * random())), least(1, f."liveness" * (0.95 + 0.1 * random())),
       least(1, f."valence" * (0.95 + 0.1 * random())), f."tempo" * (0.95 + 0.1 * random()), now()
FROM grow_tracks g JOIN "TrackFeatures" f ON f."trackId" = g.source;

INSERT INTO "TrackInteraction" ("id", "userId", "trackId", "type", "timestamp")
SELECT 'grow-i-' || row_number() OVER (), i."userId",
       CASE WHEN g.id IS NOT NULL AND random() < 0.25 THEN g.id ELSE i."trackId" END,
       i."type",
       (SELECT max("timestamp") FROM "TrackInteraction") + random() * interval '1 day'
FROM (SELECT * FROM "TrackInteraction" WHERE id NOT LIKE 'grow-%' ORDER BY random() LIMIT 40000) i
LEFT JOIN grow_tracks g ON g.source = i."trackId"
ON CONFLICT DO NOTHING;

SELECT (SELECT count(*) FROM "Track" WHERE id LIKE 'grow-%') AS new_tracks,
       (SELECT count(*) FROM "TrackInteraction" WHERE id LIKE 'grow-i-%') AS new_interactions,
       (SELECT count(*) FROM "TrackInteraction" WHERE "trackId" LIKE 'grow-%') AS listens_of_new_tracks;
