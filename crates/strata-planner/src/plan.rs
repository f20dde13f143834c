//! The planner's output: where every unit lives, the staging ring and prefetch depth of the
//! streamed ones, the memory each tier holds and the predicted time per token. A plan prints as
//! a table for people (`to_table`) and serializes to JSON for tools.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hardware::TierBudgets;
use crate::manifest::{UnitKind, WeightManifest};
use crate::size::format_size;

/// Where a unit lives while the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Resident in GPU memory. CPU plans do not use it yet.
    Vram,
    /// Resident in host RAM.
    Ram,
    /// Memory-mapped from the offload pack: a page is read when a token first touches it and
    /// then stays, so RAM holds only the pages touched. The embedding of a model with its own
    /// output head lives here: a token reads one row of it.
    Mapped,
    /// Streamed from the offload pack on disk through the staging buffers, every token.
    Disk,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Tier::Vram => "VRAM",
            Tier::Ram => "RAM",
            Tier::Mapped => "mapped",
            Tier::Disk => "disk",
        })
    }
}

/// The tier of one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Index into the manifest's units.
    pub unit: usize,
    /// Where it lives.
    pub tier: Tier,
}

/// The bytes a plan holds in one tier. `total` is the sum of the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Weights that stay in the tier (a mapped unit counts the pages the workload can touch).
    pub resident_weights: u64,
    /// The KV cache, reserved for the workload's whole context.
    pub kv_cache: u64,
    /// Activations and scratch for the workload's largest forward chunk.
    pub activations: u64,
    /// The ring of staging buffers that streamed units pass through.
    pub staging: u64,
    /// The expert cache MoE experts are read into when their router picks them.
    #[serde(default)]
    pub expert_cache: u64,
    /// What the process holds besides (code, libraries, heap, per-thread scratch): RAM only.
    #[serde(default)]
    pub process: u64,
    /// All of the above.
    pub total: u64,
}

/// The predicted time of one decoded token in steady state, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenTime {
    /// Every unit's matvec time, added up.
    pub compute_s: f64,
    /// Every streamed unit's disk read time, added up.
    pub transfer_s: f64,
    /// The time per token with transfers overlapping compute as far as the prefetch depth
    /// allows: `compute_s + transfer_s` at depth 0, at least the larger of the two otherwise.
    pub total_s: f64,
}

/// Where every weight unit lives and how the streamed ones move: the planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The name of the strategy that made the plan.
    pub strategy: String,
    /// One placement per manifest unit, in manifest order (`placements[i].unit == i`).
    pub placements: Vec<Placement>,
    /// The streamed units in execution order; the order wraps around to the next token. Experts
    /// on disk are not in it: they are read when their router picks them, into the expert cache.
    pub stream_order: Vec<usize>,
    /// How many streamed units ahead of the one in use may be loading (0: on demand).
    pub prefetch_depth: usize,
    /// Buffers in the staging ring: `prefetch_depth + 1`, or 0 when nothing is streamed.
    pub staging_buffers: usize,
    /// The size of each staging buffer: the largest streamed unit.
    pub staging_buffer_bytes: u64,
    /// The budgets the plan was made for.
    pub budgets: TierBudgets,
    /// What the plan holds in host RAM.
    pub ram: MemoryUse,
    /// What the plan holds in GPU memory (nothing, on CPU plans).
    pub vram: MemoryUse,
    /// Bytes read from disk per token (an expert on disk counts its expected share, times the
    /// expected misses of the expert cache).
    pub bytes_streamed_per_token: u64,
    /// The share of expert reads the expert cache is expected to serve if routing were uniform
    /// (every token picks `k` experts of each layer at random): for `lru` from a replay of such
    /// a trace, for the layer-aware policies the share of the experts on disk the cache holds;
    /// `None` when no expert is read on demand. Trained routers are skewed, which a cache that
    /// keeps recently or often used experts usually turns into more hits.
    #[serde(default)]
    pub expected_expert_hit_rate: Option<f64>,
    /// The predicted time per token.
    pub predicted: TokenTime,
}

impl Plan {
    /// The tier of a unit.
    ///
    /// # Panics
    ///
    /// If `unit` is not an index into the manifest the plan was made for.
    pub fn tier_of(&self, unit: usize) -> Tier {
        self.placements[unit].tier
    }

    /// The streamed units, in execution order.
    pub fn streamed_units(&self) -> Vec<usize> {
        self.stream_order.clone()
    }

    /// A table for people: one line per group of units of the same kind, adjacent layers and
    /// the same tier (such as `layers 0-7 attention  RAM  84 MB`), then the staging ring, the
    /// memory of each tier and the predicted time per token.
    pub fn to_table(&self, m: &WeightManifest) -> String {
        let groups = group_units(self, m);
        let label_width = groups.iter().map(|g| g.label.len()).max().unwrap_or(0).max("unit".len());
        let mut out = String::new();
        let mut ring = if self.staging_buffers == 0 {
            "nothing streamed".to_string()
        } else {
            format!(
                "prefetch depth {}, {} staging buffer{} of {}",
                self.prefetch_depth,
                self.staging_buffers,
                if self.staging_buffers == 1 { "" } else { "s" },
                format_size(self.staging_buffer_bytes)
            )
        };
        if self.ram.expert_cache > 0 {
            let streamed = if self.staging_buffers == 0 { "experts".to_string() } else { format!("{ring}; experts") };
            ring = format!("{streamed} read on demand into an expert cache of {}", format_size(self.ram.expert_cache));
            if let Some(rate) = self.expected_expert_hit_rate {
                ring.push_str(&format!(" (expected hit rate {rate:.2} under uniform routing)"));
            }
        }
        out.push_str(&format!("strategy {}: {ring}\n", self.strategy));
        out.push_str(&format!("{:<label_width$}  {:<6}  {:>8}\n", "unit", "tier", "size"));
        for group in &groups {
            let tier = group.tier.map_or("none".to_string(), |t| t.to_string());
            out.push_str(&format!("{:<label_width$}  {tier:<6}  {:>8}\n", group.label, format_size(group.bytes)));
        }
        out.push_str(&memory_line("RAM", &self.ram, self.budgets.ram));
        if self.vram.total == 0 {
            out.push_str("VRAM  unused\n");
        } else {
            out.push_str(&memory_line("VRAM", &self.vram, self.budgets.vram));
        }
        out.push_str(&format!("streamed per token: {}\n", format_size(self.bytes_streamed_per_token)));
        out.push_str(&format!(
            "predicted per token: {} (compute {}, transfer {})\n",
            format_seconds(self.predicted.total_s),
            format_seconds(self.predicted.compute_s),
            format_seconds(self.predicted.transfer_s)
        ));
        out
    }
}

fn memory_line(name: &str, memory: &MemoryUse, budget: Option<u64>) -> String {
    let budget = budget.map_or("unlimited".to_string(), format_size);
    format!(
        "{name:<4}  {} of {budget}: weights {}, KV cache {}, activations {}, staging {}{}{}\n",
        format_size(memory.total),
        format_size(memory.resident_weights),
        format_size(memory.kv_cache),
        format_size(memory.activations),
        format_size(memory.staging),
        if memory.expert_cache > 0 {
            format!(", expert cache {}", format_size(memory.expert_cache))
        } else {
            String::new()
        },
        if memory.process > 0 { format!(", process {}", format_size(memory.process)) } else { String::new() }
    )
}

/// Formats seconds with three significant digits in s, ms, µs or ns.
fn format_seconds(s: f64) -> String {
    let (value, unit) = if s >= 1.0 || s == 0.0 {
        (s, "s")
    } else if s >= 1e-3 {
        (s * 1e3, "ms")
    } else if s >= 1e-6 {
        (s * 1e6, "µs")
    } else {
        (s * 1e9, "ns")
    };
    let decimals = if value < 10.0 {
        2
    } else if value < 100.0 {
        1
    } else {
        0
    };
    let text = format!("{value:.decimals$}");
    let trimmed = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    format!("{trimmed} {unit}")
}

/// One line of the table.
struct Group {
    label: String,
    tier: Option<Tier>,
    bytes: u64,
}

/// The category of a unit in the table, in the order the table lists them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Category {
    Embedding,
    Attention,
    Ffn,
    Expert,
    Head,
    Other,
}

fn category(kind: UnitKind) -> (Category, usize, usize) {
    match kind {
        UnitKind::Embedding => (Category::Embedding, 0, 0),
        UnitKind::Attention { layer } => (Category::Attention, layer, 0),
        UnitKind::Ffn { layer } => (Category::Ffn, layer, 0),
        UnitKind::Expert { layer, expert } => (Category::Expert, layer, expert),
        UnitKind::Head => (Category::Head, 0, 0),
        UnitKind::Other => (Category::Other, 0, 0),
    }
}

/// Collapses the units into runs of one category, one tier and adjacent positions (layers,
/// or experts in layer order).
fn group_units(plan: &Plan, m: &WeightManifest) -> Vec<Group> {
    let mut units: Vec<(Category, usize, usize, usize)> = m
        .units
        .iter()
        .enumerate()
        .map(|(i, unit)| {
            let (cat, layer, expert) = category(unit.kind);
            (cat, layer, expert, i)
        })
        .collect();
    units.sort();
    let mut last_experts: BTreeMap<usize, usize> = BTreeMap::new();
    for &(cat, layer, expert, _) in &units {
        if cat == Category::Expert {
            let last = last_experts.entry(layer).or_insert(expert);
            *last = (*last).max(expert);
        }
    }
    let last_expert = |layer: usize| last_experts.get(&layer).copied().unwrap_or(0);
    let tier = |i: usize| plan.placements.get(i).map(|p| p.tier);
    let mut groups = Vec::new();
    let mut start = 0;
    while start < units.len() {
        let (cat, layer, expert, first) = units[start];
        let mut end = start + 1;
        while end < units.len() {
            let (next_cat, next_layer, next_expert, next) = units[end];
            let (_, prev_layer, prev_expert, _) = units[end - 1];
            let adjacent = match cat {
                Category::Attention | Category::Ffn => next_layer <= prev_layer + 1,
                Category::Expert => {
                    (next_layer == prev_layer && next_expert <= prev_expert + 1)
                        || (next_layer == prev_layer + 1 && next_expert == 0 && prev_expert == last_expert(prev_layer))
                }
                Category::Embedding | Category::Head | Category::Other => true,
            };
            if next_cat != cat || tier(next) != tier(first) || !adjacent {
                break;
            }
            end += 1;
        }
        let (_, end_layer, end_expert, _) = units[end - 1];
        let count = end - start;
        let label = match cat {
            Category::Embedding | Category::Head | Category::Other if count == 1 => m.units[first].name.clone(),
            Category::Embedding => format!("embedding ({count} units)"),
            Category::Head => format!("head ({count} units)"),
            Category::Other => format!("other ({count} units)"),
            Category::Attention | Category::Ffn => {
                let what = if cat == Category::Attention { "attention" } else { "ffn" };
                if layer == end_layer {
                    format!("layer {layer} {what}")
                } else {
                    format!("layers {layer}-{end_layer} {what}")
                }
            }
            Category::Expert => {
                let whole_layers = expert == 0 && end_expert == last_expert(end_layer);
                match (whole_layers, layer == end_layer) {
                    (true, true) => format!("layer {layer} experts"),
                    (true, false) => format!("layers {layer}-{end_layer} experts"),
                    (false, true) => format!("layer {layer} experts {expert}-{end_expert}"),
                    (false, false) => format!("layer {layer} expert {expert} - layer {end_layer} expert {end_expert}"),
                }
            }
        };
        let bytes = units[start..end].iter().fold(0u64, |sum, u| sum.saturating_add(m.units[u.3].bytes));
        groups.push(Group { label, tier: tier(first), bytes });
        start = end;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_format_with_three_digits() {
        assert_eq!(format_seconds(0.0), "0 s");
        assert_eq!(format_seconds(1.234), "1.23 s");
        assert_eq!(format_seconds(0.3312), "331 ms");
        assert_eq!(format_seconds(0.058), "58 ms");
        assert_eq!(format_seconds(0.000_012_5), "12.5 µs");
        assert_eq!(format_seconds(3e-9), "3 ns");
    }

    #[test]
    fn tiers_display_for_tables_and_serialize_in_lower_case() {
        assert_eq!(format!("{:<4}|", Tier::Ram), "RAM |");
        assert_eq!(Tier::Disk.to_string(), "disk");
        assert_eq!(serde_json::to_string(&Tier::Vram).unwrap(), r#""vram""#);
    }
}
