//! Learning-rate and alpha schedules, as pure functions of the optimiser step.

use crate::config::{Schedule, TrainConfig};
use std::f64::consts::PI;

/// The learning rate of optimiser step `step` (0-based) for a run of `steps_per_epoch` * epochs steps.
///
/// `cosine`: linear warm-up from warmup_lr to lr over warmup_steps, then cosine to min_lr per step.
/// `albef`: ALBEF's staircase warm-up during the first epoch (every 100 steps the rate moves a
/// `100 / warmup_steps` share of the way from warmup_lr to lr; a first epoch shorter than warmup_steps
/// ends it part-way, where ALBEF stops too), then one cosine value per epoch from lr to min_lr.
pub fn learning_rate(cfg: &TrainConfig, step: usize, steps_per_epoch: usize) -> f64 {
    let total = (cfg.epochs * steps_per_epoch).max(1);
    match cfg.schedule {
        Schedule::Cosine => {
            if step < cfg.warmup_steps {
                cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step as f64 / cfg.warmup_steps as f64
            } else {
                let span = total.saturating_sub(cfg.warmup_steps).max(1);
                let t = ((step - cfg.warmup_steps) as f64 / span as f64).min(1.0);
                cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (PI * t).cos())
            }
        }
        Schedule::Albef => {
            let epoch = step / steps_per_epoch.max(1);
            if epoch == 0 && step < cfg.warmup_steps {
                let stair = (step / 100 * 100) as f64;
                cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * stair / cfg.warmup_steps as f64
            } else {
                let t = epoch as f64 / cfg.epochs.max(1) as f64;
                cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (PI * t).cos())
            }
        }
    }
}

/// `alpha * min(1, step / (ramp_epochs * steps_per_epoch))`: distillation is phased in while the
/// momentum model is still poor (ALBEF ramps over 1 epoch, BLIP over 2).
pub fn alpha(alpha: f64, ramp_epochs: f64, step: usize, steps_per_epoch: usize) -> f64 {
    let ramp = ramp_epochs * steps_per_epoch as f64;
    if ramp <= 0.0 {
        alpha
    } else {
        alpha * (step as f64 / ramp).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> TrainConfig {
        TrainConfig {
            epochs: 4,
            lr: 1e-4,
            warmup_lr: 1e-5,
            min_lr: 1e-6,
            warmup_steps: 10,
            schedule,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let c = cfg(Schedule::Cosine);
        assert_eq!(learning_rate(&c, 0, 100), 1e-5);
        assert!((learning_rate(&c, 5, 100) - 5.5e-5).abs() < 1e-12);
        assert!((learning_rate(&c, 10, 100) - 1e-4).abs() < 1e-12);
        let mid = 10 + (400 - 10) / 2;
        assert!((learning_rate(&c, mid, 100) - (1e-6 + 0.5 * (1e-4 - 1e-6))).abs() < 1e-9);
        assert!((learning_rate(&c, 400, 100) - 1e-6).abs() < 1e-12);
    }

    #[test]
    fn albef_staircase_and_epoch_cosine() {
        let c = TrainConfig { warmup_steps: 300, ..cfg(Schedule::Albef) };
        assert_eq!(learning_rate(&c, 99, 1000), 1e-5);
        assert!((learning_rate(&c, 100, 1000) - (1e-5 + 9e-5 / 3.0)).abs() < 1e-12);
        assert_eq!(learning_rate(&c, 350, 1000), 1e-4);
        assert_eq!(learning_rate(&c, 999, 1000), 1e-4);
        let e2 = learning_rate(&c, 2000, 1000);
        assert!((e2 - (1e-6 + 0.5 * (1e-4 - 1e-6))).abs() < 1e-12);
        // A first epoch shorter than the warm-up cuts it short: 50 steps never reach the first stair, and
        // 250 end on the second (200 of 300 steps' worth), as ALBEF's loop stops stepping its scheduler.
        assert_eq!(learning_rate(&c, 49, 50), 1e-5);
        assert!((learning_rate(&c, 249, 250) - (1e-5 + 9e-5 * 200.0 / 300.0)).abs() < 1e-12);
        let e1 = learning_rate(&c, 250, 250);
        assert!((e1 - (1e-6 + 0.5 * (1e-4 - 1e-6) * (1.0 + (PI / 4.0).cos()))).abs() < 1e-12);
    }

    #[test]
    fn alpha_ramps_over_the_first_epoch() {
        assert_eq!(alpha(0.4, 1.0, 0, 100), 0.0);
        assert!((alpha(0.4, 1.0, 50, 100) - 0.2).abs() < 1e-12);
        assert_eq!(alpha(0.4, 1.0, 150, 100), 0.4);
        assert_eq!(alpha(0.4, 0.0, 0, 100), 0.4);
        assert!((alpha(0.4, 2.0, 100, 100) - 0.2).abs() < 1e-12);
    }
}
