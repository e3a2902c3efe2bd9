//! Embedding tables of the collaborative and hybrid kinds: track identity, artist and album rows,
//! summed into a track's pre-normalisation embedding.
//!
//! A track's table part is `I[t] + mean_{a ∈ artists(t)} A[a] + B[album(t)]` (each term only where
//! the kind has the table and the track has the input). The hybrid adds it to the content encoder's
//! output before L2 normalisation; the collaborative kind is `I[t]` alone.
//!
//! **Feature dropout.** In training, a row's identity term is dropped with probability
//! `identity_dropout` and its album term with `album_dropout`, whole terms and without rescaling:
//! a track no one has played has no identity at all (its row is never trained and stays zero),
//! so the model must learn to place tracks from audio, artists and album alone — and exactly that
//! input, not a rescaled one, is what a cold track presents at inference (DropoutNet's argument).
//!
//! **Sparse updates.** A batch touches a few hundred rows of tables that may hold millions, so
//! tables live on the host and each step builds a [`TableMix`] — the touched rows and, per batch
//! row, which of them it sums with which weight. The forward pass is a sparse gather, the backward
//! pass a scatter into `[touched, E]` gradients, and Adam updates only the touched rows (lazy Adam,
//! as TensorFlow's `LazyAdam`: moments of untouched rows are not decayed; the bias correction uses
//! the global step). Dense Adam would cost `rows × E` per step whatever the batch.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ModelKind;
use super::vocab::TrackInputs;
use crate::training::optim::{BETA1, BETA2, EPSILON};

/// Settings of the tables, part of a run's [`crate::training::trainer::TrainConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TableConfig {
    /// Probability that a training row's identity term is dropped (hybrid only).
    pub identity_dropout: f32,
    /// Probability that a training row's album term is dropped (hybrid only).
    pub album_dropout: f32,
    /// Catalogue tracks an artist or album needs for a row of its own (below: the OOV row).
    pub min_count: usize,
    /// Adam's learning rate for table rows (each row sees only the batches that touch it).
    pub learning_rate: f64,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self { identity_dropout: 0.5, album_dropout: 0.25, min_count: 2, learning_rate: 0.01 }
    }
}

/// One table: `rows × dim` values and their Adam moments, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: &'static str,
    pub rows: usize,
    pub dim: usize,
    pub values: Vec<f32>,
    pub first_moment: Vec<f32>,
    pub second_moment: Vec<f32>,
}

impl Table {
    fn new(name: &'static str, rows: usize, dim: usize, values: Vec<f32>) -> Self {
        debug_assert_eq!(values.len(), rows * dim);
        Self { name, rows, dim, values, first_moment: vec![0.0; rows * dim], second_moment: vec![0.0; rows * dim] }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.values[r * self.dim..(r + 1) * self.dim]
    }
}

/// Rows of all of a kind's tables for a catalogue (what [`Tables::new`] allocates).
pub fn table_rows(kind: ModelKind, inputs: &TrackInputs) -> usize {
    match kind {
        ModelKind::ContentBased => 0,
        ModelKind::Collaborative => inputs.num_tracks(),
        ModelKind::Hybrid => inputs.num_tracks() + inputs.artists.rows() + inputs.albums.rows(),
    }
}

/// Which table a [`TableMix`] or gradient belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableId {
    Identity = 0,
    Artist = 1,
    Album = 2,
}

/// Names of the tables (Keras' layer names for the export; the checkpoint's keys).
pub const TABLE_NAMES: [&str; 3] = ["track_embedding", "artist_embedding", "album_embedding"];

/// The tables of a kind (all `None` for the content kind) and the lazy-Adam step count.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tables {
    pub tables: [Option<Table>; 3],
    pub step: u64,
}

impl Tables {
    /// The kind's tables, initialised: the collaborative identity table uniformly in ±0.1 from
    /// `seed` (a zero row would have no direction to normalise), the hybrid's tables at zero (the
    /// content path gives every track a direction; an untrained row then adds nothing, which is
    /// what a cold track's identity must do).
    pub fn new(kind: ModelKind, inputs: &TrackInputs, dim: usize, seed: u64) -> Self {
        let mut tables: [Option<Table>; 3] = [None, None, None];
        let n = inputs.num_tracks();
        match kind {
            ModelKind::ContentBased => {}
            ModelKind::Collaborative => {
                // Its own stream: the run's generator (pairs, dropout) is unaffected by table sizes.
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7AB1_E500_0000_0007);
                let values = (0..n * dim).map(|_| rng.random_range(-0.1f32..0.1)).collect();
                tables[0] = Some(Table::new(TABLE_NAMES[0], n, dim, values));
            }
            ModelKind::Hybrid => {
                let sizes = [n, inputs.artists.rows(), inputs.albums.rows()];
                for (i, rows) in sizes.into_iter().enumerate() {
                    tables[i] = Some(Table::new(TABLE_NAMES[i], rows, dim, vec![0.0; rows * dim]));
                }
            }
        }
        Self { tables, step: 0 }
    }

    /// Zeroes the identity rows `learned` does not mark. Training never touches a track without
    /// training listens, so its row stays exactly what it starts as: zero, the collaborative kind's
    /// "no learned row", in the table, its embedding and every export alike.
    pub fn zero_unlearned_identity(&mut self, learned: &[bool]) {
        let Some(table) = self.tables[TableId::Identity as usize].as_mut() else { return };
        for (row, _) in table.values.chunks_exact_mut(table.dim).zip(learned).filter(|(_, l)| !**l) {
            row.fill(0.0);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(Option::is_none)
    }

    pub fn get(&self, id: TableId) -> Option<&Table> {
        self.tables[id as usize].as_ref()
    }

    /// The tables' width (`None` for the content kind, which has none).
    fn dim(&self) -> Option<usize> {
        self.tables.iter().flatten().map(|t| t.dim).next()
    }

    /// The table part of each of a batch's `rows` rows (`[rows, dim]`): the sum of `mixes`' terms.
    pub fn mixed(&self, mixes: &[Option<TableMix>; 3], rows: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * self.dim().unwrap_or(0)];
        for (mix, table) in mixes.iter().zip(&self.tables) {
            if let (Some(mix), Some(table)) = (mix, table) {
                mix.add_forward(table, &mut out);
            }
        }
        out
    }

    /// Adds every track's table part (no dropout: inference) to `out` (`[num_tracks, dim]`).
    pub fn add_all(&self, inputs: &TrackInputs, out: &mut [f32]) {
        let Some(dim) = self.dim() else { return };
        for (t, row) in out.chunks_exact_mut(dim).enumerate() {
            for_each_term(inputs, t, true, true, |id, r, w| {
                if let Some(table) = self.get(id) {
                    row.iter_mut().zip(table.row(r as usize)).for_each(|(o, v)| *o += w * v);
                }
            });
        }
    }

    /// Lazy Adam on the rows `mix` touched, from `gradients[table]` (`[touched, dim]`, as
    /// [`TableMix::gradients`] returns them).
    pub fn step(&mut self, mixes: &[Option<TableMix>; 3], gradients: &[Option<Vec<f32>>; 3], learning_rate: f64) {
        self.step += 1;
        let t = self.step as i32;
        let alpha = (learning_rate * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t))) as f32;
        let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPSILON as f32);
        let (c1, c2) = ((1.0 - BETA1) as f32, (1.0 - BETA2) as f32);
        for ((table, mix), grad) in self.tables.iter_mut().zip(mixes).zip(gradients) {
            let (Some(table), Some(mix), Some(grad)) = (table, mix, grad) else { continue };
            let d = table.dim;
            for (&row, g) in mix.rows.iter().zip(grad.chunks_exact(d)) {
                let range = row as usize * d..(row as usize + 1) * d;
                let theta = &mut table.values[range.clone()];
                let m = &mut table.first_moment[range.clone()];
                let v = &mut table.second_moment[range];
                for (((theta, m), v), &g) in theta.iter_mut().zip(m).zip(v).zip(g) {
                    *m = b1 * *m + c1 * g;
                    *v = b2 * *v + c2 * (g * g);
                    *theta -= (*m * alpha) / (v.sqrt() + eps);
                }
            }
        }
    }
}

/// Calls `f(table, row, weight)` for each term of track `t`'s table part: identity (when
/// `identity`), each artist with weight `1/artists`, album (when `album`).
fn for_each_term(inputs: &TrackInputs, t: usize, identity: bool, album: bool, mut f: impl FnMut(TableId, u32, f32)) {
    if identity {
        f(TableId::Identity, t as u32, 1.0);
    }
    let artists = inputs.artist_rows(t);
    for &a in artists {
        f(TableId::Artist, a, 1.0 / artists.len() as f32);
    }
    if album && let Some(b) = inputs.album_row(t) {
        f(TableId::Album, b, 1.0);
    }
}

/// Which rows of a training batch keep their identity and album terms.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDropout {
    pub keep_identity: Vec<bool>,
    pub keep_album: Vec<bool>,
}

impl TableDropout {
    /// Draws the keep flags of `rows` batch rows from `rng` (identity first, then album), one `u32`
    /// per flag compared as the dense masks are (`(u >> 8) < p·2²⁴` drops). Nothing is drawn for
    /// a kind without the hybrid's dropout, so the content kind's random stream is unchanged.
    pub fn sample(kind: ModelKind, config: &TableConfig, rows: usize, rng: &mut ChaCha8Rng) -> Self {
        if kind != ModelKind::Hybrid {
            return Self { keep_identity: vec![true; rows], keep_album: vec![true; rows] };
        }
        let mut draw = |p: f32| -> Vec<bool> {
            if p <= 0.0 {
                return vec![true; rows];
            }
            let threshold = p * 16_777_216.0;
            let mut words = vec![0u32; rows];
            rng.fill(&mut words[..]);
            words.iter().map(|&u| ((u >> 8) as f32) >= threshold).collect()
        };
        let keep_identity = draw(config.identity_dropout);
        Self { keep_identity, keep_album: draw(config.album_dropout) }
    }

    /// Every term kept (validation and checks).
    pub fn none(rows: usize) -> Self {
        Self { keep_identity: vec![true; rows], keep_album: vec![true; rows] }
    }
}

/// One table's part of a batch: the rows it touches, and per batch row which of them it sums.
#[derive(Debug, Clone, PartialEq)]
pub struct TableMix {
    /// Touched rows, ascending and distinct.
    pub rows: Vec<u32>,
    /// CSR over batch rows: batch row `r` sums `weight[k]·table[rows[local[k]]]` for `k` in
    /// `offsets[r]..offsets[r + 1]`.
    offsets: Vec<u32>,
    local: Vec<u32>,
    weight: Vec<f32>,
}

impl TableMix {
    /// The mixes of the batch's tracks (`tracks[r]` is batch row `r`), one per table the model has.
    pub fn build(tables: &Tables, inputs: &TrackInputs, tracks: &[u32], dropout: &TableDropout) -> [Option<Self>; 3] {
        let mut entries: [Vec<(u32, u32, f32)>; 3] = Default::default();
        for (r, &t) in tracks.iter().enumerate() {
            for_each_term(inputs, t as usize, dropout.keep_identity[r], dropout.keep_album[r], |id, row, w| {
                entries[id as usize].push((r as u32, row, w));
            });
        }
        let mut out: [Option<Self>; 3] = [None, None, None];
        for (i, entries) in entries.into_iter().enumerate() {
            if tables.tables[i].is_some() {
                out[i] = Some(Self::from_entries(tracks.len(), entries));
            }
        }
        out
    }

    /// From `(batch row, table row, weight)` in batch-row order.
    fn from_entries(batch_rows: usize, entries: Vec<(u32, u32, f32)>) -> Self {
        let mut rows: Vec<u32> = entries.iter().map(|e| e.1).collect();
        rows.sort_unstable();
        rows.dedup();
        let mut offsets = vec![0u32; batch_rows + 1];
        for &(r, _, _) in &entries {
            offsets[r as usize + 1] += 1;
        }
        for r in 0..batch_rows {
            offsets[r + 1] += offsets[r];
        }
        let local = entries.iter().map(|e| rows.binary_search(&e.1).expect("a touched row") as u32).collect();
        let weight = entries.iter().map(|e| e.2).collect();
        Self { rows, offsets, local, weight }
    }

    fn terms(&self, r: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let range = self.offsets[r] as usize..self.offsets[r + 1] as usize;
        self.local[range.clone()].iter().map(|&l| l as usize).zip(self.weight[range].iter().copied())
    }

    /// Adds each batch row's terms to `out` (`[batch rows, dim]`).
    pub fn add_forward(&self, table: &Table, out: &mut [f32]) {
        let d = table.dim;
        for (r, row) in out.chunks_exact_mut(d).enumerate() {
            for (l, w) in self.terms(r) {
                row.iter_mut().zip(table.row(self.rows[l] as usize)).for_each(|(o, v)| *o += w * v);
            }
        }
    }

    /// The gradient of the touched rows (`[touched, dim]`) given the gradient at the batch's
    /// pre-normalisation embeddings `ds` (`[batch rows, dim]`).
    pub fn gradients(&self, ds: &[f32], dim: usize) -> Vec<f32> {
        let mut grad = vec![0.0f32; self.rows.len() * dim];
        for (r, g) in ds.chunks_exact(dim).enumerate() {
            for (l, w) in self.terms(r) {
                grad[l * dim..(l + 1) * dim].iter_mut().zip(g).for_each(|(o, v)| *o += w * v);
            }
        }
        grad
    }

    /// The touched rows as a `[touched, dim]` tensor and the mixing matrix `[batch rows, touched]`
    /// (the autograd path: `out = M·rows`, so the gradient of `rows` is `Mᵀ·ds`).
    pub fn tensors(&self, table: &Table, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let (d, u, n) = (table.dim, self.rows.len(), self.offsets.len() - 1);
        let gathered: Vec<f32> = self.rows.iter().flat_map(|&r| table.row(r as usize).iter().copied()).collect();
        let mut mixing = vec![0.0f32; n * u];
        for r in 0..n {
            for (l, w) in self.terms(r) {
                mixing[r * u + l] += w;
            }
        }
        Ok((Tensor::from_vec(gathered, (u, d), device)?, Tensor::from_vec(mixing, (n, u), device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tags::TrackTags;

    fn inputs() -> TrackInputs {
        let mut tags = TrackTags::default();
        tags.push(["A", "B"], Some("X"));
        tags.push(["A"], Some("X"));
        tags.push(["B"], None);
        tags.push([], Some("Y"));
        TrackInputs::build(&tags, 1)
    }

    fn filled(kind: ModelKind) -> Tables {
        let inputs = inputs();
        let mut tables = Tables::new(kind, &inputs, 2, 1);
        for (i, table) in tables.tables.iter_mut().flatten().enumerate() {
            table.values.iter_mut().enumerate().for_each(|(j, v)| *v = (i * 100 + j) as f32);
        }
        tables
    }

    #[test]
    fn a_batch_sums_identity_mean_artist_and_album_and_dropout_removes_whole_terms() {
        let tables = filled(ModelKind::Hybrid);
        let inputs = inputs();
        // Artist rows: A = 1, B = 2 (row 0 is OOV); album rows: X = 1, Y = 2.
        let dropout = TableDropout { keep_identity: vec![true, false, true], keep_album: vec![true, true, false] };
        let mixes = TableMix::build(&tables, &inputs, &[0, 0, 3], &dropout);
        assert!(mixes.iter().all(Option::is_some), "the hybrid has all three tables");
        let out = tables.mixed(&mixes, 3);
        let row = |id: TableId, r: usize| tables.get(id).unwrap().row(r).to_vec();
        let expect = |terms: &[(TableId, usize, f32)]| -> Vec<f32> {
            (0..2).map(|j| terms.iter().map(|&(id, r, w)| w * row(id, r)[j]).sum()).collect()
        };
        use TableId::*;
        assert_eq!(out[0..2], expect(&[(Identity, 0, 1.0), (Artist, 1, 0.5), (Artist, 2, 0.5), (Album, 1, 1.0)]));
        assert_eq!(out[2..4], expect(&[(Artist, 1, 0.5), (Artist, 2, 0.5), (Album, 1, 1.0)]), "identity dropped");
        assert_eq!(out[4..6], expect(&[(Identity, 3, 1.0)]), "no artists; album dropped");
        assert_eq!(mixes[0].as_ref().unwrap().rows, [0, 3]);
        assert_eq!(mixes[1].as_ref().unwrap().rows, [1, 2]);
    }

    #[test]
    fn gradients_scatter_back_with_the_forward_weights_and_match_the_mixing_matrix() {
        let tables = filled(ModelKind::Hybrid);
        let mixes = TableMix::build(&tables, &inputs(), &[0, 1, 2, 0], &TableDropout::none(4));
        let ds: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
        for (mix, table) in mixes.iter().zip(&tables.tables) {
            let (mix, table) = (mix.as_ref().unwrap(), table.as_ref().unwrap());
            let grad = mix.gradients(&ds, 2);
            let (_, m) = mix.tensors(table, &Device::Cpu).unwrap();
            let ds_t = Tensor::from_vec(ds.clone(), (4, 2), &Device::Cpu).unwrap();
            let expected = m.t().unwrap().matmul(&ds_t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(grad, expected, "{}", table.name);
        }
    }

    #[test]
    fn lazy_adam_moves_only_touched_rows() {
        let mut tables = filled(ModelKind::Hybrid);
        let before = tables.clone();
        let mixes = TableMix::build(&tables, &inputs(), &[2], &TableDropout::none(1));
        let grads = [0, 1, 2].map(|i| mixes[i].as_ref().map(|m| vec![1.0f32; m.rows.len() * 2]));
        tables.step(&mixes, &grads, 0.1);
        let identity = (tables.get(TableId::Identity).unwrap(), before.get(TableId::Identity).unwrap());
        for r in 0..4 {
            assert_eq!(identity.0.row(r) != identity.1.row(r), r == 2, "identity row {r}");
        }
        // Track 2: artist B (row 2) only, no album.
        let artist = (tables.get(TableId::Artist).unwrap(), before.get(TableId::Artist).unwrap());
        assert!(artist.0.row(2).iter().zip(artist.1.row(2)).all(|(a, b)| (b - a - 0.1).abs() < 1e-5));
        assert_eq!(artist.0.row(1), artist.1.row(1));
        assert_eq!(tables.get(TableId::Album).unwrap(), before.get(TableId::Album).unwrap());
    }

    #[test]
    fn identity_dropout_drops_about_its_rate_and_only_for_the_hybrid() {
        let config = TableConfig { identity_dropout: 0.5, album_dropout: 0.2, ..TableConfig::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let d = TableDropout::sample(ModelKind::Hybrid, &config, 10_000, &mut rng);
        let dropped = |k: &[bool]| k.iter().filter(|k| !**k).count() as f64 / k.len() as f64;
        assert!((dropped(&d.keep_identity) - 0.5).abs() < 0.02, "{}", dropped(&d.keep_identity));
        assert!((dropped(&d.keep_album) - 0.2).abs() < 0.02, "{}", dropped(&d.keep_album));
        let mut untouched = ChaCha8Rng::seed_from_u64(4);
        let c = TableDropout::sample(ModelKind::Collaborative, &config, 100, &mut untouched);
        assert!(c.keep_identity.iter().all(|k| *k));
        assert_eq!(untouched.random::<u64>(), ChaCha8Rng::seed_from_u64(4).random::<u64>(), "nothing drawn");
    }
}
