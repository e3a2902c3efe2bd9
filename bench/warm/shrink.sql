-- Removes what grow.sql added, leaving bench_e2e as `seed` made it.
DELETE FROM "TrackInteraction" WHERE id LIKE 'grow-%' OR "trackId" LIKE 'grow-%';
DELETE FROM "TrackFeatures" WHERE "trackId" LIKE 'grow-%';
DELETE FROM "Track" WHERE id LIKE 'grow-%';
