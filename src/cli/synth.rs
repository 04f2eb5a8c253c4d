//! `alignfuse synth`: writes the generated shapes dataset (the main job's default data) to a folder.

use super::SynthArgs;
use anyhow::Result;

pub fn run(args: SynthArgs) -> Result<()> {
    let p = crate::data::synth::SynthPaths::of(&args.out);
    crate::refuse_existing([&p.train, &p.val, &p.test, &p.vocab].map(|f| f.as_path()), args.overwrite)?;
    let p = crate::data::synth::generate(&args.out, args.n, args.seed)?;
    println!(
        "wrote {} (train), {} (val), {} (test) and {} under {}",
        p.train.display(),
        p.val.display(),
        p.test.display(),
        p.vocab.display(),
        p.dir.display()
    );
    Ok(())
}
