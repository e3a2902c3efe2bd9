//! The version's similar-tracks table, and how far it moved from the parent version's.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use tracing::{info, info_span, warn};

use super::BlockingRun;
use crate::data::Dataset;
use crate::publish::artifacts::NeighbourSummary;
use crate::publish::layout;
use crate::publish::store::StoreError;
use crate::training::neighbours::{self, HnswSettings, Method, Neighbours};

/// Neighbours compared with the parent's: the first 10 of each track.
const JACCARD_AT: usize = 10;

/// A published version's neighbour table with the track ids its rows stand for.
struct ParentTable {
    version: String,
    track_ids: Vec<String>,
    table: Neighbours,
}

impl BlockingRun {
    /// The top-K table of `embeddings` (exact, or approximate as the run's `neighbour_index` says)
    /// among the tracks that have one (`learned`, for the collaborative kind), with its Jaccard@10
    /// against the version `latest.json` names. `None` when the run asks for no table (K = 0).
    pub(super) fn neighbour_table(
        &self,
        embeddings: &Tensor,
        learned: Option<&[bool]>,
        dataset: &Dataset,
    ) -> anyhow::Result<Option<(Neighbours, NeighbourSummary)>> {
        let k = self.record.config.neighbours;
        if k == 0 {
            return Ok(None);
        }
        let _span = info_span!("neighbour_table", k).entered();
        let started = Instant::now();
        let cores = crate::system::cores::cores();
        let (table, method, on_device) = neighbours::build(embeddings, k, learned, self.record.config.neighbour_index)?;
        let seconds = started.elapsed().as_secs_f64();
        let tracks_listed = (0..table.num_tracks()).filter(|&t| table.is_listed(t)).count();
        let mut summary = NeighbourSummary {
            k,
            tracks_listed,
            seconds,
            method,
            hnsw: (method == Method::Hnsw).then_some(HnswSettings::DEFAULT),
            parent_version: None,
            jaccard_at_10_vs_parent: None,
            tracks_compared: None,
        };
        match self.parent_table() {
            Ok(Some(parent)) => {
                let ours: HashMap<&str, u32> =
                    dataset.catalogue.track_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i as u32)).collect();
                let theirs: HashMap<&str, usize> =
                    parent.track_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
                let parent_row = |t: usize| theirs.get(dataset.catalogue.track_ids[t].as_str()).copied();
                let our_row = |i: u32| parent.track_ids.get(i as usize).and_then(|id| ours.get(id.as_str()).copied());
                // Only tracks listed in both: a track new to this version (or newly learned) has
                // no earlier list to have changed from.
                let both = |t: usize| parent_row(t).filter(|&p| table.is_listed(t) && parent.table.is_listed(p));
                let change = table.mean_jaccard(&parent.table, JACCARD_AT, both, our_row);
                summary.jaccard_at_10_vs_parent = change.map(|(jaccard, _)| jaccard);
                summary.tracks_compared = Some(change.map_or(0, |(_, tracks)| tracks));
                summary.parent_version = Some(parent.version);
            }
            Ok(None) => {}
            // The comparison informs; it must not fail a run whose table is built.
            Err(e) => {
                warn!(error.message = %format!("{e:#}"), "the parent version's neighbour table could not be read")
            }
        }
        info!(
            seconds,
            cores,
            on_device,
            tracks_listed,
            method = ?method,
            parent_version = summary.parent_version.as_deref().unwrap_or(""),
            jaccard_at_10_vs_parent = summary.jaccard_at_10_vs_parent.unwrap_or(f64::NAN),
            "neighbour table built"
        );
        Ok(Some((table, summary)))
    }

    /// The neighbour table of the version `latest.json` names: `None` for a first version, a
    /// retried publish of this very version, or a parent published before versions had tables.
    fn parent_table(&self) -> anyhow::Result<Option<ParentTable>> {
        let Some(latest) = self.other_latest()? else { return Ok(None) };
        let get = |name: &str| self.version_file(&latest.version, name);
        let bytes = match get(layout::NEIGHBOURS) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let metadata = self.version_metadata(&latest.version)?;
        let track_ids: Vec<String> = serde_json::from_value(metadata["track_ids"].clone())
            .with_context(|| format!("version {}'s metadata has no track_ids", latest.version))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let get_tensor = |name: &str| {
            tensors.get(name).with_context(|| format!("version {}'s neighbour table has no `{name}`", latest.version))
        };
        let indices = get_tensor("indices")?;
        let (rows, k) = indices.dims2()?;
        anyhow::ensure!(
            rows == track_ids.len(),
            "version {} lists neighbours of {rows} of its {} tracks",
            latest.version,
            track_ids.len()
        );
        let table = Neighbours {
            k,
            indices: indices.flatten_all()?.to_vec1()?,
            cosines: get_tensor("cosines")?.flatten_all()?.to_vec1()?,
        };
        Ok(Some(ParentTable { version: latest.version, track_ids, table }))
    }
}
