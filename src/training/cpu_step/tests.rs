//! The fused step against the autograd path it replaces on the CPU.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::training::loss::{LossConfig, LossKind, log_sampling_probability, track_tensor};
use crate::training::model::{Encoder, EncoderConfig, HostDropout, TRAINABLE_NAMES};
use crate::training::optim::Adam;
use crate::training::trainer::training_loss;

const TRACKS: usize = 40;

struct Case {
    features: Tensor,
    logq: Tensor,
    ta: Vec<u32>,
    tb: Vec<u32>,
}

/// `b` pairs over a small catalogue, so that tracks recur (accidental hits in the contrastive loss).
fn case(b: usize, seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let features: Vec<f32> = (0..TRACKS * NUM_FEATURES).map(|_| rng.random_range(-2.0..2.0)).collect();
    let counts: Vec<u32> = (0..TRACKS).map(|_| rng.random_range(0..30)).collect();
    let mut ids = || (0..b).map(|_| rng.random_range(0..TRACKS as u32)).collect::<Vec<_>>();
    let (ta, tb) = (ids(), ids());
    Case {
        features: Tensor::from_vec(features, (TRACKS, NUM_FEATURES), &Device::Cpu).unwrap(),
        logq: Tensor::from_vec(log_sampling_probability(&counts), TRACKS, &Device::Cpu).unwrap(),
        ta,
        tb,
    }
}

fn loss_config(kind: LossKind, logq: bool) -> LossConfig {
    LossConfig { kind, temperature: 0.1, logq_correction: logq, centering_weight: 0.5 }
}

/// `max |a − b| / max(max |b|, 1e-6)`: the error relative to the gradient's scale.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn loss_gradients_and_batch_statistics_match_autograd() {
    let mut checked = 0;
    for (kind, logq) in [(LossKind::Contrastive, true), (LossKind::Contrastive, false), (LossKind::Cosine, false)] {
        for (b, dropout) in [(5, 0.0), (37, 0.2), (130, 0.2)] {
            let c = case(b, b as u64);
            let config = EncoderConfig { embedding_size: 16, dropout };
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let encoder = Encoder::new(config, &mut rng, &Device::Cpu, DType::F32).unwrap();
            let masks = HostDropout::sample(&config, 2 * b, &mut rng);
            let loss = loss_config(kind, logq);
            let logq_tensor = loss.logq_correction.then_some(&c.logq);

            let step = CpuStep::new(config, loss.clone(), &c.features, logq_tensor).unwrap();
            let fused = step.loss_and_gradients(&encoder, &c.ta, &c.tb, &masks).unwrap();

            let (ta, tb) = (track_tensor(&c.ta, &Device::Cpu).unwrap(), track_tensor(&c.tb, &Device::Cpu).unwrap());
            let tensor_masks = masks.to_tensors(&config, 2 * b, &Device::Cpu, DType::F32).unwrap();
            let (reference, stats) =
                training_loss(&encoder, &c.features, &ta, &tb, &tensor_masks, &loss, logq_tensor).unwrap();
            let grads = reference.backward().unwrap();
            let reference = reference.to_scalar::<f32>().unwrap();

            let what = format!("{kind} logq {logq} B {b} dropout {dropout}");
            let (mean, variance) = stats.to_vecs();
            assert!(relative_error(&fused.batch_mean, &mean) < 1e-5, "{what}: batch mean");
            assert!(relative_error(&fused.batch_variance, &variance) < 1e-5, "{what}: batch variance");
            assert!(
                (fused.loss - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                "{what}: loss {} vs {reference}",
                fused.loss
            );
            for ((name, var), got) in TRAINABLE_NAMES.iter().zip(encoder.trainable()).zip(&fused.gradients) {
                let want = values(grads.get(var.as_tensor()).unwrap());
                let err = relative_error(got, &want);
                assert!(err < 2e-4, "{what}: gradient of {name} off by {err} of its scale");
                assert!(want.iter().any(|v| v.abs() > 1e-7), "{what}: {name} has a zero gradient, a weak check");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

#[test]
fn training_steps_match_autograd_steps_with_adam_and_moving_statistics() {
    let c = case(48, 11);
    let config = EncoderConfig { embedding_size: 8, dropout: 0.2 };
    let loss = loss_config(LossKind::Contrastive, true);
    let make = || {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let encoder = Encoder::new(config, &mut rng, &Device::Cpu, DType::F32).unwrap();
        let adam = Adam::new(encoder.trainable().to_vec(), 0.01).unwrap();
        (encoder, adam, rng)
    };
    let (fused_encoder, mut fused_adam, mut fused_rng) = make();
    let (ref_encoder, mut ref_adam, mut ref_rng) = make();
    let step = CpuStep::new(config, loss.clone(), &c.features, Some(&c.logq)).unwrap();
    let (ta, tb) = (track_tensor(&c.ta, &Device::Cpu).unwrap(), track_tensor(&c.tb, &Device::Cpu).unwrap());
    for _ in 0..3 {
        let masks = HostDropout::sample(&config, 96, &mut fused_rng);
        step.train_batch(&fused_encoder, &mut fused_adam, &c.ta, &c.tb, &masks).unwrap();

        let masks = HostDropout::sample(&config, 96, &mut ref_rng).to_tensors(&config, 96, &Device::Cpu, DType::F32);
        let (l, stats) =
            training_loss(&ref_encoder, &c.features, &ta, &tb, &masks.unwrap(), &loss, Some(&c.logq)).unwrap();
        ref_adam.step(&l.backward().unwrap()).unwrap();
        ref_encoder.update_moving_stats(&stats).unwrap();
    }
    let initial = make().0.named_tensors();
    for (((name, got), (_, want)), (_, before)) in
        fused_encoder.named_tensors().iter().zip(ref_encoder.named_tensors()).zip(initial)
    {
        let (got, want, before) = (values(got), values(&want), values(&before));
        let moved: Vec<f32> = want.iter().zip(&before).map(|(w, b)| w - b).collect();
        let got_moved: Vec<f32> = got.iter().zip(&before).map(|(g, b)| g - b).collect();
        // Three Adam steps move each weight by up to ~3·lr; compare the moves, not the weights.
        assert!(moved.iter().any(|m| m.abs() > 1e-4), "{name} did not move: a weak check");
        let err = relative_error(&got_moved, &moved);
        assert!(err < 1e-3, "{name}: the fused steps moved it differently ({err} of the move)");
    }
    let (fm, rm) = (fused_adam.state(), ref_adam.state());
    assert_eq!(fm.step, 3);
    for (a, b) in fm.first_moment.iter().zip(&rm.first_moment).chain(fm.second_moment.iter().zip(&rm.second_moment)) {
        assert!(relative_error(&values(a), &values(b)) < 1e-3);
    }
}

/// A unit whose input to ReLU is exactly 0 (a zero kernel column and a zero bias, as initialised):
/// candle's ReLU passes the gradient there (`x ≥ 0`), so the fused step must too.
#[test]
fn relu_at_exactly_zero_passes_the_gradient_as_autograd_does() {
    let c = case(20, 3);
    let config = EncoderConfig { embedding_size: 4, dropout: 0.0 };
    let encoder = Encoder::new(config, &mut ChaCha8Rng::seed_from_u64(2), &Device::Cpu, DType::F32).unwrap();
    let mut tensors: std::collections::HashMap<String, Tensor> =
        encoder.named_tensors().into_iter().map(|(n, t)| (n.to_string(), t.copy().unwrap())).collect();
    let mut k1 = values(&tensors["dense.kernel"]);
    k1.iter_mut().step_by(8).for_each(|v| *v = 0.0); // column 0 of the [11, 8] kernel
    tensors.insert("dense.kernel".into(), Tensor::from_vec(k1, (NUM_FEATURES, 8), &Device::Cpu).unwrap());
    encoder.load(&tensors).unwrap();
    let loss = loss_config(LossKind::Contrastive, false);
    let step = CpuStep::new(config, loss.clone(), &c.features, None).unwrap();
    let none = HostDropout::none();
    let fused = step.loss_and_gradients(&encoder, &c.ta, &c.tb, &none).unwrap();
    let (ta, tb) = (track_tensor(&c.ta, &Device::Cpu).unwrap(), track_tensor(&c.tb, &Device::Cpu).unwrap());
    let masks = none.to_tensors(&config, 40, &Device::Cpu, DType::F32).unwrap();
    let (reference, _) = training_loss(&encoder, &c.features, &ta, &tb, &masks, &loss, None).unwrap();
    let grads = reference.backward().unwrap();
    let want = values(grads.get(encoder.trainable()[3].as_tensor()).unwrap()); // dense.bias
    assert!(want[0].abs() > 1e-6, "autograd passes a gradient to the unit at 0: {want:?}");
    assert!(relative_error(&fused.gradients[3], &want) < 2e-4, "{:?} vs {want:?}", fused.gradients[3]);
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let c = case(4, 1);
    let config = EncoderConfig { embedding_size: 4, dropout: 0.0 };
    let encoder = Encoder::new(config, &mut ChaCha8Rng::seed_from_u64(1), &Device::Cpu, DType::F32).unwrap();
    let step = CpuStep::new(config, loss_config(LossKind::Cosine, false), &c.features, None).unwrap();
    let none = HostDropout::none();
    let err = step.loss_and_gradients(&encoder, &[1, 2], &[3], &none).err().unwrap();
    assert!(err.to_string().contains("2 anchors for 1 partners"), "{err}");
    let err = step.loss_and_gradients(&encoder, &[1, TRACKS as u32], &[3, 4], &none).err().unwrap();
    assert!(err.to_string().contains("track index out of range"), "{err}");
    let err = step.loss_and_gradients(&encoder, &[], &[], &none).err().unwrap();
    assert!(err.to_string().contains("at least one pair"), "{err}");
}

/// The table terms' gradients (gather, artist mean, album, identity, through the fused step's
/// normalisation and loss) against central finite differences of the fused loss, for the hybrid
/// (content output plus table terms) and the collaborative kind (table terms alone).
#[test]
fn table_gradients_match_finite_differences() {
    use crate::data::tags::TrackTags;
    use crate::training::model::ModelKind;
    use crate::training::model::tables::{TableDropout, TableMix, Tables};
    use crate::training::model::vocab::TrackInputs;

    let mut tags = TrackTags::default();
    let artist_names = ["a", "b", "c", "d", "e"];
    for t in 0..TRACKS {
        let artists = [artist_names[t % 5], artist_names[(t / 5) % 5]];
        tags.push(artists.iter().take(1 + t % 2).copied(), (t % 3 != 0).then(|| ["x", "y", "z"][t % 3]));
    }
    let inputs = TrackInputs::build(&tags, 1);
    let c = case(12, 3);
    let config = EncoderConfig { embedding_size: 6, dropout: 0.0 };
    let loss = loss_config(LossKind::Contrastive, true);
    let step = CpuStep::new(config, loss, &c.features, Some(&c.logq)).unwrap();
    let encoder = Encoder::new(config, &mut ChaCha8Rng::seed_from_u64(2), &Device::Cpu, DType::F32).unwrap();
    let tracks: Vec<u32> = c.ta.iter().chain(&c.tb).copied().collect();
    for kind in [ModelKind::Hybrid, ModelKind::Collaborative] {
        let mut tables = Tables::new(kind, &inputs, 6, 9);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for table in tables.tables.iter_mut().flatten() {
            table.values.iter_mut().for_each(|v| *v = rng.random_range(-0.5..0.5));
        }
        let dropout = TableDropout {
            keep_identity: (0..tracks.len()).map(|r| r % 3 != 0).collect(),
            keep_album: (0..tracks.len()).map(|r| r % 4 != 0).collect(),
        };
        let mixes = TableMix::build(&tables, &inputs, &tracks, &dropout);
        let loss_and_ds = |tables: &Tables| -> (f32, Vec<f32>) {
            let extra = tables.mixed(&mixes, tracks.len());
            match kind {
                ModelKind::Hybrid => {
                    let out = step.loss_and_gradients_with(&encoder, &c.ta, &c.tb, &HostDropout::none(), Some(&extra));
                    let out = out.unwrap();
                    (out.loss, out.pre_norm_gradient.unwrap())
                }
                _ => step.tables_only_loss(extra, &c.ta, &c.tb).unwrap(),
            }
        };
        let (_, ds) = loss_and_ds(&tables);
        let mut checked = 0;
        for (i, mix) in mixes.iter().enumerate() {
            let Some(mix) = mix else { continue };
            let grad = mix.gradients(&ds, 6);
            for (l, &row) in mix.rows.iter().enumerate().step_by(3) {
                for j in [0, 4] {
                    let at = row as usize * 6 + j;
                    let eval = |delta: f32| {
                        let mut t = tables.clone();
                        t.tables[i].as_mut().unwrap().values[at] += delta;
                        loss_and_ds(&t).0
                    };
                    let h = 1e-2;
                    let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                    let analytic = grad[l * 6 + j];
                    assert!(
                        (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
                        "{kind:?} table {i} row {row}[{j}]: fused {analytic} vs finite differences {numeric}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 6, "{kind:?}: {checked} coordinates checked");
    }
}
