//! Ablation variants: a name such as `itc+mlm`, `full` or `alpha=0.2`, parsed into the config overrides it
//! stands for, so that a variant is nothing but `--set` keys applied on top of the user's config.

use crate::config::Negatives;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

/// The ALBEF Table 1 ladder, bottom to top: what `ablate` trains when no `--variants` is given.
pub const DEFAULT: &str = "itc,itc+mlm,itc+mlm+itm_rand,itc+mlm+itm_hard,full";

/// The variant grammar, for `--help` and for every parse error.
pub const GRAMMAR: &str = "a variant is `+`-joined objectives from itc, mlm, itm_rand (ITM, random negatives), \
itm_hard (ITM, hard negatives), mod (momentum distillation), or `full` (= itc+mlm+itm_hard+mod); \
`alpha=X` (0 <= X <= 1) sets the distillation weight and `queue=N` (N >= 1) the ITC queue length, of `full` \
when given alone (e.g. alpha=0.2, queue=256) or of the objectives they are joined to \
(e.g. itc+mod+queue=256)";

/// One row of an ablation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    /// Canonical name (objectives in a fixed order, then the sweeps); also the run directory's name.
    pub name: String,
    /// `key=value` config overrides, applied after the user's `--set`: every objective switch is set, so
    /// the variant does not depend on what the config file turns on.
    pub overrides: Vec<String>,
}

/// Which objectives a variant trains.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Objectives {
    itc: bool,
    mlm: bool,
    itm: Option<Negatives>,
    distill: bool,
}

const FULL: Objectives = Objectives { itc: true, mlm: true, itm: Some(Negatives::Hard), distill: true };

/// A comma-separated list of variants; duplicates (after canonicalisation) are an error.
pub fn parse_list(list: &str) -> Result<Vec<Variant>> {
    let mut out: Vec<Variant> = vec![];
    for spec in list.split(',').map(str::trim) {
        let v = parse(spec)?;
        ensure!(!out.iter().any(|o| o.name == v.name), "variant `{spec}` is listed twice (as `{}`)", v.name);
        out.push(v);
    }
    Ok(out)
}

/// One variant name (see [`GRAMMAR`]).
pub fn parse(spec: &str) -> Result<Variant> {
    let fail = |why: String| -> anyhow::Error { anyhow::anyhow!("variant `{spec}`: {why}; {GRAMMAR}") };
    ensure!(!spec.trim().is_empty(), fail("empty name".into()));
    let mut o = Objectives::default();
    let (mut alpha, mut queue): (Option<f64>, Option<usize>) = (None, None);
    let mut named = false;
    for part in spec.split('+').map(str::trim) {
        let flag = |slot: &mut bool| -> Result<()> {
            ensure!(!*slot, fail(format!("`{part}` repeats an objective already named")));
            *slot = true;
            Ok(())
        };
        let itm = |slot: &mut Option<Negatives>, n: Negatives| -> Result<()> {
            ensure!(
                slot.is_none(),
                fail(format!("`{part}` adds ITM a second time (itm_rand, itm_hard and full each include it)"))
            );
            *slot = Some(n);
            Ok(())
        };
        named |= !part.contains('=');
        match part {
            "itc" => flag(&mut o.itc)?,
            "mlm" => flag(&mut o.mlm)?,
            "mod" => flag(&mut o.distill)?,
            "itm_rand" => itm(&mut o.itm, Negatives::Random)?,
            "itm_hard" => itm(&mut o.itm, Negatives::Hard)?,
            "full" => {
                flag(&mut o.itc)?;
                flag(&mut o.mlm)?;
                flag(&mut o.distill)?;
                itm(&mut o.itm, Negatives::Hard)?;
            }
            _ => match part.split_once('=') {
                Some(("alpha", v)) if alpha.is_none() => {
                    let a: f64 = v
                        .parse()
                        .ok()
                        .filter(|a| (0.0..=1.0).contains(a))
                        .with_context(|| fail(format!("alpha `{v}` is not a number in [0, 1]")))?;
                    alpha = Some(a);
                }
                Some(("queue", v)) if queue.is_none() => {
                    let q: usize = v
                        .parse()
                        .ok()
                        .filter(|&q| q >= 1)
                        .with_context(|| fail(format!("queue `{v}` is not a whole number >= 1")))?;
                    queue = Some(q);
                }
                _ => bail!(fail(format!("unknown or repeated part `{part}`"))),
            },
        }
    }
    if !named {
        o = FULL;
    }
    ensure!(alpha.is_none() || o.distill, fail("alpha only matters with momentum distillation: add `mod`".into()));
    ensure!(queue.is_none() || o.itc, fail("the queue holds ITC keys: add `itc`".into()));
    Ok(variant(o, alpha, queue))
}

/// The canonical name and config overrides of a parsed variant.
fn variant(o: Objectives, alpha: Option<f64>, queue: Option<usize>) -> Variant {
    let mut parts: Vec<String> = vec![];
    if o != FULL {
        parts.extend(
            [
                (o.itc, "itc"),
                (o.mlm, "mlm"),
                (o.itm == Some(Negatives::Random), "itm_rand"),
                (o.itm == Some(Negatives::Hard), "itm_hard"),
                (o.distill, "mod"),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| n.to_string()),
        );
    } else if alpha.is_none() && queue.is_none() {
        parts.push("full".into());
    }
    let mut overrides = vec![
        format!("objectives.itc={}", o.itc),
        format!("objectives.mlm={}", o.mlm),
        format!("objectives.itm={}", o.itm.is_some()),
        format!("objectives.distill={}", o.distill),
    ];
    if let Some(n) = o.itm {
        overrides.push(format!("objectives.itm_negatives={}", if n == Negatives::Hard { "hard" } else { "random" }));
    }
    if let Some(a) = alpha {
        parts.push(format!("alpha={a}"));
        overrides.push(format!("model.alpha={a:?}"));
    }
    if let Some(q) = queue {
        parts.push(format!("queue={q}"));
        overrides.push(format!("model.queue_size={q}"));
    }
    Variant { name: parts.join("+"), overrides }
}
