//! The NIC choice per slice: among the preferred NICs of the source location, the one with
//! the fewest bytes in flight (round-robin on ties); on errors the next untried NIC,
//! preferred first, then fallback; a NIC that fails N times within T is paused for P and
//! then tried again. No lock and no allocation on the choosing path; clocks are passed in,
//! so the logic is tested without waiting.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::PriorityMatrix;
use crate::memory::Location;

/// Index of a NIC in its selector.
pub type NicId = usize;

/// When a failing NIC is taken out of use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PausePolicy {
    /// Failures (N) within `window` that pause a NIC (0 behaves as 1: every failure
    /// pauses).
    pub failures: u32,
    /// The window (T).
    pub window: Duration,
    /// How long a paused NIC is left alone (P) before it is tried again.
    pub pause: Duration,
}

impl Default for PausePolicy {
    fn default() -> Self {
        PausePolicy {
            failures: 3,
            window: Duration::from_secs(10),
            pause: Duration::from_secs(30),
        }
    }
}

/// NIC ids for one location, with its own round-robin turn (a turn shared by every
/// location would let two alternating locations always start at the same NIC).
#[derive(Debug, Default)]
struct Plan {
    preferred: Vec<NicId>,
    fallback: Vec<NicId>,
    turn: AtomicUsize,
}

/// Chooses NICs for slices, balancing bytes in flight.
#[derive(Debug)]
pub struct NicSelector {
    names: Vec<String>,
    plans: BTreeMap<Location, Plan>,
    /// For locations the matrix does not list: every NIC.
    everything: Plan,
    in_flight: Vec<AtomicU64>,
    /// Nanoseconds after `epoch` until which the NIC is paused (0 = not paused).
    paused_until: Vec<AtomicU64>,
    failures: Vec<Mutex<VecDeque<Instant>>>,
    policy: PausePolicy,
    epoch: Instant,
}

impl NicSelector {
    /// A selector over the NICs of `matrix`, pausing by `policy`. `epoch` is any instant
    /// not later than the `now` values that will be passed in.
    pub fn new(matrix: &PriorityMatrix, policy: PausePolicy, epoch: Instant) -> Self {
        let names = matrix.nics();
        let ids: std::collections::HashMap<&String, NicId> =
            names.iter().enumerate().map(|(i, n)| (n, i)).collect();
        let id = |name: &String| ids.get(name).copied();
        let plans = matrix
            .entries()
            .map(|(location, p)| {
                let plan = Plan {
                    preferred: p.preferred.iter().filter_map(id).collect(),
                    fallback: p.fallback.iter().filter_map(id).collect(),
                    turn: AtomicUsize::new(0),
                };
                (location, plan)
            })
            .collect();
        let everything = Plan {
            preferred: (0..names.len()).collect(),
            ..Plan::default()
        };
        let per_nic = |_| AtomicU64::new(0);
        NicSelector {
            in_flight: (0..names.len()).map(per_nic).collect(),
            paused_until: (0..names.len()).map(per_nic).collect(),
            failures: (0..names.len())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            names,
            plans,
            everything,
            policy,
            epoch,
        }
    }

    /// Number of NICs.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there is no NIC at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The name of a NIC.
    pub fn name(&self, nic: NicId) -> &str {
        &self.names[nic]
    }

    /// The id of a NIC by name.
    pub fn id(&self, name: &str) -> Option<NicId> {
        self.names.iter().position(|n| n == name)
    }

    /// The NIC for the next slice from memory at `location`: the least loaded preferred
    /// NIC that is not paused; else the least loaded fallback one; if every candidate is
    /// paused, the one whose pause ends first (degraded beats failing). `None` only when
    /// the location has no NIC at all.
    pub fn choose(&self, location: Location, now: Instant) -> Option<NicId> {
        self.choose_excluding(location, &[], now)
    }

    /// As [`NicSelector::choose`], skipping NICs already tried for this slice (the walk
    /// after an error). `None` when every candidate has been tried.
    pub fn choose_excluding(
        &self,
        location: Location,
        tried: &[NicId],
        now: Instant,
    ) -> Option<NicId> {
        let plan = self.plan(location);
        let usable = |nic: &NicId| !tried.contains(nic) && !self.is_paused(*nic, now);
        self.least_loaded(&plan.preferred, &plan.turn, usable)
            .or_else(|| self.least_loaded(&plan.fallback, &plan.turn, usable))
            .or_else(|| {
                // Everything left is paused: the pause that ends first.
                let untried = plan
                    .preferred
                    .iter()
                    .chain(&plan.fallback)
                    .filter(|n| !tried.contains(n));
                untried
                    .min_by_key(|&&n| self.paused_until[n].load(Ordering::Relaxed))
                    .copied()
            })
    }

    /// Every NIC that may carry a batch from memory at `location` now (a transport that
    /// lets its queue pairs claim slices from a shared batch posts to all of them): the
    /// preferred NICs not paused; else the fallback ones not paused; else the one whose
    /// pause ends first. Empty only when the location has no NIC at all.
    pub fn usable(&self, location: Location, now: Instant) -> Vec<NicId> {
        let plan = self.plan(location);
        let live = |list: &[NicId]| -> Vec<NicId> {
            list.iter()
                .copied()
                .filter(|&n| !self.is_paused(n, now))
                .collect()
        };
        let preferred = live(&plan.preferred);
        if !preferred.is_empty() {
            return preferred;
        }
        let fallback = live(&plan.fallback);
        if !fallback.is_empty() {
            return fallback;
        }
        plan.preferred
            .iter()
            .chain(&plan.fallback)
            .min_by_key(|&&n| self.paused_until[n].load(Ordering::Relaxed))
            .copied()
            .into_iter()
            .collect()
    }

    fn plan(&self, location: Location) -> &Plan {
        self.plans
            .get(&location)
            .or_else(|| self.plans.get(&Location::Any))
            .unwrap_or(&self.everything)
    }

    /// Records `bytes` handed to `nic`.
    pub fn begin(&self, nic: NicId, bytes: u64) {
        self.in_flight[nic].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records `bytes` of `nic` done (completed or failed).
    pub fn end(&self, nic: NicId, bytes: u64) {
        let _ = self.in_flight[nic].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some(b.saturating_sub(bytes))
        });
    }

    /// Bytes in flight on `nic`.
    pub fn in_flight(&self, nic: NicId) -> u64 {
        self.in_flight[nic].load(Ordering::Relaxed)
    }

    /// Records a failure of `nic` at `now`; returns true if that paused it.
    pub fn report_failure(&self, nic: NicId, now: Instant) -> bool {
        let mut recent = self.failures[nic]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > self.policy.window)
        {
            recent.pop_front();
        }
        if recent.len() < self.policy.failures as usize {
            return false;
        }
        recent.clear();
        // A pause too long for the clock ("never retry") saturates instead of panicking.
        let until = now
            .checked_add(self.policy.pause)
            .map_or(u64::MAX, |t| self.nanos(t));
        self.paused_until[nic].store(until, Ordering::Relaxed);
        log::warn!(
            "NIC {} failed {} times within {:?}: paused for {:?}",
            self.names[nic],
            self.policy.failures,
            self.policy.window,
            self.policy.pause
        );
        true
    }

    /// Whether `nic` is paused at `now`.
    pub fn is_paused(&self, nic: NicId, now: Instant) -> bool {
        self.paused_until[nic].load(Ordering::Relaxed) > self.nanos(now)
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u64::MAX as u128) as u64
    }

    /// The candidate with the fewest bytes in flight; ties go round-robin.
    fn least_loaded(
        &self,
        candidates: &[NicId],
        turn: &AtomicUsize,
        usable: impl Fn(&NicId) -> bool,
    ) -> Option<NicId> {
        if candidates.is_empty() {
            return None;
        }
        let start = turn.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..candidates.len()).map(|i| candidates[(start + i) % candidates.len()]);
        rotated
            .filter(|n| usable(n))
            .min_by_key(|&n| self.in_flight[n].load(Ordering::Relaxed))
    }
}

/// The peer NIC to target from local NIC `local` (rail affinity): the peer's NIC of the
/// same name; else the one at the same position (`local_rail`) in the peer's list; else
/// one of the peer's preferred NICs for the target location, spread by rail. `peer_nics`
/// are the peer's NICs usable for the target location, `peer_preferred` its preferred ones.
pub fn remote_nic<'a>(
    local: &str,
    local_rail: usize,
    peer_nics: &'a [String],
    peer_preferred: &'a [String],
) -> Option<&'a str> {
    if let Some(same) = peer_nics.iter().find(|n| *n == local) {
        return Some(same);
    }
    if let Some(same_rail) = peer_nics.get(local_rail) {
        return Some(same_rail);
    }
    let pool = if peer_preferred.is_empty() {
        peer_nics
    } else {
        peer_preferred
    };
    pool.get(local_rail % pool.len().max(1)).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matrix(json: &str) -> PriorityMatrix {
        PriorityMatrix::from_json(json).unwrap()
    }

    fn selector(json: &str, policy: PausePolicy) -> (NicSelector, Instant) {
        let t0 = Instant::now();
        (NicSelector::new(&matrix(json), policy, t0), t0)
    }

    const TWO_NODES: &str = r#"{"cpu:0": [["a", "b"], ["c"]], "cpu:1": [["c"], ["a", "b"]]}"#;

    #[test]
    fn spreads_over_preferred_by_bytes_in_flight() {
        let (s, t0) = selector(TWO_NODES, PausePolicy::default());
        let mut seen = Vec::new();
        for _ in 0..4 {
            let nic = s.choose(Location::Cpu(0), t0).unwrap();
            s.begin(nic, 100);
            seen.push(s.name(nic).to_string());
        }
        seen.sort();
        assert_eq!(seen, ["a", "a", "b", "b"], "preferred only, evenly");
        let a = s.id("a").unwrap();
        s.begin(a, 1000);
        assert_eq!(
            s.name(s.choose(Location::Cpu(0), t0).unwrap()),
            "b",
            "least loaded wins"
        );
        assert_eq!(s.name(s.choose(Location::Cpu(1), t0).unwrap()), "c");
    }

    #[test]
    fn errors_walk_preferred_then_fallback() {
        let (s, t0) = selector(TWO_NODES, PausePolicy::default());
        let (a, b, c) = (s.id("a").unwrap(), s.id("b").unwrap(), s.id("c").unwrap());
        let first = s.choose(Location::Cpu(0), t0).unwrap();
        let second = s.choose_excluding(Location::Cpu(0), &[first], t0).unwrap();
        assert!([a, b].contains(&first) && [a, b].contains(&second) && first != second);
        assert_eq!(s.choose_excluding(Location::Cpu(0), &[a, b], t0), Some(c));
        assert_eq!(s.choose_excluding(Location::Cpu(0), &[a, b, c], t0), None);
    }

    #[test]
    fn a_nic_failing_n_times_in_t_is_paused_for_p_then_used_again() {
        let policy = PausePolicy {
            failures: 3,
            window: Duration::from_secs(10),
            pause: Duration::from_secs(30),
        };
        let (s, t0) = selector(r#"{"cpu:0": [["a", "b"]]}"#, policy);
        let a = s.id("a").unwrap();
        let at = |secs| t0 + Duration::from_secs(secs);
        // Failures spread wider than the window never pause.
        assert!(!s.report_failure(a, at(0)));
        assert!(!s.report_failure(a, at(6)));
        assert!(
            !s.report_failure(a, at(12)),
            "the failure at 0 s is out of the window"
        );
        assert!(s.report_failure(a, at(13)), "3 failures within 10 s");
        assert!(s.is_paused(a, at(20)));
        for _ in 0..10 {
            assert_eq!(s.name(s.choose(Location::Cpu(0), at(20)).unwrap()), "b");
        }
        assert!(!s.is_paused(a, at(44)), "the pause is over after 30 s");
        s.begin(s.id("b").unwrap(), 10);
        assert_eq!(s.choose(Location::Cpu(0), at(44)), Some(a));
    }

    #[test]
    fn usable_nics_are_the_preferred_live_ones_then_fallback_then_soonest_back() {
        let policy = PausePolicy {
            failures: 1,
            window: Duration::from_secs(1),
            pause: Duration::from_secs(5),
        };
        let (s, t0) = selector(TWO_NODES, policy);
        let (a, b, c) = (s.id("a").unwrap(), s.id("b").unwrap(), s.id("c").unwrap());
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(s.usable(Location::Cpu(0), at(0)), vec![a, b]);
        assert_eq!(s.usable(Location::Cpu(1), at(0)), vec![c]);
        s.report_failure(a, at(0));
        assert_eq!(s.usable(Location::Cpu(0), at(1)), vec![b]);
        s.report_failure(b, at(1));
        assert_eq!(s.usable(Location::Cpu(0), at(2)), vec![c], "fallback");
        s.report_failure(c, at(2));
        assert_eq!(
            s.usable(Location::Cpu(0), at(3)),
            vec![a],
            "all paused: the one back first"
        );
        assert_eq!(s.usable(Location::Cpu(0), at(9)), vec![a, b], "pauses over");
        let (empty, t0) = selector("{}", PausePolicy::default());
        assert!(empty.usable(Location::Cpu(0), t0).is_empty());
    }

    #[test]
    fn when_everything_is_paused_the_soonest_back_is_used() {
        let policy = PausePolicy {
            failures: 1,
            window: Duration::from_secs(1),
            pause: Duration::from_secs(5),
        };
        let (s, t0) = selector(r#"{"cpu:0": [["a"], ["b"]]}"#, policy);
        let (a, b) = (s.id("a").unwrap(), s.id("b").unwrap());
        s.report_failure(b, t0);
        s.report_failure(a, t0 + Duration::from_secs(1));
        assert_eq!(
            s.choose(Location::Cpu(0), t0 + Duration::from_secs(2)),
            Some(b)
        );
    }

    #[test]
    fn unknown_locations_use_every_nic_and_an_empty_matrix_none() {
        let (s, t0) = selector(TWO_NODES, PausePolicy::default());
        assert!(s.choose(Location::Cuda(7), t0).is_some());
        let (empty, t0) = selector("{}", PausePolicy::default());
        assert_eq!(empty.choose(Location::Cpu(0), t0), None);
    }

    #[test]
    fn alternating_locations_each_spread_over_their_own_nics() {
        let (s, t0) = selector(
            r#"{"cpu:0": [["a", "b"]], "cpu:1": [["c", "d"]]}"#,
            PausePolicy::default(),
        );
        let mut used = std::collections::BTreeMap::new();
        for i in 0..1000 {
            let nic = s.choose(Location::Cpu(i % 2), t0).unwrap();
            // Each slice finishes before the next: every choice is a tie.
            s.begin(nic, 10);
            s.end(nic, 10);
            *used.entry(s.name(nic).to_string()).or_insert(0) += 1;
        }
        assert_eq!(
            used.values().copied().collect::<Vec<_>>(),
            vec![250; 4],
            "{used:?}"
        );
    }

    #[test]
    fn a_pause_longer_than_the_clock_is_forever_not_a_panic() {
        let policy = PausePolicy {
            failures: 1,
            window: Duration::from_secs(1),
            pause: Duration::MAX,
        };
        let (s, t0) = selector(r#"{"cpu:0": [["a", "b"]]}"#, policy);
        let a = s.id("a").unwrap();
        assert!(s.report_failure(a, t0));
        assert!(s.is_paused(a, t0 + Duration::from_secs(1_000_000)));
    }

    #[test]
    fn remote_nic_follows_the_rail() {
        let peer = ["mlx5_0", "mlx5_1", "mlx5_2"].map(String::from);
        let preferred = ["mlx5_2"].map(String::from);
        assert_eq!(
            remote_nic("mlx5_1", 1, &peer, &preferred),
            Some("mlx5_1"),
            "same name"
        );
        assert_eq!(
            remote_nic("ib0", 2, &peer, &preferred),
            Some("mlx5_2"),
            "same rail"
        );
        assert_eq!(
            remote_nic("ib9", 9, &peer, &preferred),
            Some("mlx5_2"),
            "peer's preferred"
        );
        assert_eq!(remote_nic("ib9", 9, &[], &[]), None);
    }

    /// A random matrix over NICs n0..n5: each location prefers some, falls back to others.
    fn random_matrix() -> impl Strategy<Value = PriorityMatrix> {
        proptest::collection::vec(proptest::collection::vec(0u8..3, 6), 1..4).prop_map(|rows| {
            let entries: Vec<String> = rows
                .iter()
                .enumerate()
                .map(|(node, row)| {
                    let pick = |class| {
                        let names: Vec<String> = (0..6)
                            .filter(|&i| row[i] == class)
                            .map(|i| format!("\"n{i}\""))
                            .collect();
                        format!("[{}]", names.join(","))
                    };
                    format!("\"cpu:{node}\": [{}, {}]", pick(1), pick(2))
                })
                .collect();
            PriorityMatrix::from_json(&format!("{{{}}}", entries.join(","))).unwrap()
        })
    }

    proptest! {
        /// The chosen NIC is always allowed for the location (preferred or fallback), and
        /// preferred whenever a preferred NIC is neither tried nor paused.
        #[test]
        fn the_choice_is_always_allowed(
            m in random_matrix(),
            node in 0u32..4,
            paused in proptest::collection::vec(any::<bool>(), 6),
            tried in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let t0 = Instant::now();
            let policy = PausePolicy { failures: 1, window: Duration::from_secs(1), pause: Duration::from_secs(60) };
            let s = NicSelector::new(&m, policy, t0);
            for nic in (0..s.len()).filter(|&n| paused[n]) {
                s.report_failure(nic, t0);
            }
            let tried: Vec<NicId> = (0..s.len()).filter(|&n| tried[n]).collect();
            let p = m.for_location(Location::Cpu(node));
            let choice = s.choose_excluding(Location::Cpu(node), &tried, t0);
            let allowed: Vec<&String> = p.all().collect();
            match choice {
                Some(nic) => {
                    prop_assert!(allowed.contains(&&s.names[nic]), "{} not allowed", s.names[nic]);
                    prop_assert!(!tried.contains(&nic));
                    let usable_preferred = p.preferred.iter().filter_map(|n| s.id(n)).any(|n| !tried.contains(&n) && !s.is_paused(n, t0));
                    if usable_preferred {
                        prop_assert!(p.preferred.contains(&s.names[nic]));
                    }
                }
                None => prop_assert!(allowed.iter().all(|n| tried.contains(&s.id(n).unwrap()))),
            }
        }

        /// Under a stream of slices of up to 64 KiB the preferred NICs' bytes in flight stay
        /// within one slice of each other; with completions in between, each choice is a
        /// least-loaded preferred NIC.
        #[test]
        fn load_stays_within_one_slice(
            slices in proptest::collection::vec((1u64..=65536, any::<bool>()), 1..300),
        ) {
            let t0 = Instant::now();
            let s = NicSelector::new(&matrix(r#"{"cpu:0": [["a", "b", "c"], ["d"]]}"#), PausePolicy::default(), t0);
            let preferred: Vec<NicId> = ["a", "b", "c"].iter().map(|n| s.id(n).unwrap()).collect();
            let mut outstanding: Vec<(NicId, u64)> = Vec::new();
            let mut submit_only = true;
            for (bytes, complete_one) in slices {
                if complete_one && !outstanding.is_empty() {
                    let (nic, b) = outstanding.remove(bytes as usize % outstanding.len());
                    s.end(nic, b);
                    submit_only = false;
                }
                let low = preferred.iter().map(|&n| s.in_flight(n)).min().unwrap();
                let nic = s.choose(Location::Cpu(0), t0).unwrap();
                prop_assert!(preferred.contains(&nic));
                prop_assert_eq!(s.in_flight(nic), low, "not a least-loaded NIC");
                s.begin(nic, bytes);
                outstanding.push((nic, bytes));
                if submit_only {
                    let loads: Vec<u64> = preferred.iter().map(|&n| s.in_flight(n)).collect();
                    let spread = loads.iter().max().unwrap() - loads.iter().min().unwrap();
                    prop_assert!(spread <= 65536, "loads {:?} differ by more than a slice", loads);
                }
            }
        }
    }
}
