//! FlexGen's zig-zag block schedule as data: a [`ZigzagPlan`] is a list of [`Step`]s, each a set of
//! operations that may run at the same time (loads for the next step, the compute of this one,
//! stores of the previous one) followed by a synchronization. It can be printed and tested
//! without a model; the executor (`crate::exec`) carries it out.
//!
//! Loop order (FlexGen's, with the batch loop innermost): for token `i`, for unit `j`, for GPU
//! batch `k`. A unit's weights are loaded once per token and reused by all `nb` batches into
//! one of four weight slots (MLPs alternate between two, the other units between the other
//! two): at most three units' streamed weights are on the GPU, the one computing and the next,
//! and with `sep_layer` an MLP's beside the MLP before it (two layers' weights at most, as the
//! cost model counts).

use std::fmt;

/// What a unit of the model computes; with `sep_layer` each transformer layer is two units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// Token embedding (+ learned positions, OPT's `project_in`).
    Embed,
    /// A layer's attention half (reads and appends to the KV cache).
    Attention(usize),
    /// A layer's MLP half.
    Mlp(usize),
    /// A whole layer (`sep_layer = false`): attention then MLP.
    Layer(usize),
    /// The final norm (OPT: and `project_out`): the rows the output projection reads.
    Head,
    /// Panel `p` of the output projection: its rows' logits folded into each row's running
    /// log-softmax; the last panel yields the per-row logprob or argmax. The projection
    /// streams a panel at a time, so no unit holds more than a panel of it.
    Logits(usize),
}

impl UnitKind {
    /// Whether the unit reads and writes the KV cache.
    pub fn has_cache(self) -> bool {
        matches!(self, UnitKind::Attention(_) | UnitKind::Layer(_))
    }

    /// The model's units in order: the input, the layers, the head, then `logit_panels`
    /// (at least one) panels of the output projection.
    pub fn sequence(layers: usize, sep_layer: bool, logit_panels: usize) -> Vec<UnitKind> {
        let mut units = vec![UnitKind::Embed];
        for l in 0..layers {
            if sep_layer {
                units.push(UnitKind::Attention(l));
                units.push(UnitKind::Mlp(l));
            } else {
                units.push(UnitKind::Layer(l));
            }
        }
        units.push(UnitKind::Head);
        units.extend((0..logit_panels.max(1)).map(UnitKind::Logits));
        units
    }
}

/// One operation; `token` 0 is the prefill, later tokens decode one new token per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Bring unit `unit`'s streamed weights onto the GPU for `token`.
    LoadWeight {
        /// Token index.
        token: usize,
        /// Unit index.
        unit: usize,
    },
    /// Drop unit `unit`'s streamed weights from the GPU after its last batch of `token` (at the
    /// end of its step, after the sync).
    ReleaseWeight {
        /// Token index.
        token: usize,
        /// Unit index.
        unit: usize,
    },
    /// Bring batch `batch`'s KV cache of `unit` to where it is computed.
    LoadCache(Cell),
    /// Bring batch `batch`'s input activations of `unit` to the GPU.
    LoadActivation(Cell),
    /// Run `unit` on batch `batch`.
    Compute(Cell),
    /// Write the new KV-cache rows of the cell back to their tiers.
    StoreCache(Cell),
    /// Move the cell's output activations to their tiers (for the output unit: the results).
    StoreActivation(Cell),
}

/// A (token, unit, batch) coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// Token index (0 = prefill).
    pub token: usize,
    /// Unit index into [`ZigzagPlan::units`].
    pub unit: usize,
    /// GPU batch within the block.
    pub batch: usize,
}

/// One step: operations that may overlap, then a synchronization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// At most one `Compute`; loads for the next cell, stores of the previous one.
    pub ops: Vec<Op>,
}

/// The shape of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanShape {
    /// Transformer layers.
    pub layers: usize,
    /// GPU batches per block (`nb`).
    pub num_batches: usize,
    /// Tokens per sequence processed: 1 for scoring (prefill only), 1 + new tokens to generate.
    pub gen_len: usize,
    /// Attention and MLP as separate units.
    pub sep_layer: bool,
    /// Panels the output projection streams in (at least one).
    pub logit_panels: usize,
}

/// The zig-zag block schedule of one block of `num_batches` GPU batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZigzagPlan {
    /// What it was built for.
    pub shape: PlanShape,
    /// Units in compute order.
    pub units: Vec<UnitKind>,
    /// Steps in order; step 0 is the prologue (first loads only).
    pub steps: Vec<Step>,
    /// Per unit, its place among the units that are not MLPs.
    non_mlp_ordinal: Vec<usize>,
    /// Units per token that are not MLPs.
    non_mlp_units: usize,
}

impl ZigzagPlan {
    /// Builds the schedule. Cache loads exist only for decode tokens (the prefill starts with an
    /// empty cache) and cache stores only when a later token reads them.
    ///
    /// Placement follows FlexGen: the loads of cell `n + 1` share a step with the compute of
    /// cell `n`, the stores of cell `n - 1` too; unit `j + 1`'s weights load during the step
    /// that computes `(j, batch 0)`, so they overlap all `nb` batches of unit `j`, except an
    /// MLP's that follows another MLP two units back ([`ZigzagPlan::load_trigger`]). A load
    /// whose input is not stored yet (one batch: unit `j`'s output feeds unit `j + 1` of the
    /// same batch) moves to the first step after that store.
    pub fn new(shape: PlanShape) -> Self {
        let units = UnitKind::sequence(shape.layers, shape.sep_layer, shape.logit_panels);
        let nb = shape.num_batches.max(1);
        let tokens = shape.gen_len.max(1);
        let non_mlp = |u: &UnitKind| !matches!(u, UnitKind::Mlp(_));
        let non_mlp_ordinal = units
            .iter()
            .scan(0, |n, u| {
                let at = *n;
                *n += usize::from(non_mlp(u));
                Some(at)
            })
            .collect();
        let non_mlp_units = units.iter().filter(|u| non_mlp(u)).count();
        let mut plan = Self {
            shape: PlanShape {
                num_batches: nb,
                gen_len: tokens,
                ..shape
            },
            units,
            steps: Vec::new(),
            non_mlp_ordinal,
            non_mlp_units,
        };
        // per unit, the units of the same token whose loads start beside its first batch
        let mut triggered: Vec<Vec<usize>> = vec![Vec::new(); plan.units.len()];
        for unit in 1..plan.units.len() {
            triggered[plan.load_trigger(unit)].push(unit);
        }
        let cells: Vec<Cell> = (0..tokens)
            .flat_map(|token| {
                (0..plan.units.len())
                    .flat_map(move |unit| (0..nb).map(move |batch| Cell { token, unit, batch }))
            })
            .collect();
        let mut placed: std::collections::HashMap<Op, usize> = Default::default();
        let mut at: Vec<Vec<Op>> = Vec::new();
        let mut put = |op: Op, step: usize, placed: &mut std::collections::HashMap<Op, usize>| {
            if at.len() <= step {
                at.resize(step + 1, Vec::new());
            }
            at[step].push(op);
            placed.insert(op, step);
        };
        put(Op::LoadWeight { token: 0, unit: 0 }, 0, &mut placed);
        let mut prev_compute: Option<usize> = None;
        for &c in &cells {
            // loads of this cell, overlapping the previous compute where their inputs allow
            let earliest = prev_compute.unwrap_or(0);
            let mut ready = earliest;
            let mut loads = Vec::new();
            if plan.units[c.unit].has_cache() && c.token > 0 {
                loads.push(Op::LoadCache(c));
            }
            loads.push(Op::LoadActivation(c));
            for op in loads {
                let after = plan
                    .dependencies(op)
                    .iter()
                    .map(|d| placed[d] + 1)
                    .max()
                    .unwrap_or(0);
                let step = earliest.max(after);
                put(op, step, &mut placed);
                ready = ready.max(step);
            }
            let weight = placed[&Op::LoadWeight {
                token: c.token,
                unit: c.unit,
            }];
            let compute = ready.max(weight) + 1;
            put(Op::Compute(c), compute, &mut placed);
            // the weights that start loading beside this unit's first batch (the next token's
            // input beside the last unit)
            if c.batch == 0 {
                let mut loads: Vec<(usize, usize)> =
                    triggered[c.unit].iter().map(|&u| (c.token, u)).collect();
                if c.unit + 1 == plan.units.len() && c.token + 1 < tokens {
                    loads.push((c.token + 1, 0));
                }
                for (token, unit) in loads {
                    put(Op::LoadWeight { token, unit }, compute, &mut placed);
                }
            }
            // stores overlap the next compute
            if plan.units[c.unit].has_cache() && c.token + 1 < tokens {
                put(Op::StoreCache(c), compute + 1, &mut placed);
            }
            put(Op::StoreActivation(c), compute + 1, &mut placed);
            if c.batch + 1 == nb {
                put(
                    Op::ReleaseWeight {
                        token: c.token,
                        unit: c.unit,
                    },
                    compute,
                    &mut placed,
                );
            }
            prev_compute = Some(compute);
        }
        // loads, then the compute, then stores, then releases (after the compute using them)
        for step in &mut at {
            step.sort_by_key(|op| op.rank());
        }
        plan.steps = at.into_iter().map(|ops| Step { ops }).collect();
        plan
    }

    /// The weight slot (0 to 3) that unit `unit` of token `token` streams into: MLPs alternate
    /// between slots 2 and 3, the other units between 0 and 1, so at most two layers'
    /// streamed weights are held at once (as the cost model counts).
    pub fn weight_slot(&self, token: usize, unit: usize) -> usize {
        match self.units[unit] {
            UnitKind::Mlp(layer) => 2 + layer % 2,
            _ => (token * self.non_mlp_units + self.non_mlp_ordinal[unit]) % 2,
        }
    }

    /// The unit (of the same token, before `unit` > 0) beside whose first batch `unit`'s
    /// weights start loading: the unit before, except for an MLP that follows another MLP two
    /// units back (`sep_layer`), which loads beside that MLP, so during two units (an MLP's
    /// weights are the larger part of a layer, and the attention unit before it computes
    /// briefly). Its slot's previous holder, the MLP before that one, is released by then.
    ///
    /// Loading every layer unit as far ahead as its slot allows (a layer ahead) was measured
    /// too, on SmolLM2 with every weight on disk: the disk idled less but the decode step was
    /// no shorter, with prompts of 16 and of 1,024 tokens (BENCHMARKS.md, c, session 19), for
    /// one more unit's weights held.
    pub fn load_trigger(&self, unit: usize) -> usize {
        let mlp = |u: usize| matches!(self.units.get(u), Some(UnitKind::Mlp(_)));
        if unit >= 2 && mlp(unit) && mlp(unit - 2) {
            unit - 2
        } else {
            unit.saturating_sub(1)
        }
    }

    /// Every operation with its step index, in order.
    pub fn ops(&self) -> impl Iterator<Item = (usize, Op)> + '_ {
        self.steps
            .iter()
            .enumerate()
            .flat_map(|(s, step)| step.ops.iter().map(move |&op| (s, op)))
    }

    /// The operations `op` needs finished before it starts: all in earlier steps, except that a
    /// `ReleaseWeight` runs after its own step's sync, so its compute may share the step.
    pub fn dependencies(&self, op: Op) -> Vec<Op> {
        match op {
            Op::Compute(c) => {
                let mut deps = vec![
                    Op::LoadWeight {
                        token: c.token,
                        unit: c.unit,
                    },
                    Op::LoadActivation(c),
                ];
                if self.units[c.unit].has_cache() && c.token > 0 {
                    deps.push(Op::LoadCache(c));
                }
                deps
            }
            Op::StoreCache(c) | Op::StoreActivation(c) => vec![Op::Compute(c)],
            Op::LoadCache(c) => vec![Op::StoreCache(Cell {
                token: c.token - 1,
                ..c
            })],
            Op::LoadActivation(c) => {
                // the input is the previous unit's output, or the previous token's result
                if c.unit > 0 {
                    vec![Op::StoreActivation(Cell {
                        unit: c.unit - 1,
                        ..c
                    })]
                } else if c.token > 0 {
                    vec![Op::StoreActivation(Cell {
                        token: c.token - 1,
                        unit: self.units.len() - 1,
                        ..c
                    })]
                } else {
                    Vec::new()
                }
            }
            Op::LoadWeight { .. } => Vec::new(),
            Op::ReleaseWeight { token, unit } => {
                let nb = self.shape.num_batches.max(1);
                vec![Op::Compute(Cell {
                    token,
                    unit,
                    batch: nb - 1,
                })]
            }
        }
    }
}

impl Op {
    /// Order of display within a step.
    fn rank(&self) -> u8 {
        match self {
            Op::LoadWeight { .. } => 0,
            Op::LoadCache(_) => 1,
            Op::LoadActivation(_) => 2,
            Op::Compute(_) => 3,
            Op::StoreCache(_) => 4,
            Op::StoreActivation(_) => 5,
            Op::ReleaseWeight { .. } => 6,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cell = |f: &mut fmt::Formatter<'_>, name: &str, c: &Cell| {
            write!(f, "{name}(i={}, j={}, k={})", c.token, c.unit, c.batch)
        };
        match self {
            Op::LoadWeight { token, unit } => write!(f, "load_weight(i={token}, j={unit})"),
            Op::ReleaseWeight { token, unit } => write!(f, "release_weight(i={token}, j={unit})"),
            Op::LoadCache(c) => cell(f, "load_cache", c),
            Op::LoadActivation(c) => cell(f, "load_activation", c),
            Op::Compute(c) => cell(f, "compute", c),
            Op::StoreCache(c) => cell(f, "store_cache", c),
            Op::StoreActivation(c) => cell(f, "store_activation", c),
        }
    }
}

impl fmt::Display for ZigzagPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (s, step) in self.steps.iter().enumerate() {
            let ops: Vec<String> = step.ops.iter().map(Op::to_string).collect();
            writeln!(f, "step {s:>4}: {}; sync", ops.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    fn shape() -> impl Strategy<Value = PlanShape> {
        (1usize..5, 1usize..5, 1usize..5, any::<bool>(), 1usize..4).prop_map(
            |(layers, num_batches, gen_len, sep_layer, logit_panels)| PlanShape {
                layers,
                num_batches,
                gen_len,
                sep_layer,
                logit_panels,
            },
        )
    }

    #[test]
    fn prints_flexgen_order() {
        let plan = ZigzagPlan::new(PlanShape {
            layers: 1,
            num_batches: 3,
            gen_len: 2,
            sep_layer: true,
            logit_panels: 1,
        });
        let text = plan.to_string();
        let expected = "\
step    0: load_weight(i=0, j=0), load_activation(i=0, j=0, k=0); sync
step    1: load_weight(i=0, j=1), load_activation(i=0, j=0, k=1), compute(i=0, j=0, k=0); sync
step    2: load_activation(i=0, j=0, k=2), compute(i=0, j=0, k=1), store_activation(i=0, j=0, k=0); sync
step    3: load_activation(i=0, j=1, k=0), compute(i=0, j=0, k=2), store_activation(i=0, j=0, k=1), release_weight(i=0, j=0); sync
step    4: load_weight(i=0, j=2), load_activation(i=0, j=1, k=1), compute(i=0, j=1, k=0), store_activation(i=0, j=0, k=2); sync
";
        assert!(text.starts_with(expected), "{text}");
        // the decode token loads the cache the prefill stored, and stores none
        assert!(text.contains("load_cache(i=1, j=1, k=0)"));
        assert!(text.contains("store_cache(i=0, j=1, k=1)"));
        assert!(!text.contains("store_cache(i=1"));
    }

    proptest! {
        #[test]
        fn plans_respect_the_schedule_invariants(shape in shape()) {
            let plan = ZigzagPlan::new(shape);
            let units = plan.units.len();
            let expected_units =
                2 + shape.logit_panels + shape.layers * if shape.sep_layer { 2 } else { 1 };
            prop_assert_eq!(units, expected_units);
            let step_of: HashMap<Op, usize> = plan.ops().map(|(s, op)| (op, s)).collect();
            prop_assert_eq!(step_of.len(), plan.ops().count(), "an operation appears twice");

            // every (token, unit, batch) computed exactly once
            let computed: Vec<Cell> = plan
                .ops()
                .filter_map(|(_, op)| match op { Op::Compute(c) => Some(c), _ => None })
                .collect();
            let unique: HashSet<Cell> = computed.iter().copied().collect();
            prop_assert_eq!(computed.len(), unique.len());
            prop_assert_eq!(unique.len(), shape.gen_len * units * shape.num_batches);

            // every dependency exists and finishes in an earlier step (loads before use,
            // stores after the compute that produces them)
            for (s, op) in plan.ops() {
                for dep in plan.dependencies(op) {
                    let Some(&ds) = step_of.get(&dep) else {
                        return Err(TestCaseError::fail(format!("{op} needs {dep}, never scheduled")));
                    };
                    // a release happens after its step's sync, so it may share the compute's step
                    let same_step_ok = matches!(op, Op::ReleaseWeight { .. });
                    prop_assert!(ds < s || (same_step_ok && ds == s),
                        "{} (step {}) needs {} (step {})", op, s, dep, ds);
                }
            }
            // at most one compute per step
            for step in &plan.steps {
                prop_assert!(step.ops.iter().filter(|o| matches!(o, Op::Compute(_))).count() <= 1);
            }

            // a slot holds one unit's weights at a time (loads go into released slots only),
            // MLPs in slots 2 and 3 and other units in 0 and 1; at most two units' streamed
            // weights at any step, three when an MLP's load early (then two of them MLPs)
            let mut in_slot: HashMap<usize, (usize, usize)> = HashMap::new();
            for step in &plan.steps {
                for op in &step.ops {
                    if let Op::LoadWeight { token, unit } = *op {
                        let slot = plan.weight_slot(token, unit);
                        let mlp = matches!(plan.units[unit], UnitKind::Mlp(_));
                        prop_assert_eq!(slot >= 2, mlp);
                        let before = in_slot.insert(slot, (token, unit));
                        prop_assert!(before.is_none(), "{} into slot {} holding {:?}", op, slot, before);
                    }
                }
                let mlps = in_slot.keys().filter(|&&slot| slot >= 2).count();
                prop_assert!(
                    in_slot.len() <= 2 || (shape.sep_layer && in_slot.len() == 3 && mlps == 2),
                    "{:?}",
                    in_slot
                );
                for op in &step.ops {
                    if let Op::Compute(c) = *op {
                        let slot = plan.weight_slot(c.token, c.unit);
                        prop_assert_eq!(in_slot.get(&slot), Some(&(c.token, c.unit)));
                    }
                    if let Op::ReleaseWeight { token, unit } = *op {
                        let slot = plan.weight_slot(token, unit);
                        prop_assert_eq!(in_slot.remove(&slot), Some((token, unit)));
                    }
                }
            }
            prop_assert!(in_slot.is_empty());

            // loads in compute order, each beside its trigger's first batch: an MLP after an
            // MLP beside that one, others beside the unit before
            let mut last_load = None;
            for (s, op) in plan.ops() {
                if let Op::LoadWeight { token, unit } = op {
                    prop_assert!(last_load < Some((token, unit)), "{} out of order", op);
                    last_load = Some((token, unit));
                    if unit == 0 {
                        continue;
                    }
                    let early = matches!(plan.units[unit], UnitKind::Mlp(l) if l > 0);
                    prop_assert!(!early || shape.sep_layer);
                    let trigger = plan.load_trigger(unit);
                    prop_assert_eq!(trigger, if early { unit - 2 } else { unit - 1 });
                    let beside = Op::Compute(Cell { token, unit: trigger, batch: 0 });
                    prop_assert_eq!(step_of.get(&beside), Some(&s));
                }
            }

            // with three or more batches, every step between prologue and epilogue computes
            if shape.num_batches >= 3 {
                for step in &plan.steps[1..plan.steps.len() - 1] {
                    prop_assert!(step.ops.iter().any(|o| matches!(o, Op::Compute(_))));
                }
            }

            // a weight is loaded once per token and unit, not once per batch
            let weight_loads = plan.ops().filter(|(_, o)| matches!(o, Op::LoadWeight { .. })).count();
            prop_assert_eq!(weight_loads, shape.gen_len * units);

            // the cache is stored exactly when a later token reads it
            for (_, op) in plan.ops() {
                if let Op::StoreCache(c) = op {
                    prop_assert!(c.token + 1 < shape.gen_len);
                    let next = Op::LoadCache(Cell { token: c.token + 1, ..c });
                    prop_assert!(step_of.contains_key(&next));
                }
            }
        }
    }
}
