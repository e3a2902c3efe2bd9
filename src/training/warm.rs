//! Warm start: a run that begins from a published version's weights instead of a seeded
//! initialisation, on a catalogue that may have grown since.
//!
//! What carries over, by name, never by position:
//! - the content encoder's tensors (content and hybrid kinds), BatchNorm's statistics included;
//! - each table row whose key still exists: an identity row by track id, an artist or album row by
//!   name (the out-of-vocabulary row 0 to row 0).
//!
//! What does not: identity rows of tracks the parent did not know keep this run's own
//! initialisation — zero in the hybrid, so a new track starts where the content, artist and album
//! path puts it; seeded in the collaborative kind, as in a full run. An artist or album the parent
//! did not know starts as the parent's out-of-vocabulary row, which is what the parent gave its
//! tracks: a new track starts where the lineage already placed it. The standardisation
//! statistics are the parent's (the caller passes them to data preparation), so a feature value
//! means the same to the encoder along the whole lineage.
//!
//! Adam starts fresh (moments zero, step 0) unless the run asks to carry the optimiser over
//! ([`apply_optimizer`]): then the moments and step counts come from the checkpoint of the epoch
//! whose weights the parent published (a version publishes no optimiser state; its run's best
//! checkpoint holds it), mapped by the same keys as the weights; rows new to this run keep zero
//! moments.

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
        // A new artist or album starts as the parent's out-of-vocabulary row: what the parent (and
        // a refresh of it) gave its tracks, so they start where the lineage already placed them.
        let start_of_new = match id {
            TableId::Identity => None,
            TableId::Artist | TableId::Album => parent_row.get("").map(|&p| &from.values[p * d..(p + 1) * d]),
        };
        let mut copied = 0;
        for (row, key) in keys.iter().enumerate() {
            let target = &mut table.values[row * d..(row + 1) * d];
            if let Some(&p) = parent_row.get(key.as_str()) {
                target.copy_from_slice(&from.values[p * d..(p + 1) * d]);
                copied += 1;
            } else if let Some(oov) = start_of_new {
                target.copy_from_slice(oov);
            }
        }
        carried.push(CarriedOver { table: from.name.clone(), copied_rows: copied, new_rows: table.rows - copied });
    }
    Ok(carried)
}

/// The optimiser state of the run that trained a parent's weights: the checkpoint of its published
/// epoch, and the row keys of each of its tables (that run's catalogue order, as the version that
/// run published lists them).
pub struct ParentOptimizer {
    /// Where it came from, in words, for the log and the metadata.
    pub origin: String,
    pub checkpoint: Vec<u8>,
    pub table_keys: Vec<(String, Vec<String>)>,
}

/// Loads the Adam moments and step counts of `from` into `state` (already warm-started by
/// [`apply`]): the encoder's moments by tensor name, each table row's by key; a row the parent's
/// run did not have keeps zero moments. The step counts carry over too: the moments were
/// accumulated over that many steps, and the bias correction must say so.
pub fn apply_optimizer(
    state: &mut TrainingState,
    from: &ParentOptimizer,
    track_ids: &[String],
    inputs: &TrackInputs,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let origin = &from.origin;
    let (_, header) = safetensors::SafeTensors::read_metadata(&from.checkpoint)
        .with_context(|| format!("{origin}: not a safetensors checkpoint"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let step = |key: &str| -> anyhow::Result<u64> {
        meta.get(key)
            .with_context(|| format!("{origin} lacks {key}"))?
            .parse()
            .with_context(|| format!("{origin}'s {key}"))
    };
    let tensors = candle_core::safetensors::load_buffer(&from.checkpoint, &candle_core::Device::Cpu)?;
    let take = |name: &str| tensors.get(name).cloned().with_context(|| format!("{origin} lacks tensor {name}"));
    let mut first_moment = Vec::new();
    let mut second_moment = Vec::new();
    for name in crate::training::model::TRAINABLE_NAMES {
        first_moment.push(take(&format!("adam.m.{name}"))?);
        second_moment.push(take(&format!("adam.v.{name}"))?);
    }
    state
        .optimizer
        .restore(crate::training::optim::AdamState { first_moment, second_moment, step: step("adam_step")? })
        .with_context(|| format!("{origin}'s encoder moments"))?;
    for (i, slot) in state.tables.tables.iter_mut().enumerate() {
        let Some(table) = slot else { continue };
        let id = [TableId::Identity, TableId::Artist, TableId::Album][i];
        let (_, parent_keys) = from
            .table_keys
            .iter()
            .find(|(name, _)| name == TABLE_NAMES[i])
            .with_context(|| format!("{origin} has no row keys for {}", TABLE_NAMES[i]))?;
        let parent_row: HashMap<&str, usize> = parent_keys.iter().enumerate().map(|(r, k)| (k.as_str(), r)).collect();
        let d = table.dim;
        let part = |p: &str| -> anyhow::Result<Vec<f32>> {
            let t = take(&format!("table.{}.{p}", table.name))?;
            anyhow::ensure!(
                t.dims() == [parent_keys.len(), d],
                "{origin}'s {} moments have shape {:?}, not {} rows of {d}",
                table.name,
                t.dims(),
                parent_keys.len()
            );
            Ok(t.flatten_all()?.to_vec1()?)
        };
        let (m, v) = (part("m")?, part("v")?);
        for (row, key) in row_keys(id, track_ids, inputs).iter().enumerate() {
            let span = row * d..(row + 1) * d;
            match parent_row.get(key.as_str()) {
                Some(&p) => {
                    table.first_moment[span.clone()].copy_from_slice(&m[p * d..(p + 1) * d]);
                    table.second_moment[span].copy_from_slice(&v[p * d..(p + 1) * d]);
                }
                None => {
                    table.first_moment[span.clone()].fill(0.0);
                    table.second_moment[span].fill(0.0);
                }
            }
        }
    }
    if !state.tables.is_empty() {
        state.tables.step = step("table_step")?;
    }
    Ok(())
}

/// The first state of a warm run: the trainer's fresh state with `parent` loaded into it
/// ([`apply`]) and, when given, its run's optimiser state ([`apply_optimizer`]); a collaborative
/// track without training listens keeps a zero row, as in a full run.
pub fn start(
    trainer: &Trainer,
    device: &candle_core::Device,
    parent: &ParentModel,
    optimizer: Option<&ParentOptimizer>,
    track_ids: &[String],
) -> anyhow::Result<(TrainingState, Vec<CarriedOver>)> {
    let mut state = trainer.fresh_state(device)?;
    let carried = apply(&mut state, parent, track_ids, trainer.inputs())?;
    if let Some(optimizer) = optimizer {
        apply_optimizer(&mut state, optimizer, track_ids, trainer.inputs())?;
    }
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

    /// The parent knew tracks a, b and artists x, y; the new catalogue adds track c and artist z and
    /// reorders the tracks. Returns the config and (inputs, track ids) before and after.
    #[allow(clippy::type_complexity)]
    fn grown_catalogue() -> (TrainConfig, (TrackInputs, Vec<String>), (TrackInputs, Vec<String>)) {
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let old = TrackInputs::build(&tags(&[(&["x"], "A"), (&["y"], "B")]), 1);
        let new = TrackInputs::build(&tags(&[(&["y"], "B"), (&["z"], "C"), (&["x"], "A")]), 1);
        (config(ModelKind::Hybrid), (old, ids(&["a", "b"])), (new, ids(&["b", "c", "a"])))
    }

    /// The identity rows of [`grown_catalogue`]'s new order (b, c, a) against the parent's (a, b):
    /// b and a are the parent's rows, the new track c's row is zero.
    fn assert_rows_follow_their_keys(new: &[f32], old: &[f32], dim: usize, what: &str) {
        assert_eq!(new[..dim], old[dim..2 * dim], "{what}: track b, parent row 1 → row 0");
        assert_eq!(new[2 * dim..], old[..dim], "{what}: track a, parent row 0 → row 2");
        assert!(new[dim..2 * dim].iter().all(|&v| v == 0.0), "{what}: the new track c's row is zero");
    }

    #[test]
    fn rows_carry_over_by_key_and_new_ones_keep_their_initialisation() {
        let (cfg, (old_inputs, old_ids), (new_inputs, new_ids)) = grown_catalogue();
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
        let reseeded = TrainConfig { seed: 99, ..cfg.clone() };
        let mut state = TrainingState::for_inputs(&reseeded, &new_inputs, &Device::Cpu).unwrap();
        let carried = apply(&mut state, &parent, &new_ids, &new_inputs).unwrap();
        let dim = cfg.encoder.embedding_size;
        let identity = state.tables.tables[0].as_ref().unwrap();
        let old_identity = parent_state.tables.tables[0].as_ref().unwrap();
        assert_rows_follow_their_keys(&identity.values, &old_identity.values, dim, "values");
        assert_eq!(
            carried,
            vec![
                CarriedOver { table: "track_embedding".into(), copied_rows: 2, new_rows: 1 },
                CarriedOver { table: "artist_embedding".into(), copied_rows: 3, new_rows: 1 },
                CarriedOver { table: "album_embedding".into(), copied_rows: 3, new_rows: 1 },
            ]
        );
        // New artist z and album C start as the parent's OOV rows (row 0), the others carry over.
        for (t, id, name) in [(1, TableId::Artist, "z"), (2, TableId::Album, "C")] {
            let new_row = row_keys(id, &new_ids, &new_inputs).iter().position(|k| k == name).unwrap();
            let (table, old) =
                (state.tables.tables[t].as_ref().unwrap(), parent_state.tables.tables[t].as_ref().unwrap());
            assert_eq!(table.row(new_row), old.row(0), "{}: the new row is the parent's OOV row", table.name);
            assert_ne!(old.row(0), old.row(1), "{}: a test that can tell rows apart", table.name);
        }
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
    fn optimizer_state_carries_over_by_key_with_its_step_counts() {
        let (cfg, (old_inputs, old_ids), (new_inputs, new_ids)) = grown_catalogue();
        let mut parent_state = TrainingState::for_inputs(&cfg, &old_inputs, &Device::Cpu).unwrap();
        let adam = parent_state.optimizer.state();
        let filled = |ts: &[Tensor], base: f64| -> Vec<Tensor> {
            ts.iter().enumerate().map(|(i, t)| (t.ones_like().unwrap() * (base + i as f64)).unwrap()).collect()
        };
        let carried = crate::training::optim::AdamState {
            first_moment: filled(&adam.first_moment, 1.0),
            second_moment: filled(&adam.second_moment, 100.0),
            step: 41,
        };
        parent_state.optimizer.restore(carried).unwrap();
        parent_state.tables.step = 17;
        for table in parent_state.tables.tables.iter_mut().flatten() {
            for (i, (m, v)) in table.first_moment.iter_mut().zip(table.second_moment.iter_mut()).enumerate() {
                (*m, *v) = (i as f32 + 0.5, i as f32 + 1000.0);
            }
        }
        let table_keys = parent_state
            .tables
            .tables
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| {
                let id = [TableId::Identity, TableId::Artist, TableId::Album][i];
                (t.name.to_string(), row_keys(id, &old_ids, &old_inputs))
            })
            .collect();
        let from = ParentOptimizer {
            origin: "run r's epoch 3".into(),
            checkpoint: crate::training::checkpoint::to_bytes(&parent_state, &cfg, "then").unwrap(),
            table_keys,
        };

        let mut state = TrainingState::for_inputs(&cfg, &new_inputs, &Device::Cpu).unwrap();
        apply_optimizer(&mut state, &from, &new_ids, &new_inputs).unwrap();
        let got = state.optimizer.state();
        assert_eq!(got.step, 41);
        assert_eq!(state.tables.step, 17);
        for (i, (m, v)) in got.first_moment.iter().zip(&got.second_moment).enumerate() {
            let (m, v): (Vec<f32>, Vec<f32>) =
                (m.flatten_all().unwrap().to_vec1().unwrap(), v.flatten_all().unwrap().to_vec1().unwrap());
            assert!(m.iter().all(|&x| x == 1.0 + i as f32), "first moment of tensor {i}");
            assert!(v.iter().all(|&x| x == 100.0 + i as f32), "second moment of tensor {i}");
        }
        let dim = cfg.encoder.embedding_size;
        let identity = state.tables.tables[0].as_ref().unwrap();
        let old_identity = parent_state.tables.tables[0].as_ref().unwrap();
        assert_rows_follow_their_keys(&identity.first_moment, &old_identity.first_moment, dim, "first moment");
        assert_rows_follow_their_keys(&identity.second_moment, &old_identity.second_moment, dim, "second moment");

        // A checkpoint whose table disagrees with the keys it came with is refused, not misread.
        let mut short = from;
        short.table_keys[0].1.pop();
        let err = apply_optimizer(&mut state, &short, &new_ids, &new_inputs).unwrap_err();
        assert!(format!("{err:#}").contains("moments have shape"), "{err:#}");
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
