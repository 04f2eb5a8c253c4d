//! Named parameters: a store of `Var`s keyed by ALBEF checkpoint names, with seeded initialisation.
//!
//! candle's CPU RNG cannot be seeded, so a missing parameter is initialised from a ChaCha stream derived
//! from (seed, name): the same seed gives the same weights whatever order modules are built in. A store
//! can also be *frozen*: it hands out detached tensors sharing the Vars' storage, so a model built from
//! it records no autograd graph yet sees in-place `Var::set` updates (the momentum twin).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How a freshly created parameter is filled.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Const(f64),
    /// Normal(0, std) truncated at two standard deviations, as BERT/timm initialise.
    Normal(f64),
}

#[derive(Clone)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
    device: Device,
    frozen: bool,
}

impl ParamStore {
    pub fn new(seed: u64, device: &Device) -> Self {
        ParamStore { vars: Default::default(), seed, device: device.clone(), frozen: false }
    }

    /// A store whose modules get detached tensors (no gradient, no graph).
    pub fn new_frozen(seed: u64, device: &Device) -> Self {
        ParamStore { frozen: true, ..Self::new(seed, device) }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn root(&self) -> Pb<'_> {
        Pb { store: self, prefix: String::new() }
    }

    /// The named tensor, created with `init` when absent. An existing one must have `shape`.
    pub fn get(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let mut vars = self.vars.lock().unwrap();
        let var = match vars.get(name) {
            Some(v) => {
                if v.shape() != &shape {
                    candle_core::bail!("parameter `{name}` has shape {:?}, the model expects {:?}", v.shape(), shape)
                }
                v.clone()
            }
            None => {
                let t = self.init_tensor(name, &shape, init)?;
                let v = Var::from_tensor(&t)?;
                vars.insert(name.to_string(), v.clone());
                v
            }
        };
        Ok(if self.frozen { var.as_detached_tensor() } else { var.as_tensor().clone() })
    }

    fn init_tensor(&self, name: &str, shape: &Shape, init: Init) -> Result<Tensor> {
        let n = shape.elem_count();
        let data: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Normal(std) => {
                let mut rng = crate::rng::stream(self.seed, "init", name, 0);
                let normal = Normal::new(0.0f32, std as f32).expect("valid std");
                (0..n)
                    .map(|_| loop {
                        let x = normal.sample(&mut rng);
                        if x.abs() <= 2.0 * std as f32 {
                            break x;
                        }
                    })
                    .collect()
            }
        };
        Tensor::from_vec(data, shape.clone(), &self.device)
    }

    /// Inserts or overwrites a parameter (used by loaders and the momentum copy).
    pub fn insert(&self, name: &str, t: &Tensor) -> Result<()> {
        let t = t.to_device(&self.device)?.to_dtype(DType::F32)?;
        let mut vars = self.vars.lock().unwrap();
        match vars.get(name) {
            Some(v) if v.shape() == t.shape() => v.set(&t),
            _ => {
                vars.insert(name.to_string(), Var::from_tensor(&t.copy()?)?);
                Ok(())
            }
        }
    }

    /// All parameters, sorted by name (BTreeMap order), as (name, Var).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn var(&self, name: &str) -> Option<Var> {
        self.vars.lock().unwrap().get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.vars.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A path into a store (`vb.pp("attention")` in candle's idiom): modules ask for their parameters by
/// their checkpoint-relative names.
#[derive(Clone)]
pub struct Pb<'a> {
    store: &'a ParamStore,
    prefix: String,
}

impl<'a> Pb<'a> {
    pub fn pp(&self, s: impl std::fmt::Display) -> Pb<'a> {
        let prefix = if self.prefix.is_empty() { s.to_string() } else { format!("{}.{s}", self.prefix) };
        Pb { store: self.store, prefix }
    }

    pub fn name(&self, s: &str) -> String {
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        }
    }

    pub fn get(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        self.store.get(&self.name(name), shape, init)
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }
}
