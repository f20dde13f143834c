//! The planner's view of a model: its weight units (what they are, how many bytes they hold
//! and how many of those a token reads), the KV cache and activation sizes per token, and the
//! order in which a decode step runs the units.

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// What a weight unit is, which fixes its place in the execution order of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnitKind {
    /// The token embedding table. Always resident in RAM: a token reads one row of it.
    Embedding,
    /// The output head (the final norm may be part of it), run last.
    Head,
    /// A layer's attention block: its norm and the q, k, v and o projections.
    Attention {
        /// The layer index, below `WeightManifest::n_layers`.
        layer: usize,
    },
    /// A layer's dense feed-forward block: its norm and the gate, up and down projections. In a
    /// mixture-of-experts layer this is the shared expert, if there is one.
    Ffn {
        /// The layer index, below `WeightManifest::n_layers`.
        layer: usize,
    },
    /// One routed expert of a mixture-of-experts layer.
    Expert {
        /// The layer index, below `WeightManifest::n_layers`.
        layer: usize,
        /// The expert index within the layer.
        expert: usize,
    },
    /// Anything else (a final norm kept apart, rotary tables). Always resident in RAM; it runs
    /// after the head in the execution order.
    Other,
}

impl UnitKind {
    /// Whether a plan may stream a unit of this kind from disk. The embedding and `Other`
    /// units are always resident.
    pub fn is_streamable(self) -> bool {
        !matches!(self, UnitKind::Embedding | UnitKind::Other)
    }

    /// The key that sorts units into execution order (ties go to the manifest order).
    fn order_key(self) -> (u8, usize, u8, usize) {
        match self {
            UnitKind::Embedding => (0, 0, 0, 0),
            UnitKind::Attention { layer } => (1, layer, 0, 0),
            UnitKind::Ffn { layer } => (1, layer, 1, 0),
            UnitKind::Expert { layer, expert } => (1, layer, 2, expert),
            UnitKind::Head => (2, 0, 0, 0),
            UnitKind::Other => (3, 0, 0, 0),
        }
    }

    /// The layer of a per-layer unit.
    pub fn layer(self) -> Option<usize> {
        match self {
            UnitKind::Attention { layer } | UnitKind::Ffn { layer } | UnitKind::Expert { layer, .. } => Some(layer),
            UnitKind::Embedding | UnitKind::Head | UnitKind::Other => None,
        }
    }
}

/// One weight unit: the piece of the model that the store places, moves and hands out whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitInfo {
    /// A name for messages and tables, such as `blk.3.attn`.
    pub name: String,
    /// What the unit is.
    pub kind: UnitKind,
    /// The unit's size in bytes, resident or in a staging buffer.
    pub bytes: u64,
    /// The dtype of its matrices (`f32`, `bf16`, `q8_0`, ...), which picks its matvec rate.
    pub dtype: String,
    /// Bytes of this unit read to decode one token (embedding: one row; expert: its share;
    /// else = bytes)
    pub bytes_per_token: u64,
}

/// Everything the planner needs to know about a model's weights and per-token memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightManifest {
    /// The weight units, in any order; plans refer to them by index.
    pub units: Vec<UnitInfo>,
    /// The number of decoder layers.
    pub n_layers: usize,
    /// KV cache bytes per token of context, all layers together.
    pub kv_bytes_per_token: u64,
    /// activation and scratch bytes per token of a forward pass chunk
    pub activation_bytes_per_token: u64,
}

impl WeightManifest {
    /// Checks that every per-layer unit names a layer below `n_layers`.
    pub fn validate(&self) -> Result<(), PlanError> {
        for unit in &self.units {
            if let Some(layer) = unit.kind.layer()
                && layer >= self.n_layers
            {
                return Err(PlanError::InvalidManifest {
                    unit: unit.name.clone(),
                    reason: format!("layer {layer} is past the model's {} layers", self.n_layers),
                });
            }
        }
        Ok(())
    }

    /// The indices of all units in the order a decode step runs them: the embedding, then per
    /// layer its attention block, its dense FFN and its experts (by expert index), then the
    /// head, then `Other` units. Units of the same kind and place keep their manifest order.
    pub fn execution_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.units.len()).collect();
        order.sort_by_key(|&i| (self.units[i].kind.order_key(), i));
        order
    }

    /// The sum of all units' bytes (saturating at 2^64 - 1).
    pub fn total_bytes(&self) -> u64 {
        self.units.iter().fold(0u64, |sum, unit| sum.saturating_add(unit.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, kind: UnitKind) -> UnitInfo {
        UnitInfo { name: name.to_string(), kind, bytes: 10, dtype: "f32".to_string(), bytes_per_token: 10 }
    }

    #[test]
    fn execution_order_runs_embedding_layers_then_head() {
        let manifest = WeightManifest {
            units: vec![
                unit("head", UnitKind::Head),
                unit("norm", UnitKind::Other),
                unit("ffn1", UnitKind::Ffn { layer: 1 }),
                unit("e1.1", UnitKind::Expert { layer: 1, expert: 1 }),
                unit("e1.0", UnitKind::Expert { layer: 1, expert: 0 }),
                unit("attn1", UnitKind::Attention { layer: 1 }),
                unit("ffn0", UnitKind::Ffn { layer: 0 }),
                unit("attn0", UnitKind::Attention { layer: 0 }),
                unit("embed", UnitKind::Embedding),
            ],
            n_layers: 2,
            kv_bytes_per_token: 0,
            activation_bytes_per_token: 0,
        };
        let names: Vec<&str> = manifest.execution_order().iter().map(|&i| manifest.units[i].name.as_str()).collect();
        assert_eq!(names, ["embed", "attn0", "ffn0", "attn1", "ffn1", "e1.0", "e1.1", "head", "norm"]);
        assert_eq!(manifest.validate(), Ok(()));
    }

    #[test]
    fn validate_names_a_unit_past_the_last_layer() {
        let manifest = WeightManifest {
            units: vec![unit("blk.4.ffn", UnitKind::Ffn { layer: 4 })],
            n_layers: 4,
            kv_bytes_per_token: 0,
            activation_bytes_per_token: 0,
        };
        let error = manifest.validate().unwrap_err();
        assert!(matches!(&error, PlanError::InvalidManifest { unit, .. } if unit == "blk.4.ffn"), "{error:?}");
        assert!(error.to_string().contains("layer 4 is past the model's 4 layers"), "{error}");
    }

    #[test]
    fn unit_kinds_serialize_with_a_kind_tag() {
        let json = serde_json::to_string(&UnitKind::Expert { layer: 2, expert: 5 }).unwrap();
        assert_eq!(json, r#"{"kind":"expert","layer":2,"expert":5}"#);
        let back: UnitKind = serde_json::from_str(&json).unwrap();
        assert_eq!(back, UnitKind::Expert { layer: 2, expert: 5 });
        assert_eq!(serde_json::to_string(&UnitKind::Head).unwrap(), r#"{"kind":"head"}"#);
    }
}
