//! Where each extent of a volume lives: run-length encoded replica sets, and the deterministic
//! algorithm that chooses them.
//!
//! A volume's extents are grouped into runs of consecutive extents that share one [`ReplicaSet`];
//! a 100 TiB volume on one node is a single run. Placement is computed inside the state machine
//! from the state alone (no clock, no randomness), so every voter derives the same answer.
//!
//! Invariants kept by [`Placement`]: runs are contiguous from extent 0, never empty, and two
//! neighbouring runs never carry equal replica sets (they are merged on append), so the encoding
//! of a placement is canonical.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::NodeId;

/// The replicas of one extent: the nodes that hold a copy, fenced by an epoch.
///
/// Replicas refuse I/O carrying an older epoch (DESIGN.md, "Fencing"); any change to `nodes`
/// or `rebuild` bumps `epoch`. `nodes` is sorted ascending so equal sets compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaSet {
    pub epoch: u64,
    /// The healthy replicas: complete, read from, counted for `min_replicas`.
    pub nodes: Vec<NodeId>,
    /// Replicas being built: they receive every write, but are neither read from nor counted
    /// until the copy is done.
    pub rebuild: Option<Rebuild>,
}

/// A rebuild in progress on a run of extents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rebuild {
    /// The nodes being built, sorted.
    pub targets: Vec<NodeId>,
    /// Extents of the run copied so far, from its first: where a restarted copy resumes.
    pub copied_extents: u64,
    /// When the rebuild started, seconds since the Unix epoch, as stamped by the proposer.
    pub started_unix: i64,
    /// When `copied_extents` was last reported, likewise (for the rate and ETA).
    pub reported_unix: i64,
}

impl ReplicaSet {
    /// Epoch of a freshly placed replica set.
    pub const FIRST_EPOCH: u64 = 1;

    /// A replica set at [`Self::FIRST_EPOCH`]; `nodes` are sorted and deduplicated.
    pub fn new(mut nodes: Vec<NodeId>) -> Self {
        nodes.sort_unstable();
        nodes.dedup();
        Self {
            epoch: Self::FIRST_EPOCH,
            nodes,
            rebuild: None,
        }
    }

    /// Whether `node` holds a healthy replica.
    pub fn contains(&self, node: NodeId) -> bool {
        self.nodes.binary_search(&node).is_ok()
    }

    /// The nodes being built.
    pub fn targets(&self) -> &[NodeId] {
        self.rebuild.as_ref().map_or(&[], |r| r.targets.as_slice())
    }

    /// Every node that holds or is getting a replica (and takes the extent's writes).
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().chain(self.targets()).copied()
    }

    /// Whether `node` holds or is getting a replica.
    pub fn receives(&self, node: NodeId) -> bool {
        self.members().any(|member| member == node)
    }
}

/// One run of consecutive extents sharing a replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRun {
    /// Number of extents in the run (at least 1).
    pub count: u64,
    pub replicas: ReplicaSet,
}

/// The replica set of every extent of a volume, run-length encoded by first extent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    runs: BTreeMap<u64, PlacementRun>,
}

impl Placement {
    /// The replica set of `extent`, or `None` past the last placed extent.
    pub fn replica_set(&self, extent: u64) -> Option<&ReplicaSet> {
        self.run_of(extent).map(|(_, run)| &run.replicas)
    }

    /// The first extent of the run holding `extent`.
    pub fn run_start(&self, extent: u64) -> Option<u64> {
        self.run_of(extent).map(|(first, _)| first)
    }

    /// The run holding `extent`, with its first extent.
    fn run_of(&self, extent: u64) -> Option<(u64, &PlacementRun)> {
        let (first, run) = self.runs.range(..=extent).next_back()?;
        (extent - first < run.count).then_some((*first, run))
    }

    /// Number of extents placed so far.
    pub fn extent_count(&self) -> u64 {
        self.runs
            .iter()
            .next_back()
            .map_or(0, |(first, run)| first + run.count)
    }

    /// The runs in extent order, as `(first_extent, run)`.
    pub fn runs(&self) -> impl Iterator<Item = (u64, &PlacementRun)> {
        self.runs.iter().map(|(first, run)| (*first, run))
    }

    /// Number of runs (the size of the encoding, not of the volume).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Takes `node` out of every replica set holding it, bumping each one's epoch so the node is
    /// fenced off. Refused, changing nothing, when a set would keep fewer than `min` replicas.
    /// Returns how many sets changed.
    pub fn drop_node(&mut self, node: NodeId, min: usize) -> Result<u64, ShortRun> {
        if let Some((first, run)) = self
            .runs
            .iter()
            .find(|(_, run)| run.replicas.contains(node) && run.replicas.nodes.len() <= min)
        {
            return Err(ShortRun {
                first_extent: *first,
                remaining: run.replicas.nodes.len() - 1,
            });
        }
        let mut changed = 0;
        for run in self.runs.values_mut() {
            if !run.replicas.receives(node) {
                continue;
            }
            run.replicas.nodes.retain(|n| *n != node);
            if let Some(rebuild) = &mut run.replicas.rebuild {
                rebuild.targets.retain(|n| *n != node);
                if rebuild.targets.is_empty() {
                    run.replicas.rebuild = None;
                }
            }
            run.replicas.epoch += 1;
            changed += 1;
        }
        Ok(changed)
    }

    /// The run starting at extent `first`.
    pub fn run_at_mut(&mut self, first: u64) -> Option<&mut PlacementRun> {
        self.runs.get_mut(&first)
    }

    /// Bumps the epoch of every run: whatever was sent at the old epochs is refused.
    pub fn fence_all(&mut self) {
        for run in self.runs.values_mut() {
            run.replicas.epoch += 1;
        }
    }

    /// Bumps the epoch of every run with a rebuild in progress: whoever copies for it now is
    /// fenced off (the volume changed hands).
    pub fn fence_rebuilds(&mut self) -> u64 {
        let mut fenced = 0;
        for run in self.runs.values_mut() {
            if run.replicas.rebuild.is_some() {
                run.replicas.epoch += 1;
                fenced += 1;
            }
        }
        fenced
    }

    /// Places the next `count` extents on `replicas`, merging with the last run when equal.
    pub fn push(&mut self, count: u64, replicas: ReplicaSet) {
        if count == 0 {
            return;
        }
        let next = self.extent_count();
        if let Some(mut last) = self.runs.last_entry()
            && last.get().replicas == replicas
        {
            last.get_mut().count += count;
            return;
        }
        self.runs.insert(next, PlacementRun { count, replicas });
    }
}

/// Dropping a node would leave a replica set with too few replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortRun {
    pub first_extent: u64,
    /// Replicas the set would keep.
    pub remaining: usize,
}

/// Smallest run the placer creates, in extents: with 64 MiB extents a 1 GiB stripe, so that
/// small volumes stay one or a few runs.
pub const MIN_RUN_EXTENTS: u64 = 16;

/// Upper bound on the runs one placement call creates, so a huge volume on many nodes keeps a
/// small state row (the stripe grows with the volume instead).
pub const MAX_RUNS_PER_PLACEMENT: u64 = 256;

/// Node labels that name a failure domain larger than one node, coarsest first: replicas spread
/// over zones when every candidate node has a `zone` label, else over racks when every one has a
/// `rack` label, else over nodes.
pub const DOMAIN_LABELS: [&str; 2] = ["zone", "rack"];

/// What the placer needs to know about one candidate node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    /// Capacity of the node's disks minus the bytes already provisioned on it. May be negative
    /// when the pool is overcommitted.
    pub free: i128,
    /// Its failure domain: two replicas of an extent never share one. Equal numbers, equal
    /// domain (the node id itself when nodes are the domain).
    pub domain: u64,
}

/// The arguments of one placement call: extents `[first_extent, end_extent)` of a volume of
/// `volume_size` bytes cut into `extent_size` extents.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest {
    pub first_extent: u64,
    pub end_extent: u64,
    pub extent_size: u64,
    pub volume_size: u64,
    pub replicas: u8,
}

/// Appends replica sets for the requested extents to `placement`.
///
/// The extents are cut into stripes of at least [`MIN_RUN_EXTENTS`]; each stripe goes to the
/// `replicas` candidates with the most free capacity (ties to the lower node id) that lie in
/// distinct failure domains, and its bytes are charged to them before the next stripe is placed,
/// so a large volume spreads across nodes in proportion to their free space. The caller has
/// checked that there are at least `replicas` domains; with fewer, the stripes get one replica
/// per domain.
pub fn place(placement: &mut Placement, candidates: &[Candidate], request: PlacementRequest) {
    let mut candidates = candidates.to_vec();
    let extents = request.end_extent.saturating_sub(request.first_extent);
    let stripe = MIN_RUN_EXTENTS.max(extents.div_ceil(MAX_RUNS_PER_PLACEMENT));
    let wanted = usize::from(request.replicas).min(domain_count(&candidates));
    let mut first = request.first_extent;
    while first < request.end_extent {
        let count = stripe.min(request.end_extent - first);
        let start_byte = u128::from(first) * u128::from(request.extent_size);
        let end_byte = (u128::from(first + count) * u128::from(request.extent_size))
            .min(u128::from(request.volume_size));
        let bytes = i128::try_from(end_byte.saturating_sub(start_byte)).unwrap_or(i128::MAX);
        candidates.sort_by(|a, b| b.free.cmp(&a.free).then(a.node.cmp(&b.node)));
        let mut domains = Vec::with_capacity(wanted);
        let mut chosen = Vec::with_capacity(wanted);
        for candidate in &mut candidates {
            if chosen.len() == wanted {
                break;
            }
            if !domains.contains(&candidate.domain) {
                domains.push(candidate.domain);
                chosen.push(candidate.node);
                candidate.free = candidate.free.saturating_sub(bytes);
            }
        }
        placement.push(count, ReplicaSet::new(chosen));
        first += count;
    }
}

/// Number of distinct failure domains among `candidates`.
pub fn domain_count(candidates: &[Candidate]) -> usize {
    let mut domains: Vec<u64> = candidates.iter().map(|c| c.domain).collect();
    domains.sort_unstable();
    domains.dedup();
    domains.len()
}

/// Bytes of a volume of `volume_size` covered by extents `[first, first + count)`.
pub fn run_bytes(first: u64, count: u64, extent_size: u64, volume_size: u64) -> u64 {
    let start = u128::from(first) * u128::from(extent_size);
    let end = (u128::from(first.saturating_add(count)) * u128::from(extent_size))
        .min(u128::from(volume_size));
    u64::try_from(end.saturating_sub(start)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn request(first: u64, end: u64, size: u64, replicas: u8) -> PlacementRequest {
        PlacementRequest {
            first_extent: first,
            end_extent: end,
            extent_size: 64 * MIB,
            volume_size: size,
            replicas,
        }
    }

    #[test]
    fn a_huge_single_node_volume_is_one_run() {
        let size = 100 * TIB;
        let extents = size / (64 * MIB);
        let mut placement = Placement::default();
        place(
            &mut placement,
            &[Candidate {
                node: 7,
                free: i128::from(GIB),
                domain: 7,
            }],
            request(0, extents, size, 1),
        );
        assert_eq!(placement.run_count(), 1);
        assert_eq!(placement.extent_count(), extents);
        assert_eq!(placement.replica_set(0), Some(&ReplicaSet::new(vec![7])));
        assert_eq!(
            placement.replica_set(extents - 1),
            Some(&ReplicaSet::new(vec![7]))
        );
        assert_eq!(placement.replica_set(extents), None);
    }

    #[test]
    fn lookups_find_the_run_covering_an_extent() {
        let mut placement = Placement::default();
        placement.push(3, ReplicaSet::new(vec![1]));
        placement.push(2, ReplicaSet::new(vec![2]));
        placement.push(4, ReplicaSet::new(vec![2])); // merges with the previous run
        placement.push(0, ReplicaSet::new(vec![9])); // empty runs are ignored
        placement.push(1, ReplicaSet::new(vec![1, 3]));
        assert_eq!(placement.run_count(), 3);
        assert_eq!(placement.extent_count(), 10);
        let owners: Vec<Vec<NodeId>> = (0..10)
            .map(|e| placement.replica_set(e).unwrap().nodes.clone())
            .collect();
        assert_eq!(
            owners,
            vec![
                vec![1],
                vec![1],
                vec![1],
                vec![2],
                vec![2],
                vec![2],
                vec![2],
                vec![2],
                vec![2],
                vec![1, 3]
            ]
        );
        assert_eq!(placement.replica_set(10), None);
        assert_eq!(placement.replica_set(u64::MAX), None);
        let firsts: Vec<u64> = placement.runs().map(|(first, _)| first).collect();
        assert_eq!(firsts, vec![0, 3, 9]);
    }

    #[test]
    fn replicas_go_to_distinct_nodes_with_the_most_free_space() {
        let candidates = [
            Candidate {
                node: 1,
                free: i128::from(10 * GIB),
                domain: 1,
            },
            Candidate {
                node: 2,
                free: i128::from(500 * GIB),
                domain: 2,
            },
            Candidate {
                node: 3,
                free: i128::from(400 * GIB),
                domain: 3,
            },
            Candidate {
                node: 4,
                free: i128::from(300 * GIB),
                domain: 4,
            },
        ];
        let mut placement = Placement::default();
        place(&mut placement, &candidates, request(0, 16, GIB, 3));
        assert_eq!(placement.run_count(), 1);
        assert_eq!(placement.replica_set(0).unwrap().nodes, vec![2, 3, 4]);
    }

    #[test]
    fn large_volumes_spread_over_equal_nodes_and_placement_is_deterministic() {
        let candidates: Vec<Candidate> = (1..=4)
            .map(|node| Candidate {
                node,
                free: i128::from(TIB),
                domain: node,
            })
            .collect();
        let size = 64 * GIB;
        let extents = size / (64 * MIB);
        let mut first = Placement::default();
        place(&mut first, &candidates, request(0, extents, size, 2));
        let mut again = Placement::default();
        let mut shuffled = candidates.clone();
        shuffled.reverse();
        place(&mut again, &shuffled, request(0, extents, size, 2));
        assert_eq!(first, again, "candidate order must not change the answer");

        let mut per_node = BTreeMap::<NodeId, u64>::new();
        for (start, run) in first.runs() {
            assert_eq!(run.replicas.nodes.len(), 2);
            assert_ne!(run.replicas.nodes[0], run.replicas.nodes[1]);
            for node in &run.replicas.nodes {
                *per_node.entry(*node).or_default() += run_bytes(start, run.count, 64 * MIB, size);
            }
        }
        assert_eq!(per_node.len(), 4);
        // Two copies of 64 GiB over four equal nodes: 32 GiB each.
        assert!(
            per_node.values().all(|&bytes| bytes == 32 * GIB),
            "{per_node:?}"
        );
    }

    #[test]
    fn run_count_stays_bounded_for_huge_volumes() {
        let candidates: Vec<Candidate> = (1..=5)
            .map(|node| Candidate {
                node,
                free: 0,
                domain: node,
            })
            .collect();
        let size = 100 * TIB;
        let extents = size / (64 * MIB);
        let mut placement = Placement::default();
        place(&mut placement, &candidates, request(0, extents, size, 3));
        assert!(placement.run_count() as u64 <= MAX_RUNS_PER_PLACEMENT);
        assert_eq!(placement.extent_count(), extents);
    }

    #[test]
    fn replicas_never_share_a_failure_domain() {
        // Racks 10 (nodes 1 and 2, the freest and close to each other), 20 (node 3), 30 (node 4).
        let candidates =
            [(1, 810, 10), (2, 800, 10), (3, 100, 20), (4, 50, 30)].map(|(node, free, domain)| {
                Candidate {
                    node,
                    free: i128::from(free * GIB),
                    domain,
                }
            });
        let mut placement = Placement::default();
        place(&mut placement, &candidates, request(0, 16, GIB, 3));
        assert_eq!(placement.replica_set(0).unwrap().nodes, vec![1, 3, 4]);

        // Two replicas over two racks: each stripe takes the freest node of each rack, and the
        // charged bytes move later stripes to the other node of the rack.
        let size = 64 * GIB;
        let extents = size / (64 * MIB);
        let mut placement = Placement::default();
        place(
            &mut placement,
            &candidates[..3],
            request(0, extents, size, 2),
        );
        for (_, run) in placement.runs() {
            let nodes = &run.replicas.nodes;
            assert_eq!(nodes.len(), 2);
            assert!(nodes.contains(&3), "rack 20 has one node: {nodes:?}");
        }
        let used: Vec<NodeId> = placement
            .runs()
            .flat_map(|(_, run)| run.replicas.nodes.clone())
            .collect();
        assert!(used.contains(&1) && used.contains(&2), "{used:?}");

        // Fewer domains than replicas (the caller refuses this): one replica per domain.
        let mut placement = Placement::default();
        place(&mut placement, &candidates[..2], request(0, 16, GIB, 2));
        assert_eq!(placement.replica_set(0).unwrap().nodes, vec![1]);
    }

    #[test]
    fn run_bytes_clip_the_last_partial_extent() {
        assert_eq!(run_bytes(0, 1, 64 * MIB, 10 * MIB), 10 * MIB);
        assert_eq!(run_bytes(1, 2, 64 * MIB, 100 * MIB), 36 * MIB);
        assert_eq!(run_bytes(5, 2, 64 * MIB, 100 * MIB), 0);
        assert_eq!(run_bytes(0, u64::MAX, u64::MAX, u64::MAX), u64::MAX);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn every_placed_extent_has_exactly_one_replica_set(
                pushes in proptest::collection::vec((0u64..50, 1u64..4), 0..40),
                probe in 0u64..2000,
            ) {
                let mut placement = Placement::default();
                let mut expected = Vec::new();
                for (count, node) in &pushes {
                    placement.push(*count, ReplicaSet::new(vec![*node]));
                    expected.extend(std::iter::repeat_n(*node, usize::try_from(*count).unwrap()));
                }
                prop_assert_eq!(placement.extent_count(), expected.len() as u64);
                let got = placement.replica_set(probe).map(|set| set.nodes[0]);
                prop_assert_eq!(got, expected.get(usize::try_from(probe).unwrap()).copied());
                // Canonical: no two neighbouring runs are equal.
                let runs: Vec<&PlacementRun> = placement.runs().map(|(_, run)| run).collect();
                for pair in runs.windows(2) {
                    prop_assert_ne!(&pair[0].replicas, &pair[1].replicas);
                }
            }
        }
    }
}
