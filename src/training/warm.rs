//! Warm start: a run that begins from a published version's weights instead of a seeded
//! initialisation, on a catalogue that may have grown since.
//!
//! What carries over, by name, never by position:
//! - the content encoder's tensors (content and hybrid kinds), BatchNorm's statistics included;
//! - each table row whose key still exists: an identity row by track id, an artist or album row by
//!   name (the out-of-vocabulary row 0 to row 0).
//!
//! What does not: rows of tracks, artists and albums the parent did not know keep this run's own
//! initialisation — zero in the hybrid, so a new track starts where the content, artist and album
//! path puts it; seeded in the collaborative kind, as in a full run. Adam starts fresh (moments
//! zero, step 0): the parent's optimiser state is not published with a version. The standardisation
//! statistics are the parent's (the caller passes them to data preparation), so a feature value
//! means the same to the encoder along the whole lineage.

use std::collections::HashMap;

use candle_core::Tensor;

use super::model::tables::{TABLE_NAMES, TableId};
use super::model::vocab::TrackInputs;
use super::trainer::{Trainer, TrainingState};
use crate::data::features::Standardizer;

/// A published version's model, as a warm start needs it.
pub struct ParentModel {
    pub version: String,
    pub standardizer: Standardizer,
    /// The content encoder's tensors by their Keras names (absent for the collaborative kind).
    pub encoder: Option<HashMap<String, Tensor>>,
    /// Each table the parent has: its row keys (see [`row_keys`]) and `[rows, dim]` values.
    pub tables: Vec<ParentTable>,
    /// The parent's catalogue, in its row order.
    pub track_ids: Vec<String>,
    /// The parent's published embeddings (`dim`, `[rows, dim]` values), when read (a refresh
    /// keeps them bit for bit).
    pub published: Option<(usize, Vec<f32>)>,
}

pub struct ParentTable {
    pub name: String,
    pub keys: Vec<String>,
    pub dim: usize,
    pub values: Vec<f32>,
}

/// How much of the parent a warm start kept, per table: rows copied and rows new to this run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CarriedOver {
    pub table: String,
    pub copied_rows: usize,
    pub new_rows: usize,
}

/// The key of each row of table `id` in a catalogue: the track id (identity), or the artist or album
/// name with the OOV bucket as `""` (row 0; a real name is never empty).
pub fn row_keys(id: TableId, track_ids: &[String], inputs: &TrackInputs) -> Vec<String> {
    match id {
        TableId::Identity => track_ids.to_vec(),
        TableId::Artist => std::iter::once(String::new()).chain(inputs.artists.names.iter().cloned()).collect(),
        TableId::Album => std::iter::once(String::new()).chain(inputs.albums.names.iter().cloned()).collect(),
    }
}

/// Loads `parent` into a fresh `state` of this run (same kind and embedding size, checked by the
/// caller's plan, and again here): the encoder's tensors, then every table row whose key the parent
/// has. Returns what was carried over, table by table.
pub fn apply(
    state: &mut TrainingState,
    parent: &ParentModel,
    track_ids: &[String],
    inputs: &TrackInputs,
) -> anyhow::Result<Vec<CarriedOver>> {
    if let Some(encoder) = &parent.encoder {
        state.encoder.load(encoder).map_err(|e| anyhow::anyhow!("version {}'s encoder: {e}", parent.version))?;
    }
    let mut carried = Vec::new();
    for (i, slot) in state.tables.tables.iter_mut().enumerate() {
        let Some(table) = slot else { continue };
        let id = [TableId::Identity, TableId::Artist, TableId::Album][i];
        let Some(from) = parent.tables.iter().find(|t| t.name == TABLE_NAMES[i]) else {
            anyhow::bail!("version {} has no {} table to warm-start from", parent.version, TABLE_NAMES[i]);
        };
        anyhow::ensure!(
            from.dim == table.dim,
            "version {}'s {} rows have {} values, this run's {}",
            parent.version,
            from.name,
            from.dim,
            table.dim
        );
        let parent_row: HashMap<&str, usize> = from.keys.iter().enumerate().map(|(r, k)| (k.as_str(), r)).collect();
        let keys = row_keys(id, track_ids, inputs);
        anyhow::ensure!(keys.len() == table.rows, "{} keys for {} rows of {}", keys.len(), table.rows, table.name);
        let d = table.dim;
        let mut copied = 0;
        for (row, key) in keys.iter().enumerate() {
            if let Some(&p) = parent_row.get(key.as_str()) {
                table.values[row * d..(row + 1) * d].copy_from_slice(&from.values[p * d..(p + 1) * d]);
                copied += 1;
            }
        }
        carried.push(CarriedOver { table: from.name.clone(), copied_rows: copied, new_rows: table.rows - copied });
    }
    Ok(carried)
}

/// The first state of a warm run: the trainer's fresh state with `parent` loaded into it
/// ([`apply`]); a collaborative track without training listens keeps a zero row, as in a full run.
pub fn start(
    trainer: &Trainer,
    device: &candle_core::Device,
    parent: &ParentModel,
    track_ids: &[String],
) -> anyhow::Result<(TrainingState, Vec<CarriedOver>)> {
    let mut state = trainer.fresh_state(device)?;
    let carried = apply(&mut state, parent, track_ids, trainer.inputs())?;
    if let Some(learned) = trainer.learned_rows() {
        state.tables.zero_unlearned_identity(&learned);
    }
    Ok((state, carried))
}

/// Overwrites the rows of `embeddings` (`[track_ids.len(), dim]`, this catalogue) of every track
/// the parent published with the parent's row, bit for bit; returns how many tracks are new (kept
/// as computed). A refresh uses it so that only the new tracks' rows change.
pub fn keep_published_rows(
    embeddings: &mut [f32],
    track_ids: &[String],
    parent: &ParentModel,
) -> anyhow::Result<usize> {
    let (dim, published) = parent
        .published
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("version {}'s embeddings were not read", parent.version))?;
    anyhow::ensure!(
        embeddings.len() == track_ids.len() * dim,
        "this run's embeddings have {} values for {} tracks of {dim}",
        embeddings.len(),
        track_ids.len()
    );
    let row: HashMap<&str, usize> = parent.track_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    let mut new = 0;
    for (t, id) in track_ids.iter().enumerate() {
        match row.get(id.as_str()) {
            Some(&p) => embeddings[t * dim..(t + 1) * dim].copy_from_slice(&published[p * dim..(p + 1) * dim]),
            None => new += 1,
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tags::TrackTags;
    use crate::training::model::ModelKind;
    use crate::training::model::tables::TableConfig;
    use crate::training::trainer::TrainConfig;
    use candle_core::Device;

    fn config(kind: ModelKind) -> TrainConfig {
        crate::training::checkpoint::tests::config().for_kind(
            kind,
            TableConfig { min_count: 1, ..Default::default() },
            None,
        )
    }

    fn tags(rows: &[(&[&str], &str)]) -> TrackTags {
        let mut t = TrackTags::default();
        for (artists, album) in rows {
            t.push(artists.iter().copied(), Some(album));
        }
        t
    }

    #[test]
    fn rows_carry_over_by_key_and_new_ones_keep_their_initialisation() {
        let cfg = config(ModelKind::Hybrid);
        // The parent knew tracks a, b and artists x, y; the new catalogue adds track c and artist z
        // and reorders the tracks.
        let old_inputs = TrackInputs::build(&tags(&[(&["x"], "A"), (&["y"], "B")]), 1);
        let old_ids = ["a".to_string(), "b".to_string()];
        let mut parent_state = TrainingState::for_inputs(&cfg, &old_inputs, &Device::Cpu).unwrap();
        for table in parent_state.tables.tables.iter_mut().flatten() {
            for (i, v) in table.values.iter_mut().enumerate() {
                *v = 1.0 + i as f32;
            }
        }
        let parent = ParentModel {
            version: "v1".into(),
            standardizer: Standardizer { means: [0.0; 11], stds: [1.0; 11] },
            encoder: Some(parent_state.encoder.named_tensors().into_iter().map(|(n, t)| (n.to_string(), t)).collect()),
            tables: parent_state
                .tables
                .tables
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, t)| ParentTable {
                    name: t.name.to_string(),
                    keys: row_keys([TableId::Identity, TableId::Artist, TableId::Album][i], &old_ids, &old_inputs),
                    dim: t.dim,
                    values: t.values.clone(),
                })
                .collect(),
            track_ids: old_ids.to_vec(),
            published: None,
        };
        let new_inputs = TrackInputs::build(&tags(&[(&["y"], "B"), (&["z"], "C"), (&["x"], "A")]), 1);
        let new_ids = ["b".to_string(), "c".to_string(), "a".to_string()];
        let reseeded = TrainConfig { seed: 99, ..cfg.clone() };
        let mut state = TrainingState::for_inputs(&reseeded, &new_inputs, &Device::Cpu).unwrap();
        let carried = apply(&mut state, &parent, &new_ids, &new_inputs).unwrap();
        let dim = cfg.encoder.embedding_size;
        let identity = state.tables.tables[0].as_ref().unwrap();
        let old_identity = parent_state.tables.tables[0].as_ref().unwrap();
        assert_eq!(identity.values[..dim], old_identity.values[dim..2 * dim], "track b: parent row 1 → row 0");
        assert_eq!(identity.values[2 * dim..], old_identity.values[..dim], "track a: parent row 0 → row 2");
        assert!(identity.values[dim..2 * dim].iter().all(|&v| v == 0.0), "new track c keeps the hybrid's zero row");
        assert_eq!(
            carried,
            vec![
                CarriedOver { table: "track_embedding".into(), copied_rows: 2, new_rows: 1 },
                CarriedOver { table: "artist_embedding".into(), copied_rows: 3, new_rows: 1 },
                CarriedOver { table: "album_embedding".into(), copied_rows: 3, new_rows: 1 },
            ]
        );
        // The encoder is the parent's, not the new seed's.
        let names = state.encoder.named_tensors();
        for (name, t) in names {
            let want = &parent.encoder.as_ref().unwrap()[name];
            let (a, b): (Vec<f32>, Vec<f32>) =
                (t.flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
            assert_eq!(a, b, "{name}");
        }
    }

    #[test]
    fn a_parent_of_another_size_is_refused() {
        let cfg = config(ModelKind::Collaborative);
        let inputs = TrackInputs::build(&tags(&[(&["x"], "A")]), 1);
        let mut state = TrainingState::for_inputs(&cfg, &inputs, &Device::Cpu).unwrap();
        let parent = ParentModel {
            version: "v1".into(),
            standardizer: Standardizer { means: [0.0; 11], stds: [1.0; 11] },
            encoder: None,
            tables: vec![ParentTable {
                name: "track_embedding".into(),
                keys: vec!["a".into()],
                dim: 3,
                values: vec![0.0; 3],
            }],
            track_ids: vec!["a".into()],
            published: None,
        };
        let err = apply(&mut state, &parent, &["a".to_string()], &inputs).unwrap_err();
        assert!(err.to_string().contains("have 3 values"), "{err}");
    }
}
