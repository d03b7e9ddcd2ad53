//! A slab whose ids carry a generation: an id is `generation << 32 | index`, and a slot's
//! generation changes every time it is freed, so a stale, freed or forged id finds nothing
//! instead of someone else's entry.

/// Generational slab of `T`.
#[derive(Debug)]
pub(crate) struct GenSlab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    live: usize,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Default for GenSlab<T> {
    fn default() -> Self {
        GenSlab {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }
}

impl<T> GenSlab<T> {
    /// Stores `value` and returns its id (never 0). The caller bounds the size.
    pub fn insert(&mut self, value: T) -> u64 {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.value = Some(value);
        self.live += 1;
        (u64::from(slot.generation) << 32) | u64::from(index)
    }

    /// The entry of `id`, if it is live.
    pub fn get(&self, id: u64) -> Option<&T> {
        let (generation, index) = split(id);
        self.slots
            .get(index)
            .filter(|slot| slot.generation == generation)
            .and_then(|slot| slot.value.as_ref())
    }

    /// Removes and returns the entry of `id`, if it is live.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let (generation, index) = split(id);
        let slot = self
            .slots
            .get_mut(index)
            .filter(|slot| slot.generation == generation)?;
        let value = slot.value.take()?;
        // Skip 0 on wrap so that no id is ever 0.
        slot.generation = slot.generation.checked_add(1).unwrap_or(1);
        self.free.push(index as u32);
        self.live -= 1;
        Some(value)
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Every live entry.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|slot| slot.value.as_ref())
    }
}

fn split(id: u64) -> (u32, usize) {
    ((id >> 32) as u32, (id & 0xffff_ffff) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn freed_and_forged_ids_find_nothing() {
        let mut slab = GenSlab::default();
        let a = slab.insert("a");
        assert_ne!(a, 0);
        assert_eq!(slab.get(a), Some(&"a"));
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None, "double free");
        let b = slab.insert("b");
        assert_eq!(b & 0xffff_ffff, a & 0xffff_ffff, "slot reused");
        assert_eq!(slab.get(a), None, "stale id must not see the new entry");
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!(slab.get(0), None);
        assert_eq!(slab.get(u64::MAX), None);
        assert_eq!(slab.get(b ^ (1 << 40)), None);
    }

    proptest! {
        /// Ids issued and not removed resolve to their own value; every other id to none.
        #[test]
        fn ids_resolve_only_while_live(ops in proptest::collection::vec(any::<Option<usize>>(), 1..200)) {
            let mut slab = GenSlab::default();
            let mut live: Vec<(u64, usize)> = Vec::new();
            let mut dead: Vec<u64> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Some(pick) if !live.is_empty() => {
                        let (id, v) = live.swap_remove(pick % live.len());
                        prop_assert_eq!(slab.remove(id), Some(v));
                        dead.push(id);
                    }
                    _ => live.push((slab.insert(n), n)),
                }
                for &(id, v) in &live {
                    prop_assert_eq!(slab.get(id), Some(&v));
                }
                for &id in &dead {
                    prop_assert_eq!(slab.get(id), None);
                }
                prop_assert_eq!(slab.len(), live.len());
            }
        }
    }
}
