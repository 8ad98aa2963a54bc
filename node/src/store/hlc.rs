//! Hybrid logical clock.
//!
//! A timestamp is `physical_ms << 16 | logical`. It follows wall-clock time
//! when the clock moves forward and never goes backwards: the last value is
//! persisted with every write, so a restart (or a wall clock set back) still
//! produces larger stamps than anything this node issued before. Last-writer-
//! wins merging between nodes depends on that.

/// Bits reserved for the logical counter.
const LOGICAL_BITS: u32 = 16;

#[derive(Debug, Default, Clone, Copy)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    pub fn new(last: u64) -> Self {
        Hlc { last }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// A new stamp, strictly greater than every stamp seen so far.
    pub fn tick(&mut self, wall_ms: u64) -> u64 {
        let physical = wall_ms << LOGICAL_BITS;
        self.last = physical.max(self.last + 1);
        self.last
    }

    /// Takes a stamp from another node (or from disk) into account, so the
    /// next local stamp orders after it.
    pub fn observe(&mut self, stamp: u64) {
        self.last = self.last.max(stamp);
    }

    /// Milliseconds part of a stamp (for display).
    pub fn physical_ms(stamp: u64) -> u64 {
        stamp >> LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_even_when_the_wall_clock_goes_back() {
        let mut c = Hlc::default();
        let a = c.tick(1000);
        let b = c.tick(1000);
        let d = c.tick(10); // clock set back
        assert!(a < b && b < d);
        assert_eq!(Hlc::physical_ms(a), 1000);
    }

    #[test]
    fn observe_orders_after_remote_stamps() {
        let mut c = Hlc::default();
        c.observe(5000 << 16);
        assert!(c.tick(1) > 5000 << 16);
    }
}
