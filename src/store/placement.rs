//! Which members own a key: rendezvous (highest random weight) hashing. Every member gets a
//! score per key from a hash of (member, key) and the `n` highest scores own it. Adding or
//! losing a member moves only the keys it owned or wins, and clients that agree on the
//! member list agree on owners without talking to anyone.
//!
//! The hash is fixed (FNV-1a over the member's name and the key, finished with a 64-bit
//! mixer), not `std`'s randomly seeded one: every process must compute the same owners.

/// The score of `member` for `key`.
pub fn score(member: &str, key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for &b in member.as_bytes() {
        feed(b);
    }
    // A separator no member name contains, so ("ab", "c") and ("a", "bc") differ.
    feed(0xff);
    for &b in key {
        feed(b);
    }
    mix(h)
}

/// A 64-bit finaliser (splitmix64's), so that scores of similar inputs are unrelated.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Indices (into `members`) of the `n` owners of `key` among the members `live` accepts,
/// best first. Fewer when fewer members are live.
pub fn owners(
    members: &[String],
    key: &[u8],
    n: usize,
    live: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| live(*i))
        .map(|(i, m)| (score(m, key), i))
        .collect();
    // Highest score first; ties (practically never) by index, so every client agrees.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(n).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7000")).collect()
    }

    #[test]
    fn the_score_is_fixed_across_processes() {
        // Pinned values: a change of the hash would silently re-home every key.
        assert_eq!(score("a:1", b"key"), score("a:1", b"key"));
        assert_ne!(score("a:1", b"key"), score("a:2", b"key"));
        assert_ne!(score("ab", b"c"), score("a", b"bc"));
        // Computed independently (python: FNV-1a then splitmix64's finaliser).
        assert_eq!(score("127.0.0.1:7000", b"page-0"), 0x27a6_3191_dd3d_cc0c);
    }

    #[test]
    fn keys_spread_evenly_over_members() {
        let m = members(4);
        let mut count = [0usize; 4];
        for k in 0..40_000u32 {
            count[owners(&m, &k.to_le_bytes(), 1, |_| true)[0]] += 1;
        }
        for c in count {
            assert!((9_000..11_000).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn losing_a_member_moves_only_its_keys() {
        let m = members(5);
        for k in 0..5_000u32 {
            let key = k.to_le_bytes();
            let before = owners(&m, &key, 2, |_| true);
            let after = owners(&m, &key, 2, |i| i != 3);
            if !before.contains(&3) {
                assert_eq!(before, after, "key {k} moved though its owners live");
            } else {
                // The surviving owner stays first; the lost one is replaced.
                let kept = before.iter().copied().find(|&i| i != 3).unwrap();
                assert_eq!(after[0], kept, "key {k}");
                assert!(!after.contains(&3));
            }
        }
    }

    #[test]
    fn fewer_live_members_than_replicas() {
        let m = members(3);
        assert_eq!(owners(&m, b"k", 5, |_| true).len(), 3);
        assert!(owners(&m, b"k", 1, |_| false).is_empty());
        assert!(owners(&[], b"k", 1, |_| true).is_empty());
    }

    proptest! {
        #[test]
        fn owners_are_distinct_live_and_agree_with_scores(
            n in 1usize..12,
            key in proptest::collection::vec(any::<u8>(), 1..64),
            replicas in 1usize..5,
            dead in any::<u16>(),
        ) {
            let m = members(n);
            let live = |i: usize| dead & (1 << i) == 0;
            let got = owners(&m, &key, replicas, live);
            let live_count = (0..n).filter(|&i| live(i)).count();
            prop_assert_eq!(got.len(), replicas.min(live_count));
            let mut seen = got.clone();
            seen.sort();
            seen.dedup();
            prop_assert_eq!(seen.len(), got.len());
            for w in got.windows(2) {
                prop_assert!(score(&m[w[0]], &key) >= score(&m[w[1]], &key));
            }
            for &i in &got {
                prop_assert!(live(i));
            }
            // No live non-owner beats the last owner.
            if let Some(&last) = got.last() {
                for i in (0..n).filter(|&i| live(i) && !got.contains(&i)) {
                    prop_assert!(score(&m[i], &key) <= score(&m[last], &key));
                }
            }
        }
    }
}
