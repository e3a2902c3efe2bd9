use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::data::Dataset;
use crate::data::features::NUM_FEATURES;
use crate::training::model::{EncoderConfig, ModelKind};
use crate::training::pairs::SamplingConfig;

/// Autograd gradients of the full training loss (BatchNorm in training mode, fixed dropout
/// masks, L2 normalisation, masked in-batch softmax, logQ) against central finite differences,
/// in f64 on a tiny model.
fn check_gradients(kind: LossKind, logq: bool) {
    let device = Device::Cpu;
    let config = EncoderConfig { embedding_size: 3, dropout: 0.2 };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let encoder = Encoder::new(config, &mut rng, &device, DType::F64).unwrap();
    // Random values everywhere (biases, gamma and beta included) keep the check away from
    // degenerate points such as an all-zero output row, where L2 normalisation has no gradient.
    let mut uniform = |shape: &[usize]| {
        let values: Vec<f64> = (0..shape.iter().product()).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &device).unwrap()
    };
    for var in encoder.trainable() {
        var.set(&uniform(var.dims())).unwrap();
    }
    let n_tracks = 9;
    let features = uniform(&[n_tracks, NUM_FEATURES]);
    // Track 4 appears twice as a partner: an accidental hit the mask must handle.
    let ta = Tensor::new(&[0u32, 1, 2, 3, 5], &device).unwrap();
    let tb = Tensor::new(&[4u32, 4, 6, 7, 8], &device).unwrap();
    let masks = DropoutMasks::sample(&config, 10, &mut rng, &device, DType::F64).unwrap();
    let lq = Tensor::new(&[-1.0f64, -2.0, -2.5, -1.5, -0.5, -3.0, -2.0, -1.0, -2.2], &device).unwrap();
    let loss_config = LossConfig { kind, temperature: 0.3, logq_correction: logq, centering_weight: 0.7 };
    let lq = logq.then_some(&lq);
    let loss_at = |enc: &Encoder| training_loss(enc, &features, &ta, &tb, &masks, &loss_config, lq).unwrap().0;
    let grads = loss_at(&encoder).backward().unwrap();
    let h = 1e-6;
    for (name, var) in crate::training::model::TRAINABLE_NAMES.iter().zip(encoder.trainable()) {
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.as_detached_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Up to 12 coordinates per tensor keep the test fast.
        let step = (base.len() / 12).max(1);
        for i in (0..base.len()).step_by(step) {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &device).unwrap()).unwrap();
                let l = loss_at(&encoder).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &device).unwrap()).unwrap();
                l
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic[i].abs());
            assert!(
                (numeric - analytic[i]).abs() < tol,
                "{kind:?} logq={logq} {name}[{i}]: autograd {} vs finite differences {numeric}",
                analytic[i]
            );
        }
    }
}

#[test]
fn contrastive_gradients_match_finite_differences() {
    check_gradients(LossKind::Contrastive, false);
}

#[test]
fn logq_contrastive_gradients_match_finite_differences() {
    check_gradients(LossKind::Contrastive, true);
}

#[test]
fn cosine_gradients_match_finite_differences() {
    check_gradients(LossKind::Cosine, false);
}

/// Stops after `stop_after` batches (counting from the start of the run), at a batch boundary.
struct StopAt {
    batches: usize,
    stop_after: usize,
    interrupted: Option<Vec<u8>>,
    config: TrainConfig,
}

impl TrainObserver for StopAt {
    fn batch_finished(&mut self, _pairs: usize) -> Control {
        self.batches += 1;
        if self.batches == self.stop_after { Control::Stop } else { Control::Continue }
    }
    fn epoch_finished(&mut self, _: &TrainingState, _: &EpochMetrics) -> anyhow::Result<Control> {
        Ok(Control::Continue)
    }
    fn interrupted(&mut self, state: &TrainingState) -> anyhow::Result<()> {
        self.interrupted = Some(crate::training::checkpoint::to_bytes(state, &self.config, "t")?);
        Ok(())
    }
}

/// Every tensor of the state by name: the encoder's, then each table's values.
fn weights(state: &TrainingState) -> Vec<(String, Vec<f32>)> {
    let encoder = state.encoder.named_tensors().into_iter();
    let encoder = encoder.map(|(n, t)| (n.to_string(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()));
    let tables = state.tables.tables.iter().flatten().map(|t| (t.name.to_string(), t.values.clone()));
    encoder.chain(tables).collect()
}

const KINDS: [ModelKind; 3] = [ModelKind::ContentBased, ModelKind::Collaborative, ModelKind::Hybrid];

/// [`small_run`] for a model kind.
fn small_run_of(kind: ModelKind) -> (Dataset, TrainConfig) {
    let (dataset, config) = small_run();
    let tables = (!kind.is_content())
        .then(|| crate::training::model::tables::TableConfig { learning_rate: 0.05, ..Default::default() });
    (dataset, TrainConfig { model_kind: kind, tables, ..config })
}

/// A small synthetic dataset and a run over it of a few dozen batches per epoch.
fn small_run() -> (Dataset, TrainConfig) {
    let spec = crate::data::source::SyntheticSpec { tracks: 300, users: 40, interactions: 2_000, genres: 4, seed: 3 };
    let dataset = crate::data::synthetic::generate(&spec);
    let config = TrainConfig {
        epochs: 2,
        batch_size: 16,
        validation_split: 0.2,
        learning_rate: 1e-2,
        encoder: EncoderConfig { embedding_size: 8, dropout: 0.2 },
        loss: LossConfig {
            kind: LossKind::Contrastive,
            temperature: 0.1,
            logq_correction: true,
            centering_weight: 1.0,
        },
        sampling: SamplingConfig::default(),
        positive_kinds: crate::training::pairs::DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
        seed: 5,
        eval_users: 20,
        max_validation_pairs: 100,
        holdout: Holdout::Random,
        patience: 0,
        min_delta: 0.0,
        model_kind: Default::default(),
        tables: None,
        cold_tracks: 0.0,
        neighbours: crate::training::neighbours::DEFAULT_K,
        neighbour_index: crate::training::neighbours::IndexChoice::Auto,
    };
    (dataset, config)
}

/// On the CPU the fused step trains; the autograd step (what a GPU runs) must train the same
/// model, up to float rounding: the same pairs, masks and updates, step by step.
#[test]
fn the_autograd_step_trains_the_same_model_as_the_fused_one() {
    for kind in KINDS {
        let (dataset, config) = small_run_of(kind);
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let train = |trainer: Trainer| {
            let mut state = trainer.fresh_state(&Device::Cpu).unwrap();
            let mut never = StopAt { batches: 0, stop_after: usize::MAX, interrupted: None, config: config.clone() };
            assert!(trainer.run(&mut state, &mut never).unwrap());
            (weights(&state), state.history.loss)
        };
        let fused = Trainer::new(&config, &data).unwrap();
        assert_eq!(fused.step_name(), "fused");
        let autograd = Trainer::new(&config, &data).unwrap().use_autograd();
        assert_eq!(autograd.step_name(), "autograd");
        let initial = weights(&fused.fresh_state(&Device::Cpu).unwrap());
        let ((fused_weights, fused_loss), (autograd_weights, autograd_loss)) = (train(fused), train(autograd));
        assert_eq!(fused_weights.len(), initial.len());
        for (((name, f), (_, a)), (_, i)) in fused_weights.iter().zip(&autograd_weights).zip(&initial) {
            let table = name.ends_with("_embedding");
            if kind == ModelKind::Collaborative && !table {
                assert!(f == i && a == i, "{kind:?}: the unused encoder tensor {name} moved");
                continue;
            }
            let moved = a.iter().zip(i).fold(0.0f32, |m, (a, i)| m.max((a - i).abs()));
            let apart = f.iter().zip(a).fold(0.0f32, |m, (f, a)| m.max((f - a).abs()));
            assert!(
                moved > 1e-3 && apart < 1e-2 * moved,
                "{kind:?} {name}: moved {moved}, the two steps {apart} apart"
            );
        }
        for (f, a) in fused_loss.iter().zip(&autograd_loss) {
            assert!((f - a).abs() < 1e-4 * a.abs(), "{kind:?}: epoch losses {fused_loss:?} vs {autograd_loss:?}");
        }
    }
}

#[test]
fn a_run_stopped_inside_an_epoch_resumes_to_exactly_the_uninterrupted_model() {
    for kind in KINDS {
        let (dataset, config) = small_run_of(kind);
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let trainer = Trainer::new(&config, &data).unwrap();
        let steps_per_epoch = trainer.pairs_per_epoch().div_ceil(config.batch_size);
        assert!(steps_per_epoch > 10, "{steps_per_epoch}");

        let mut straight = trainer.fresh_state(&Device::Cpu).unwrap();
        let mut never = StopAt { batches: 0, stop_after: usize::MAX, interrupted: None, config: config.clone() };
        assert!(trainer.run(&mut straight, &mut never).unwrap());

        // Stop 5 batches into the second epoch, checkpoint, restore into a fresh state, finish.
        let mut first = trainer.fresh_state(&Device::Cpu).unwrap();
        let stop_after = steps_per_epoch + 5;
        let mut stopper = StopAt { batches: 0, stop_after, interrupted: None, config: config.clone() };
        assert!(!trainer.run(&mut first, &mut stopper).unwrap());
        assert_eq!(first.epoch, 1);
        assert_eq!(first.cursor.as_ref().unwrap().next_step, 5);
        let bytes = stopper.interrupted.expect("a partial checkpoint");
        let mut resumed = trainer.fresh_state(&Device::Cpu).unwrap();
        crate::training::checkpoint::restore(&bytes, &mut resumed, &config).unwrap();
        assert_eq!(resumed.cursor, first.cursor);
        assert_eq!(resumed.tables, first.tables, "{kind:?}: tables, moments and step restored");
        assert!(trainer.run(&mut resumed, &mut never).unwrap());

        assert_eq!(
            weights(&resumed),
            weights(&straight),
            "{kind:?}: resumed weights differ from the uninterrupted run"
        );
        assert_eq!(resumed.history.loss, straight.history.loss);
        assert_eq!(resumed.history.recall_at_10, straight.history.recall_at_10);
    }
}

#[test]
fn the_best_epoch_is_the_first_to_reach_the_best_recall_by_more_than_min_delta() {
    let curve = [0.10, 0.14, 0.15, 0.149, 0.1505, 0.12];
    assert_eq!(best_epoch(&curve, 0.0), Some(5));
    // 0.1505 beats 0.15 by less than 0.001: epoch 3 stays the best.
    assert_eq!(best_epoch(&curve, 0.001), Some(3));
    assert_eq!(best_epoch(&[], 0.0), None);
    // A tie is no improvement: the first epoch to reach it is kept.
    assert_eq!(best_epoch(&[0.2, 0.2, 0.2], 0.0), Some(1));
}

#[test]
fn early_stopping_stops_patience_epochs_after_the_planted_peak() {
    // Peak at epoch 4, then a plateau just under it.
    let curve = [0.05, 0.08, 0.10, 0.12, 0.119, 0.118, 0.1195, 0.117, 0.116];
    let stopped_at = (1..=curve.len()).find(|&n| should_stop_early(&curve[..n], 3, 0.0));
    assert_eq!(stopped_at, Some(7), "epoch 4 + patience 3");
    assert!((1..=curve.len()).all(|n| !should_stop_early(&curve[..n], 0, 0.0)), "patience 0 never stops");
    // Creeping gains: with min_delta 0 every epoch is the best and the run never stops; with
    // 0.025 only epoch 2 (0.08 > 0.05 + 0.025) counts, and patience 3 stops it at epoch 5.
    let creeping = [0.05, 0.08, 0.10, 0.101, 0.102, 0.103, 0.104];
    assert!((1..=creeping.len()).all(|n| !should_stop_early(&creeping[..n], 3, 0.0)));
    assert_eq!(best_epoch(&creeping, 0.025), Some(2));
    let stopped_at = (1..=creeping.len()).find(|&n| should_stop_early(&creeping[..n], 3, 0.025));
    assert_eq!(stopped_at, Some(5));
}

/// With cold tracks held out, training never touches their identity rows (they stay zero), the
/// hybrid still embeds them from audio, artists and album, and the cold evaluation ranks only them;
/// the collaborative kind has nothing to rank them with.
#[test]
fn cold_tracks_are_never_trained_on_yet_the_hybrid_embeds_and_ranks_them() {
    for kind in [ModelKind::Hybrid, ModelKind::Collaborative] {
        let (dataset, config) = small_run_of(kind);
        let config = TrainConfig { cold_tracks: 0.2, ..config };
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let cold = data.cold.as_ref().unwrap();
        let cold_tracks: Vec<usize> = (0..data.num_tracks()).filter(|&t| cold.is_cold[t]).collect();
        assert_eq!(cold_tracks.len(), 60, "20 % of 300");
        assert!(!cold.heldout.is_empty());
        assert!(cold_tracks.iter().all(|&t| data.track_counts[t] == 0), "no training listen of a cold track");
        let trainer = Trainer::new(&config, &data).unwrap();
        let mut state = trainer.fresh_state(&Device::Cpu).unwrap();
        let mut never = StopAt { batches: 0, stop_after: usize::MAX, interrupted: None, config: config.clone() };
        assert!(trainer.run(&mut state, &mut never).unwrap());
        let embeddings = trainer.embed(&state).unwrap();
        let rows = embeddings.to_vec2::<f32>().unwrap();
        let cold_metrics = trainer.evaluate_cold(&embeddings).unwrap();
        let identity = state.tables.get(crate::training::model::tables::TableId::Identity).unwrap();
        match kind {
            ModelKind::Hybrid => {
                let identity_before = trainer.fresh_state(&Device::Cpu).unwrap();
                let identity_before =
                    identity_before.tables.get(crate::training::model::tables::TableId::Identity).unwrap();
                for &t in &cold_tracks {
                    assert_eq!(identity.row(t), identity_before.row(t), "cold track {t}'s identity row moved");
                    let norm: f32 = rows[t].iter().map(|v| v * v).sum();
                    assert!((norm - 1.0).abs() < 1e-4, "cold track {t} has an embedding: norm² {norm}");
                }
                let m = cold_metrics.expect("the hybrid ranks cold tracks");
                assert!(m.heldout <= cold.heldout.len(), "{m:?}");
                assert!(m.heldout > 0 && m.recall_at_10 > 0.0, "{m:?}");
                assert_eq!(state.history.recall_at_10.len(), config.epochs);
            }
            _ => {
                assert!(cold_metrics.is_none(), "no row, no ranking");
                for &t in &cold_tracks {
                    assert!(rows[t].iter().all(|v| *v == 0.0), "an unlearned row is published as zeros");
                }
                assert!(trainer.learned_rows().unwrap().iter().filter(|l| **l).count() < data.num_tracks());
            }
        }
    }
}

#[test]
fn baselines_beside_training_give_up_at_a_stop_and_otherwise_match() {
    let (dataset, config) = small_run_of(ModelKind::Hybrid);
    let config = TrainConfig { cold_tracks: 0.2, ..config };
    let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
    let trainer = Trainer::new(&config, &data).unwrap();
    let all = trainer.baselines().unwrap();
    assert_eq!(trainer.baselines_unless(&|| false).unwrap(), Some(all));
    // A stop asked before the first baseline, or before any later one (four cold, six warm, and
    // item-CF asks once per chunk of users: at least ten asks), even the last: nothing is returned.
    for asks_before_stop in [0, 1, 4, 6, 9] {
        let asks = std::sync::atomic::AtomicUsize::new(0);
        let stop = || asks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= asks_before_stop;
        assert_eq!(trainer.baselines_unless(&stop).unwrap(), None, "stop after {asks_before_stop} asks");
    }
}

/// Trains `trainer` from a fresh state, stopping after `stop_after` batches and resuming from the
/// checkpoint when that is inside the run; returns the final weights and epoch losses.
fn train_resuming(trainer: &Trainer, config: &TrainConfig, stop_after: usize) -> (Vec<(String, Vec<f32>)>, Vec<f64>) {
    let mut state = trainer.fresh_state(&Device::Cpu).unwrap();
    let mut stopper = StopAt { batches: 0, stop_after, interrupted: None, config: config.clone() };
    if !trainer.run(&mut state, &mut stopper).unwrap() {
        let bytes = stopper.interrupted.expect("a partial checkpoint");
        state = trainer.fresh_state(&Device::Cpu).unwrap();
        crate::training::checkpoint::restore(&bytes, &mut state, config).unwrap();
        let mut never = StopAt { batches: 0, stop_after: usize::MAX, interrupted: None, config: config.clone() };
        assert!(trainer.run(&mut state, &mut never).unwrap());
    }
    (weights(&state), state.history.loss.clone())
}

fn assert_close_losses(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-6 * y.abs(), "{what}: epoch losses {a:?} vs {b:?}");
    }
}

/// The device path (what a GPU runs) on the CPU: without dropout it draws nothing, so it must
/// train exactly the autograd reference path's model whether the loss is read every step or every
/// 7, through a stop that leaves losses pending, with pair indices uploaded once per epoch.
#[test]
fn the_device_path_trains_the_reference_model_however_often_it_reads_the_loss() {
    for kind in KINDS {
        let (dataset, mut config) = small_run_of(kind);
        config.encoder.dropout = 0.0;
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let reference = Trainer::new(&config, &data).unwrap().use_autograd();
        let steps_per_epoch = reference.pairs_per_epoch().div_ceil(config.batch_size);
        let (weights_ref, loss_ref) = train_resuming(&reference, &config, usize::MAX);
        let every = |n| DevicePath { loss_readback_steps: n, ..DevicePath::device() };
        for (path, stop_after) in [(every(1), usize::MAX), (every(7), usize::MAX), (every(7), steps_per_epoch + 5)] {
            let trainer = Trainer::new(&config, &data).unwrap().use_device_path(path);
            let (w, loss) = train_resuming(&trainer, &config, stop_after);
            let what = format!("{kind:?}, loss read every {} steps, stop after {stop_after}", path.loss_readback_steps);
            assert_eq!(w, weights_ref, "{what}: weights");
            assert_close_losses(&loss, &loss_ref, &what);
        }
    }
}

/// With dropout, the device path draws its masks on the device (on the CPU: candle's unseeded
/// generator, so two runs of a kind with content differ, where the seeded host masks would make
/// them equal); every kind still trains: every trained tensor moves and the loss falls.
#[test]
fn every_kind_trains_on_the_device_path_with_masks_drawn_on_the_device() {
    for kind in KINDS {
        let (dataset, config) = small_run_of(kind);
        assert!(config.encoder.dropout > 0.0);
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let trainer = Trainer::new(&config, &data).unwrap().use_device_path(DevicePath::device());
        let initial = weights(&trainer.fresh_state(&Device::Cpu).unwrap());
        let (trained, loss) = train_resuming(&trainer, &config, usize::MAX);
        let (again, _) = train_resuming(&trainer, &config, usize::MAX);
        assert_eq!(again != trained, kind.has_content(), "{kind:?}: masks come from the device's generator");
        for ((name, t), (_, i)) in trained.iter().zip(&initial) {
            if kind == ModelKind::Collaborative && !name.ends_with("_embedding") {
                continue; // the encoder is unused
            }
            let moved = t.iter().zip(i).fold(0.0f32, |m, (t, i)| m.max((t - i).abs()));
            assert!(moved > 1e-3, "{kind:?} {name}: moved {moved}");
        }
        assert!(loss.iter().all(|l| l.is_finite()) && loss[1] < loss[0], "{kind:?}: epoch losses {loss:?}");
    }
}
