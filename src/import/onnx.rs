//! A reader for the part of an ONNX file an import needs: the initializers (weights) and, for each,
//! the names of the nodes that consume them. Exporters name many weights after graph positions
//! (`onnx::MatMul_1966`), so the consuming node's name is what says which layer a weight belongs to.
//!
//! ONNX is protobuf; this decodes the wire format directly (the few fields used are listed below) so that
//! building alignfuse needs no `protoc` (the candle-onnx crate generates its types with it at build time).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// One weight of the graph.
pub struct Initializer {
    pub name: String,
    pub tensor: Tensor,
    /// Names of the nodes that take this initializer as an input.
    pub consumers: Vec<String>,
}

// Field numbers from onnx.proto3.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const NODE_INPUT: u32 = 1;
const NODE_NAME: u32 = 3;
const TENSOR_DIMS: u32 = 1;
const TENSOR_DATA_TYPE: u32 = 2;
const TENSOR_FLOAT_DATA: u32 = 4;
const TENSOR_NAME: u32 = 8;
const TENSOR_RAW_DATA: u32 = 9;
const TENSOR_DATA_LOCATION: u32 = 14;
const DT_FLOAT: u64 = 1;

/// Reads every float initializer of the model at `path` with its consumers.
pub fn read_initializers(path: &Path) -> Result<Vec<Initializer>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{} is not a readable ONNX model", path.display()))
}

fn parse(model: &[u8]) -> Result<Vec<Initializer>> {
    let graph = fields(model)?
        .into_iter()
        .find_map(|(num, v)| (num == MODEL_GRAPH).then_some(v))
        .context("no graph in the model")?
        .bytes()?;
    let mut inits = vec![];
    let mut consumers: HashMap<String, Vec<String>> = HashMap::new();
    for (num, v) in fields(graph)? {
        match num {
            GRAPH_INITIALIZER => inits.push(tensor(v.bytes()?)?),
            GRAPH_NODE => {
                let (mut name, mut inputs) = (String::new(), vec![]);
                for (n, v) in fields(v.bytes()?)? {
                    match n {
                        NODE_NAME => name = v.string()?,
                        NODE_INPUT => inputs.push(v.string()?),
                        _ => {}
                    }
                }
                for input in inputs {
                    consumers.entry(input).or_default().push(name.clone());
                }
            }
            _ => {}
        }
    }
    Ok(inits
        .into_iter()
        .map(|(name, tensor)| Initializer { consumers: consumers.remove(&name).unwrap_or_default(), name, tensor })
        .collect())
}

fn tensor(msg: &[u8]) -> Result<(String, Tensor)> {
    let (mut name, mut dims, mut dtype, mut raw, mut floats, mut external) =
        (String::new(), vec![], 0, None, vec![], false);
    for (num, v) in fields(msg)? {
        match (num, v) {
            (TENSOR_NAME, v) => name = v.string()?,
            (TENSOR_DIMS, Value::Varint(d)) => dims.push(d as usize),
            (TENSOR_DIMS, Value::Bytes(b)) => dims.extend(packed_varints(b)?.into_iter().map(|d| d as usize)),
            (TENSOR_DATA_TYPE, Value::Varint(t)) => dtype = t,
            (TENSOR_RAW_DATA, Value::Bytes(b)) => raw = Some(b),
            (TENSOR_FLOAT_DATA, Value::Bytes(b)) => floats.extend(le_f32(b)?),
            (TENSOR_FLOAT_DATA, Value::Fixed32(x)) => floats.push(f32::from_bits(x)),
            (TENSOR_DATA_LOCATION, Value::Varint(1)) => external = true,
            _ => {}
        }
    }
    if external {
        bail!("initializer `{name}` is stored in an external data file, which is not supported");
    }
    if dtype != DT_FLOAT {
        bail!("initializer `{name}` has ONNX data type {dtype}; only float32 (1) is supported");
    }
    let data = match raw {
        Some(b) => le_f32(b)?,
        None => floats,
    };
    let n: usize = dims.iter().product();
    if data.len() != n {
        bail!("initializer `{name}` has {} values for shape {dims:?}", data.len());
    }
    Ok((name.clone(), Tensor::from_vec(data, dims, &Device::Cpu).with_context(|| format!("initializer `{name}`"))?))
}

/// A protobuf field value by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    fn bytes(self) -> Result<&'a [u8]> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => bail!("expected a length-delimited field"),
        }
    }

    fn string(self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).context("a name is not UTF-8")
    }
}

/// The (field number, value) pairs of one message, in order.
fn fields(mut buf: &[u8]) -> Result<Vec<(u32, Value<'_>)>> {
    let mut out = vec![];
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut buf)?),
            1 => {
                take(&mut buf, 8)?;
                Value::Fixed64
            }
            2 => {
                let len = varint(&mut buf)? as usize;
                Value::Bytes(take(&mut buf, len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(take(&mut buf, 4)?.try_into()?)),
            w => bail!("unsupported protobuf wire type {w}"),
        };
        out.push(((key >> 3) as u32, value));
    }
    Ok(out)
}

fn varint(buf: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().context("truncated varint")?;
        *buf = rest;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    bail!("varint longer than 10 bytes")
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if buf.len() < n {
        bail!("truncated field: {n} bytes wanted, {} left", buf.len());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn packed_varints(mut b: &[u8]) -> Result<Vec<u64>> {
    let mut out = vec![];
    while !b.is_empty() {
        out.push(varint(&mut b)?);
    }
    Ok(out)
}

fn le_f32(b: &[u8]) -> Result<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        bail!("float data of {} bytes", b.len());
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u32, wire: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((num as u64) << 3 | wire) as u8];
        if wire == 2 {
            out.push(payload.len() as u8);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_an_initializer_and_its_consumer() {
        let raw: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let tensor = [
            field(TENSOR_DIMS, 0, &[2]),
            field(TENSOR_DATA_TYPE, 0, &[1]),
            field(TENSOR_NAME, 2, b"w"),
            field(TENSOR_RAW_DATA, 2, &raw),
        ]
        .concat();
        let node = [field(NODE_INPUT, 2, b"x"), field(NODE_INPUT, 2, b"w"), field(NODE_NAME, 2, b"/mm")].concat();
        let graph = [field(GRAPH_NODE, 2, &node), field(GRAPH_INITIALIZER, 2, &tensor)].concat();
        let model = [field(1, 0, &[7]), field(MODEL_GRAPH, 2, &graph)].concat();
        let inits = parse(&model).unwrap();
        assert_eq!(inits.len(), 1);
        assert_eq!(inits[0].name, "w");
        assert_eq!(inits[0].consumers, vec!["/mm".to_string()]);
        assert_eq!(inits[0].tensor.to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        assert!(parse(&model[..model.len() - 3]).is_err(), "a truncated file is an error");
    }
}
